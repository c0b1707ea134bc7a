"""CAN and baseline neuron scores, all sites of a scope from one forward and one backward pass per batch.

For neuron j of site l over M samples (image + loss text), CAN is

    I[l, j] = 1/M * sum_i  mean_{t in T_i}  |dL_i / da_t[l, j]|^alpha * |a_t[l, j]|

with ``L_i`` the mean caption-token NLL of sample i and ``T_i`` the positions the score reduces
over. Which positions those are depends on where the site lives:

- ``language`` sites: with ``reduction="loss"`` (default) the positions whose logits carry the
  loss, i.e. t such that token t+1 is a caption token (labels are shifted by one inside the
  model); with ``reduction="all"`` every non-pad position (image tokens included).
- ``vision`` and ``projector`` sites have no caption positions: every position (patch tokens and
  CLS) of every crop of the sample, whatever ``reduction`` says.
- ``qformer`` query-branch sites (``*_query``): every query token; text-branch sites
  (``intermediate``, ``output``): the non-pad instruction tokens.

Under ``torch.distributed`` each process scores its shard of the images and the per-neuron sums
are all-reduced, so every process ends with the scores of all images. With language-only scopes
each image is encoded once (``canprobe.features``) for its caption and its loss pass.
``gradient_checkpointing`` recomputes each layer in the backward pass instead of keeping its
activations; the hooks count the recomputed forward once.

The batch loss is the *sum* of per-sample losses, so the gradient that reaches sample i's
activations is exactly dL_i/da (samples never interact in these models). Weights stay frozen: the
first hooked activation is made to require grad so that the graph starts there; each hooked
activation passes through an identity autograd function (``_Tap``) whose backward reduces the
activation and its gradient to float32 per-neuron sums, so no copies are kept, and under gradient
checkpointing the activation is recomputed with its layer rather than held through the forward.
Sites whose output never reaches the loss (e.g. LLaVA's last vision layer, which
``vision_feature_layer=-2`` skips) get a zero gradient.

The other methods share the call shape: ``activation`` = CAN with alpha 0, ``gradient`` = mean
|dL_i/da|, ``random`` = seeded uniform, ``wanda`` = sum over the neuron's weight row (or column,
for input-unit sites) of |W| times the RMS of the matching input feature over the same positions
(Wanda's L2 norm divided by sqrt(count), so it does not grow with the data set). Every method also
returns ``signed``: the first-order estimate of the loss change from zero-ablating the neuron at
every position, -sum_t a_t dL_i/da_t over non-pad positions, averaged over samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from canprobe import distributed, features
from canprobe.ablation import to_model_inputs
from canprobe.captions import FeatureCache, generate_captions, is_texts, teacher_forcing_inputs
from canprobe.checks import printable
from canprobe.errors import InputError
from canprobe.identity import check_same, images_fingerprint, texts_fingerprint
from canprobe.models import LoadedModel
from canprobe.sites import Site, SiteRegistry, is_address
from canprobe.store import atomic_write_bytes

log = logging.getLogger(__name__)

SCORE_METHODS = ("can", "activation", "gradient", "random", "wanda")
REDUCTIONS = ("loss", "all")
SCORES_FILE = "scores.safetensors"
PAIR_KEY = "canprobe_pair"  # metadata key: the id of the write that made a scores/ranking pair
RANKING_FILE = "ranking.parquet"
RANKING_COLUMNS = ("address", "component", "site", "layer", "index", "score", "rank")
POSITIONS = {
    "language": {"loss": "positions predicting a caption token", "all": "all non-pad positions"},
    "vision": "all positions of every crop (no caption positions)",
    "projector": "all image-token positions (no caption positions)",
    "qformer": "all query tokens (query branch); non-pad instruction tokens (text branch)",
}
QFORMER_TEXT_KINDS = ("intermediate", "output")


@dataclass
class ScoreResult:
    """Per-site neuron scores, the signed ablation estimate, and how they were computed."""

    scores: dict[str, torch.Tensor]
    signed: dict[str, torch.Tensor]
    sites: list[Site]
    config: dict = field(default_factory=dict)
    pair: str | None = None  # the id shared with the ranking.parquet of the same write (set by save and load)

    def _order(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores in model order, descending stable order, site number of each neuron in model order)."""
        sizes = [s.size for s in self.sites]
        score = torch.cat([self.scores[s.name].float() for s in self.sites]).numpy()
        return score, np.argsort(-score, kind="stable"), np.repeat(np.arange(len(self.sites)), sizes)

    def ranking(self) -> pd.DataFrame:
        """All neurons, most important first; ties keep model order (a stable sort)."""
        score, order, site_of = self._order()
        starts = np.cumsum([0] + [s.size for s in self.sites])
        site_idx = site_of[order]
        index = order - starts[site_idx]
        names = np.array([s.name for s in self.sites], dtype=object)[site_idx]
        df = pd.DataFrame(
            {
                "address": [f"{n}:{i}" for n, i in zip(names, index)],
                "component": np.array([s.component for s in self.sites], dtype=object)[site_idx],
                "site": names,
                "layer": np.array([s.layer for s in self.sites], dtype=np.int64)[site_idx],
                "index": index.astype(np.int64),
                "score": score[order],
                "rank": np.arange(1, len(order) + 1, dtype=np.int64),
            }
        )
        df.attrs["config"] = self.config
        return df

    def top(self, k: int) -> list[str]:
        """Addresses of the k most important neurons (same order as ``ranking``)."""
        if k < 0:
            raise InputError(f"k must be non-negative, got {k}")
        _, order, site_of = self._order()
        starts = np.cumsum([0] + [s.size for s in self.sites])
        chosen = order[:k]
        return [self.sites[j].address(int(i - starts[j])) for i, j in zip(chosen, site_of[chosen])]

    def save(self, out_dir: str | Path) -> None:
        """Write scores.safetensors, then ranking.parquet, each atomically, both marked with one pair id
        (a digest of the scores and their metadata).

        A crash between the two leaves the new scores beside the old ranking; their pair ids then
        differ, and readers rebuild the ranking from the scores (``load_folder_ranking``) or refuse.
        """
        from safetensors.torch import save

        out = Path(out_dir)
        tensors = {}
        for s in self.sites:
            tensors[s.name] = self.scores[s.name].float().contiguous()
            tensors[f"{s.name}/signed"] = self.signed[s.name].float().contiguous()
        meta = {"config": json.dumps(self.config), "sites": json.dumps([asdict(s) for s in self.sites])}
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        for name in sorted(tensors):
            digest.update(tensors[name].numpy().tobytes())
        self.pair = digest.hexdigest()[:16]  # same content, same id (and same bytes on disk)
        atomic_write_bytes(out / SCORES_FILE, save(tensors, metadata={**meta, PAIR_KEY: self.pair}))
        atomic_write_bytes(out / RANKING_FILE, _parquet_bytes(self.ranking(), self.config, self.pair))


def _parquet_bytes(df: pd.DataFrame, config: dict, pair: str) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    df = df.copy()
    df.attrs = {}
    table = pa.Table.from_pandas(df, preserve_index=False)
    extra = {b"canprobe": json.dumps(config).encode(), PAIR_KEY.encode(): pair.encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _scores_pair(file: Path) -> str | None:
    """The pair id in a scores file's header (cheap: the tensors are not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get(PAIR_KEY)
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{printable(file)} is not a readable canprobe scores file ({_first_line(exc)})") from None


def load_folder_ranking(folder: str | Path) -> pd.DataFrame:
    """A run folder's own ranking, consistent with its scores.

    When the two files come from different writes (a crash between them), the scores are the
    newer: the ranking is rebuilt from them and rewritten, with a warning.
    """
    folder = Path(folder)
    ranking = load_ranking(folder / RANKING_FILE, check_pair=False)
    scores_file = folder / SCORES_FILE
    if scores_file.exists() and _scores_pair(scores_file) != ranking.attrs["pair"]:
        log.warning("%s: ranking.parquet was older than scores.safetensors (an interrupted write); rebuilt", folder)
        result = load_scores(scores_file)
        atomic_write_bytes(folder / RANKING_FILE, _parquet_bytes(result.ranking(), result.config, result.pair))
        ranking = load_ranking(folder / RANKING_FILE)
    return ranking


def _resolve_file(path: str | Path, name: str) -> Path:
    path = Path(path)
    path = path / name if path.is_dir() else path
    if not path.exists():
        raise InputError(f"{path} does not exist; write it with `canprobe score --out DIR`")
    return path


def load_ranking(path: str | Path, check_pair: bool = True) -> pd.DataFrame:
    """Read ranking.parquet (a file or the folder holding it), checked to be a canprobe ranking.

    The scoring config is in ``df.attrs["config"]`` and the file in ``df.attrs["path"]``. Damaged,
    empty and foreign files raise InputError naming the file; every address must parse; with
    ``check_pair``, a scores.safetensors beside it must come from the same write.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = _resolve_file(path, RANKING_FILE)
    where = printable(file)
    try:
        table = pq.read_table(file)
        df = table.to_pandas()
    except (pa.ArrowException, OSError, ValueError) as exc:
        why = _first_line(exc)
        raise InputError(f"{where} is not a readable parquet file ({why}); write it with `canprobe score`") from None
    missing = [c for c in RANKING_COLUMNS if c not in df.columns]
    raw = (table.schema.metadata or {}).get(b"canprobe")
    if missing or raw is None:
        what = f"missing columns {', '.join(missing)}" if missing else "no canprobe metadata"
        raise InputError(f"{where} is not a canprobe ranking ({what}); write one with `canprobe score`")
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{where}: its canprobe metadata is not valid JSON; the file is damaged") from None
    if df.empty:
        raise InputError(f"{where} holds no neuron; rewrite it with `canprobe score`")
    addresses = df["address"]
    bad = ~addresses.map(is_address).astype(bool)
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise InputError(
            f"{where}: row {row + 1} holds {addresses.iloc[row]!r}, not a neuron address "
            f"({int(bad.sum())} such row(s)); the file is damaged, rewrite it with `canprobe score`"
        )
    if addresses.duplicated().any():
        twice = addresses[addresses.duplicated()].iloc[0]
        raise InputError(f"{where}: neuron {twice} is ranked twice; the file is damaged")
    df.attrs["config"] = config if isinstance(config, dict) else {}
    df.attrs["path"] = where
    df.attrs["pair"] = ((table.schema.metadata or {}).get(PAIR_KEY.encode()) or b"").decode() or None
    scores_file = file.with_name(SCORES_FILE)
    if check_pair and scores_file.exists() and _scores_pair(scores_file) != df.attrs["pair"]:
        raise InputError(
            f"{where} and the {SCORES_FILE} beside it come from different writes (an interrupted `canprobe score`?); "
            "rerun canprobe score"
        )
    return df


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_scores(path: str | Path) -> ScoreResult:
    """Read scores.safetensors (a file or the folder holding it) back into a ScoreResult."""
    from safetensors import SafetensorError, safe_open

    file = _resolve_file(path, SCORES_FILE)
    where = printable(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            if "sites" not in meta:
                raise InputError(f"{where} is not a canprobe scores file (no site metadata)")
            sites = [Site(**d) for d in json.loads(meta["sites"])]
            scores = {s.name: f.get_tensor(s.name) for s in sites}
            signed = {s.name: f.get_tensor(f"{s.name}/signed") for s in sites}
            config = json.loads(meta.get("config", "{}"))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise InputError(f"{where} is not a readable canprobe scores file ({_first_line(exc)})") from None
    return ScoreResult(scores, signed, sites, config, meta.get(PAIR_KEY))


@dataclass
class _Batch:
    """Per-batch position weights: ``weights`` reduce a score over T_i, ``masks`` select non-pad positions."""

    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    vision_rows: torch.Tensor  # per vision row (crop): 1 / number of crops of its sample


def _row_weights(mask: torch.Tensor) -> torch.Tensor:
    """Turn a 0/1 position mask [rows, T] into per-row means (each row sums to 1, empty rows to 0)."""
    mask = mask.float()
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)


class _Tap(torch.autograd.Function):
    """Identity whose backward hands (activation, gradient) to an accumulator.

    Autograd checks that the saved activation was not modified in place before the backward.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, acc: _Accumulator) -> torch.Tensor:
        ctx.save_for_backward(a)
        ctx.acc = acc
        return a.view_as(a)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (a,) = ctx.saved_tensors
        ctx.acc.backward(a, g)
        return g, None


class _Accumulator:
    """Float32 per-neuron sums for one site, filled by module hooks during forward and backward."""

    def __init__(self, site: Site, method: str, alpha: float, batch: Callable[[], _Batch], encoder: bool = False):
        self.site, self.method, self.alpha, self.batch = site, method, alpha, batch
        self.encoder = encoder  # a language site in an encoder (T5's): it reads the prompt, not the caption
        self.score = torch.zeros(site.size, dtype=torch.float32)
        self.signed = torch.zeros(site.size, dtype=torch.float32)
        self.input_sq = None  # wanda: position-weighted mean square of the weight's input features
        # the batch whose forward was hooked: gradient checkpointing recomputes it and must not count twice
        self._last: _Batch | None = None
        self._last_input: _Batch | None = None

    def _positions(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score weights, non-pad mask), each [rows, T], for an activation of shape [rows, T, N]."""
        b = self.batch()
        comp = self.site.component
        if comp in ("vision", "projector") and a.dim() == 2:
            # one sequence of every image's patches (Qwen-VL): per-patch weights, summed over each
            # group of patches that the merger folds into one position
            w = b.vision_rows.to(a.device)
            if w.numel() % a.shape[0]:
                raise InputError(f"{self.site.name}: {a.shape[0]} positions for {w.numel()} image patches")
            w = w.view(a.shape[0], -1).sum(dim=1)
            return w, torch.ones_like(w)
        if comp in ("vision", "projector"):
            rows, t = a.shape[:2]
            if rows != b.vision_rows.numel():
                raise InputError(f"{self.site.name}: {rows} image rows for a batch of {b.vision_rows.numel()} crops")
            mask = torch.ones(rows, t, device=a.device)
            return b.vision_rows.to(a.device)[:, None] / t * mask, mask
        key = "language_encoder" if self.encoder else comp
        if comp == "qformer":
            key = "qformer_text" if self.site.kind in QFORMER_TEXT_KINDS else "qformer_query"
            if key == "qformer_query":
                mask = torch.ones(a.shape[:2], device=a.device)
                return _row_weights(mask), mask
        w, m = b.weights[key].to(a.device), b.masks[key].to(a.device)
        if a.dim() == 2 and a.shape[0] == w.numel():  # rows and positions flattened into one (OPT's MLP)
            return w.reshape(-1), m.reshape(-1)
        if w.shape != a.shape[:2]:
            raise InputError(f"{self.site.name}: activation positions {tuple(a.shape[:2])} != inputs {tuple(w.shape)}")
        return w, m

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """Called with the site's activation [rows, T, N]; returns it tapped for the backward pass.

        The tap saves ``a`` as an autograd tensor, so under gradient checkpointing it is dropped
        after the forward and recomputed with its layer, instead of being held until the backward.
        """
        if not a.requires_grad:
            a.requires_grad_(True)
        batch = self.batch()
        if batch is not self._last:  # a recomputed forward (checkpointing) is counted once
            self._last = batch
            if self.method == "activation" or (self.method == "can" and self.alpha == 0):
                w, _ = self._positions(a)
                with torch.no_grad():
                    self.score += torch.einsum("...,...n->n", w, a.detach().float().abs()).cpu()
        return _Tap.apply(a, self)

    def backward(self, a: torch.Tensor, g: torch.Tensor) -> None:
        """Accumulate the gradient-dependent sums from the activation and its gradient."""
        w, m = self._positions(a)
        with torch.no_grad():
            af, gf = a.float(), g.float()
            prod = af * gf
            self.signed -= torch.einsum("...,...n->n", m, prod).cpu()
            if self.method == "can" and self.alpha > 0:
                value = prod.abs_() if self.alpha == 1 else gf.abs().pow_(self.alpha).mul_(af.abs())
                self.score += torch.einsum("...,...n->n", w, value).cpu()
            elif self.method == "gradient":
                self.score += torch.einsum("...,...n->n", w, gf.abs()).cpu()

    def weight_input(self, x: torch.Tensor) -> None:
        """Wanda: accumulate the mean square of each input feature of the site's linear layer."""
        batch = self.batch()
        if batch is self._last_input:
            return
        self._last_input = batch
        w, _ = self._positions(x)
        with torch.no_grad():
            sq = torch.einsum("...,...d->d", w, x.detach().float().square()).cpu()
        self.input_sq = sq if self.input_sq is None else self.input_sq + sq


def _batch_positions(lm: LoadedModel, enc: dict, reduction: str) -> _Batch:
    labels, attn = enc["labels"], enc["attention_mask"]
    if "decoder_input_ids" in enc:  # T5: the decoder predicts labels in place; the encoder reads the prompt
        dec = enc["decoder_attention_mask"]
        lang = (labels != -100).long() if reduction == "loss" else dec
        weights = {"language": _row_weights(lang), "language_encoder": _row_weights(attn)}
        masks = {"language": dec.float(), "language_encoder": attn.float()}
    else:
        loss_pos = torch.zeros_like(attn)
        loss_pos[:, :-1] = (labels[:, 1:] != -100).long()
        lang = loss_pos if reduction == "loss" else attn
        weights = {"language": _row_weights(lang)}
        masks = {"language": attn.float()}
    if "qformer_attention_mask" in enc:
        qmask = enc["qformer_attention_mask"]
        weights["qformer_text"], masks["qformer_text"] = _row_weights(qmask), qmask.float()
    return _Batch(weights, masks, lm.family.vision_rows(lm.model, enc))


FEATURES_KEY = "image_features"


@contextmanager
def checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """Gradient checkpointing of every transformer layer for the duration of the block.

    transformers checkpoints a layer only while the layer is in training mode; only the layers'
    own flags are set, so dropout and every other submodule stay in eval mode.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers or not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(f"{type(model).__name__} does not support gradient checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also makes every input embedding require grad (for adapter training), which would
    # run the backward pass through encoders that hold no scored site; the scores need gradients
    # only from the first hooked activation on, so drop that
    model.disable_input_require_grads()
    modes = [m.training for m in layers]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()


def per_sample_loss(model: torch.nn.Module, enc: dict) -> torch.Tensor:
    """Mean caption-token NLL of each row of a teacher-forcing batch (float32, shape [rows]).

    Only the logits from the first loss position on are computed (``logits_to_keep``), which
    saves the vocabulary projection of the image and prompt tokens.
    """
    labels = enc["labels"]
    inputs = {k: v for k, v in enc.items() if k != "labels"}
    if "decoder_input_ids" in inputs:  # an encoder-decoder predicts the labels in place
        logits = model(**inputs, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        mask = (labels != -100).to(nll.dtype)
        return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    valid = labels[:, 1:] != -100
    first = int(valid.any(dim=0).nonzero()[0])
    keep = labels.shape[1] - first
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits[:, :-1].float()
    targets = labels[:, first + 1 :]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    mask = valid[:, first:].to(nll.dtype)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _check_options(method: str, alpha: float, reduction: str) -> None:
    if method not in SCORE_METHODS:
        raise InputError(f"unknown score method {method!r}; choose from {', '.join(SCORE_METHODS)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if reduction not in REDUCTIONS:
        raise InputError(f"unknown reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}")


def _validate(lm: LoadedModel, images, captions, batch_size, max_new_tokens) -> tuple[list, list | None]:
    if batch_size < 1 or max_new_tokens < 1:
        raise InputError("batch size and max new tokens must be positive")
    if not lm.family.takes_images:
        captions = captions or (list(images) if is_texts(images) else None)
        if not captions:
            raise InputError("a text-only model scores texts: pass them as captions (one per sample)")
        return [None] * len(captions), list(captions)
    images = list(images or [])
    if not images:
        raise InputError("no images to score; give at least one image")
    if captions is not None and len(captions) != len(images):
        raise InputError(f"{len(captions)} captions for {len(images)} images; give one caption per image")
    return images, None if captions is None else list(captions)


def score_inputs(
    lm: LoadedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    scope: str = "language.down_proj",
    method: str = "can",
    alpha: float = 1.0,
    reduction: str = "loss",
    seed: int = 0,
    gradient_checkpointing: bool = False,
) -> ScoreResult:
    """Score the sites in ``scope`` over ready-made teacher-forcing batches (``labels`` included).

    The engine behind ``score_neurons``; use it directly for inputs built without a processor. A
    batch may carry ``image_features`` (cached encodings, ``canprobe.features``) instead of pixels.
    Under ``torch.distributed`` each process passes its own batches and gets the scores of all.
    """
    _check_options(method, alpha, reduction)
    registry = SiteRegistry(lm.model)
    sites = registry.select(scope)
    current: list[_Batch] = []
    accs = [
        _Accumulator(s, method, float(alpha), lambda: current[0], lm.family.encoder_site(s.module_path)) for s in sites
    ]
    handles = []
    n = 0
    try:
        for acc in accs:
            handles.append(registry.hook(acc.site, acc.forward))
            if method == "wanda":
                linear = registry.weight(acc.site)
                handles.append(linear.register_forward_pre_hook(lambda _m, args, acc=acc: acc.weight_input(args[0])))
        with checkpointing(lm.model) if gradient_checkpointing else nullcontext():
            for enc in batches:
                cached = enc.pop(FEATURES_KEY, None)
                enc = to_model_inputs(enc, lm.model)
                current[:] = [_batch_positions(lm, enc, reduction)]
                inputs = enc if cached is None else features.model_inputs(lm, enc, cached)
                with torch.enable_grad():
                    loss = per_sample_loss(lm.model, inputs).sum()
                    if loss.requires_grad:
                        loss.backward()
                n += enc["input_ids"].shape[0]
                log.info("scored %d samples", n)
    finally:
        for h in handles:
            h.remove()
    n = int(distributed.all_reduce_sum(torch.tensor(n, dtype=torch.float64)))
    if n == 0:
        raise InputError("no samples to score")
    for acc in accs:
        acc.score = distributed.all_reduce_sum(acc.score)
        acc.signed = distributed.all_reduce_sum(acc.signed)
        if acc.input_sq is not None:
            acc.input_sq = distributed.all_reduce_sum(acc.input_sq)
    scores, signed = {}, {}
    gen = torch.Generator().manual_seed(seed)
    for acc in accs:
        name = acc.site.name
        signed[name] = acc.signed / n
        if method == "random":
            scores[name] = torch.rand(acc.site.size, generator=gen)
        elif method == "wanda":
            norm = (acc.input_sq / n).sqrt()
            weight = registry.weights(acc.site).detach().float().abs().cpu()
            scores[name] = weight @ norm if acc.site.weight_axis == "out" else weight.sum(dim=0) * norm
        else:
            scores[name] = acc.score / n
    config = {
        "method": method,
        "alpha": _alpha(method, alpha),
        "reduction": reduction,
        "positions": {**POSITIONS, "language": POSITIONS["language"][reduction]},
        "loss": "mean caption-token NLL per sample",
        "signed": "-sum_t a_t dL_i/da_t over non-pad positions, mean over samples",
        "scope": scope,
        "n_samples": n,
        "seed": seed,
        "model": lm.source,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "processes": distributed.world().size,
        "gradient_checkpointing": gradient_checkpointing,
    }
    return ScoreResult(scores, signed, sites, config)


def score_neurons(
    lm: LoadedModel,
    images: list[Image.Image] | None,
    scope: str = "language.down_proj",
    method: str = "can",
    alpha: float = 1.0,
    reduction: str = "loss",
    captions: list[str] | None = None,
    prompt: str | None = None,
    batch_size: int = 8,
    seed: int = 0,
    max_new_tokens: int = 24,
    gradient_checkpointing: bool = False,
    reuse_features: bool = True,
) -> ScoreResult:
    """Score every neuron of the sites in ``scope`` over the images (see the module docstring).

    Loss text: ``captions`` when given (reference captions, or the texts of a text-only model),
    otherwise the unmasked model's own greedy caption of each image. Images stream through in
    batches of ``batch_size``; scores do not depend on it. Under ``torch.distributed`` pass all
    the images to every process: each takes its shard.
    """
    _check_options(method, alpha, reduction)
    images, captions = _validate(lm, images, captions, batch_size, max_new_tokens)
    sites = SiteRegistry(lm.model).select(scope)  # fail on a bad scope before generating captions
    identity = score_identity(lm, images, scope, method, alpha, reduction, captions, prompt, seed, max_new_tokens)
    n_images = len(images)
    world = distributed.world()
    images, captions = world.take(images), world.take(captions)
    cache = None
    if reuse_features and features.reusable(lm, [s.name for s in sites]):
        cache = FeatureCache(lm, images, prompt, batch_size)
    if identity["loss_text"] == "self":
        feats = None if cache is None else cache.rows(range(len(images)))
        captions = generate_captions(lm, images, prompt, max_new_tokens, batch_size, feats)

    def batches() -> Iterator[dict]:
        for i in range(0, len(captions), batch_size):
            ims = images[i : i + batch_size] if lm.family.takes_images else None
            enc = teacher_forcing_inputs(lm.processor, lm.family, ims, captions[i : i + batch_size], prompt)
            if cache is not None:
                enc[FEATURES_KEY] = cache.rows(range(i, min(i + batch_size, len(captions))))
            yield enc

    result = score_inputs(lm, batches(), scope, method, alpha, reduction, seed, gradient_checkpointing)
    result.config.update(n_images=n_images if lm.family.takes_images else 0, batch_size=batch_size)
    result.config.update(identity)
    return result


def score_identity(
    lm: LoadedModel,
    images: list[Image.Image] | None,
    scope: str = "language.down_proj",
    method: str = "can",
    alpha: float = 1.0,
    reduction: str = "loss",
    captions: list[str] | None = None,
    prompt: str | None = None,
    seed: int = 0,
    max_new_tokens: int = 24,
) -> dict:
    """What decides a ranking's numbers (``canprobe.identity``); recorded in both score files.

    Same arguments and defaults as ``score_neurons``, so a folder's ranking can be checked against
    the scoring a command would do before it is reused.
    """
    if not lm.family.takes_images:  # a text-only model scores its texts, given either way
        captions = captions or (list(images) if is_texts(images) else None)
    source = "text" if not lm.family.takes_images else ("self" if captions is None else "reference")
    return {
        "weights": lm.fingerprint,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "images": images_fingerprint(list(images)) if lm.family.takes_images else None,
        "scope": scope,
        "method": method,
        "alpha": _alpha(method, alpha),
        "reduction": reduction,
        "seed": seed if method == "random" else None,
        "loss_text": source,
        "captions": texts_fingerprint(captions),
        "prompt": prompt,
        "max_new_tokens": max_new_tokens if source == "self" else None,
    }


def check_ranking_identity(ranking: pd.DataFrame, expected: dict, remedy: str) -> None:
    """A ranking about to be reused was scored the way ``expected`` says (``score_identity``)."""
    stored = ranking.attrs.get("config", {})
    where = ranking.attrs.get("path", "the ranking")
    check_same(f"{where} was scored differently: it", {k: stored.get(k) for k in expected}, expected, remedy)


def check_ranking_model(ranking: pd.DataFrame, lm: LoadedModel) -> None:
    """A ranking given to probe ``lm`` was scored on ``lm``'s weights, not on another model."""
    stored = ranking.attrs.get("config", {})
    where = ranking.attrs.get("path", "the ranking")
    if stored.get("weights") != lm.fingerprint:
        was = f"{stored.get('model')} (weights {stored.get('weights')})" if stored.get("weights") else "no model"
        raise InputError(
            f"{where} was scored on another model: it records {was}, this is {lm.source} (weights "
            f"{lm.fingerprint}); score this model with `canprobe score --model {lm.source}`"
        )


def _alpha(method: str, alpha: float) -> float | None:
    """The alpha a method uses: CAN's own, 0 for activation-only, none for the others."""
    return float(alpha) if method == "can" else (0.0 if method == "activation" else None)
