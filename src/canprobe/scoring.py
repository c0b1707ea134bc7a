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

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from canprobe import distributed, features, runfolder
from canprobe.ablation import to_model_inputs
from canprobe.captions import generate_captions, teacher_forcing_inputs
from canprobe.config import REDUCTIONS, SCORE_METHODS, default
from canprobe.errors import InputError
from canprobe.models import LoadedModel
from canprobe.sites import Site, SiteRegistry

log = logging.getLogger(__name__)

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
        """Write scores.safetensors and ranking.parquet into ``out_dir`` (each atomically)."""
        tensors = {}
        for s in self.sites:
            tensors[s.name] = self.scores[s.name].float().contiguous()
            tensors[f"{s.name}/signed"] = self.signed[s.name].float().contiguous()
        runfolder.write_scores(out_dir, tensors, {"config": self.config, "sites": [asdict(s) for s in self.sites]})
        runfolder.write_ranking(out_dir, self.ranking(), self.config)


def load_ranking(path: str | Path) -> pd.DataFrame:
    """Read ranking.parquet (a file or the folder holding it); the scoring config is in ``df.attrs``."""
    return runfolder.read_ranking(path)


def load_scores(path: str | Path) -> ScoreResult:
    """Read scores.safetensors (a file or the folder holding it) back into a ScoreResult."""
    tensors, meta = runfolder.read_scores(path)
    sites = [Site(**d) for d in meta["sites"]]
    scores = {s.name: tensors[s.name] for s in sites}
    signed = {s.name: tensors[f"{s.name}/signed"] for s in sites}
    return ScoreResult(scores, signed, sites, meta.get("config", {}))


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

    def __init__(self, site: Site, method: str, alpha: float, batch: Callable[[], _Batch]):
        self.site, self.method, self.alpha, self.batch = site, method, alpha, batch
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
        if comp in ("vision", "projector"):
            rows, t = a.shape[:2]
            if rows != b.vision_rows.numel():
                raise InputError(f"{self.site.name}: {rows} image rows for a batch of {b.vision_rows.numel()} crops")
            mask = torch.ones(rows, t, device=a.device)
            return b.vision_rows.to(a.device)[:, None] / t * mask, mask
        key = comp
        if comp == "qformer":
            key = "qformer_text" if self.site.kind in QFORMER_TEXT_KINDS else "qformer_query"
            if key == "qformer_query":
                mask = torch.ones(a.shape[:2], device=a.device)
                return _row_weights(mask), mask
        w, m = b.weights[key].to(a.device), b.masks[key].to(a.device)
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
                    self.score += torch.einsum("rt,rtn->n", w, a.detach().float().abs()).cpu()
        return _Tap.apply(a, self)

    def backward(self, a: torch.Tensor, g: torch.Tensor) -> None:
        """Accumulate the gradient-dependent sums from the activation and its gradient."""
        w, m = self._positions(a)
        with torch.no_grad():
            af, gf = a.float(), g.float()
            prod = af * gf
            self.signed -= torch.einsum("rt,rtn->n", m, prod).cpu()
            if self.method == "can" and self.alpha > 0:
                value = prod.abs_() if self.alpha == 1 else gf.abs().pow_(self.alpha).mul_(af.abs())
                self.score += torch.einsum("rt,rtn->n", w, value).cpu()
            elif self.method == "gradient":
                self.score += torch.einsum("rt,rtn->n", w, gf.abs()).cpu()

    def weight_input(self, x: torch.Tensor) -> None:
        """Wanda: accumulate the mean square of each input feature of the site's linear layer."""
        batch = self.batch()
        if batch is self._last_input:
            return
        self._last_input = batch
        w, _ = self._positions(x)
        with torch.no_grad():
            sq = torch.einsum("rt,rtd->d", w, x.detach().float().square()).cpu()
        self.input_sq = sq if self.input_sq is None else self.input_sq + sq


def _vision_rows(lm: LoadedModel, enc: dict) -> torch.Tensor:
    """Per crop row of the vision tower: 1 / crops of its sample (LLaVA-NeXT tiles images into crops)."""
    n = enc["input_ids"].shape[0]
    if "image_sizes" not in enc or lm.kind != "llava":
        return torch.ones(n)
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = lm.model.config
    counts = [
        image_size_to_num_patches(size.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for size in enc["image_sizes"]
    ]
    return torch.cat([torch.full((c,), 1.0 / c) for c in counts])


def _batch_positions(lm: LoadedModel, enc: dict, reduction: str) -> _Batch:
    labels, attn = enc["labels"], enc["attention_mask"]
    loss_pos = torch.zeros_like(attn)
    loss_pos[:, :-1] = (labels[:, 1:] != -100).long()
    lang = loss_pos if reduction == "loss" else attn
    weights = {"language": _row_weights(lang)}
    masks = {"language": attn.float()}
    if "qformer_attention_mask" in enc:
        qmask = enc["qformer_attention_mask"]
        weights["qformer_text"], masks["qformer_text"] = _row_weights(qmask), qmask.float()
    return _Batch(weights, masks, _vision_rows(lm, enc))


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
    if lm.kind == "decoder":
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
    registry = SiteRegistry.of(lm.model)
    sites = registry.select(scope)
    current: list[_Batch] = []
    accs = [_Accumulator(s, method, float(alpha), lambda: current[0]) for s in sites]
    handles = []
    n = 0
    try:
        for acc in accs:
            handles.append(registry.hook(acc.site, acc.forward))
            if method == "wanda":
                handles.append(registry.hook(acc.site, acc.weight_input, "weight_input"))
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
            weight = registry.weight(acc.site).weight.detach().float().abs().cpu()
            scores[name] = weight @ norm if acc.site.weight_axis == "out" else weight.sum(dim=0) * norm
        else:
            scores[name] = acc.score / n
    config = {
        "method": method,
        "alpha": float(alpha) if method == "can" else (0.0 if method == "activation" else None),
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
    batch_size: int = default("batch_size"),
    seed: int = default("seed"),
    max_new_tokens: int = default("max_new_tokens"),
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
    sites = SiteRegistry.of(lm.model).select(scope)  # fail on a bad scope before generating captions
    n_images = len(images)
    world = distributed.world()
    images, captions = world.take(images), world.take(captions)
    cache = None
    if reuse_features and lm.kind != "decoder" and features.reusable(lm, [s.name for s in sites]):
        cache = features.FeatureCache(lm, images, prompt, batch_size)
    if lm.kind == "decoder":
        source = "text"
    elif captions is None:
        source = "self"
        feats = None if cache is None else cache.rows(range(len(images)))
        captions = generate_captions(lm, images, prompt, max_new_tokens, batch_size, feats)
    else:
        source = "reference"

    def batches() -> Iterator[dict]:
        for i in range(0, len(captions), batch_size):
            ims = None if lm.kind == "decoder" else images[i : i + batch_size]
            enc = teacher_forcing_inputs(lm.processor, lm.kind, ims, captions[i : i + batch_size], prompt)
            if cache is not None:
                enc[FEATURES_KEY] = cache.rows(range(i, min(i + batch_size, len(captions))))
            yield enc

    result = score_inputs(lm, batches(), scope, method, alpha, reduction, seed, gradient_checkpointing)
    result.config.update(
        loss_text=source,
        n_images=0 if lm.kind == "decoder" else n_images,
        batch_size=batch_size,
        prompt=prompt,
        max_new_tokens=max_new_tokens if source == "self" else None,
    )
    return result
