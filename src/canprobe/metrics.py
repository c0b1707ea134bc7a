"""Collapse metrics: how good is a caption, and how good are the captions under a mask.

Per caption: perplexity (exp of the mean token NLL of caption + end token) under a scoring model,
CLIP score ``100 * max(cos(image, caption), 0)``, length in words, distinct-word ratio, and exact
match with the unmasked model's caption. Per evaluated mask: median PPL with the count of
non-finite values, and means of the rest. Everything is computed in float32 whatever the model
dtype; infinite or NaN perplexities are recorded as data and never raise.

``MaskEvaluator`` ties masking, captioning and metrics together: it evaluates several neuron sets
in one batched generate (rows = masks x images) and caches what does not depend on the mask
(unmasked captions, CLIP image features, and the model's own image features while the masks stay
in the language model). Under ``torch.distributed`` each process evaluates its shard of the images
and every process receives all images' metrics, in order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from canprobe import distributed, features
from canprobe.ablation import NeuronSpec, ablate_rows, group_by_site, to_model_inputs
from canprobe.captions import _batches, generate_captions, teacher_forcing_inputs
from canprobe.config import PPL_SCORERS, default
from canprobe.errors import InputError
from canprobe.models import BUILTIN_MODELS, LoadedModel, load_model
from canprobe.sites import SiteRegistry

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def default_clip_model(model_name: str) -> str:
    """toy-clip for the organisms (they draw the same scenes), the paper's CLIP for real models."""
    return "toy-clip" if model_name in BUILTIN_MODELS else DEFAULT_CLIP


@torch.no_grad()
def caption_nll(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-row mean NLL (float32) of the tokens that ``labels`` marks, from teacher-forcing inputs."""
    enc = to_model_inputs(inputs, model)
    labels = enc.pop("labels")
    logits = model(**enc).logits
    logits = logits[:, -labels.shape[1] :]  # families that prepend query tokens return longer logits
    target = labels[:, 1:]
    keep = target != -100
    picked = logits[:, :-1][keep].float()  # only caption positions: (tokens, vocab), not (B, T, vocab)
    nll = -torch.log_softmax(picked, dim=-1).gather(-1, target[keep].unsqueeze(-1)).squeeze(-1)
    rows = keep.nonzero()[:, 0]
    total = torch.zeros(labels.shape[0], dtype=torch.float32, device=nll.device).index_add_(0, rows, nll)
    return (total / keep.sum(1).clamp(min=1)).cpu()


def caption_ppl(
    lm: LoadedModel,
    images: list[Image.Image] | None,
    captions: list[str],
    prompt: str | None = None,
    batch_size: int = default("batch_size"),
    image_features: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Perplexity of each caption as a continuation of the prompt (and image), float32; may hold inf/NaN.

    ``lm`` may be a vision-language model (images required) or a text-only causal LM (images ignored).
    ``image_features``: cached encodings of the images (``canprobe.features``), one per caption.
    """
    if lm.kind not in ("llava", "instructblip", "decoder"):
        raise InputError(f"{lm.source} is a {lm.kind} model; perplexity needs a language model")
    out = []
    for start in range(0, len(captions), batch_size):
        caps = list(captions[start : start + batch_size])
        ims = None if lm.kind == "decoder" else list(images[start : start + batch_size])
        enc = to_model_inputs(teacher_forcing_inputs(lm.processor, lm.kind, ims, caps, prompt), lm.model)
        if image_features is not None:
            enc = features.model_inputs(lm, enc, image_features[start : start + batch_size])
        out.append(caption_nll(lm.model, enc))
    return torch.cat(out).exp() if out else torch.zeros(0)


def _features(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features; earlier versions a tensor."""
    return (output if isinstance(output, torch.Tensor) else output.pooler_output).float()


class ClipScorer:
    """CLIP score ``100 * max(cos, 0)`` (torchmetrics' CLIPScore per pair), with image features cached."""

    def __init__(self, clip: LoadedModel, batch_size: int = default("batch_size")):
        if clip.kind != "clip":
            raise InputError(f"{clip.source} is a {clip.kind} model, not a CLIP model")
        self.clip = clip
        self.batch_size = batch_size
        config = clip.model.config
        self.max_length = getattr(getattr(config, "text_config", config), "max_position_embeddings", 77)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        feats = []
        for batch in _batches(images, self.batch_size):
            enc = to_model_inputs(self.clip.processor(images=batch, return_tensors="pt"), self.clip.model)
            feats.append(_features(self.clip.model.get_image_features(pixel_values=enc["pixel_values"])).cpu())
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        feats = []
        tok = self.clip.processor.tokenizer
        for batch in _batches(list(captions), self.batch_size):
            enc = tok(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            enc = to_model_inputs(enc, self.clip.model)
            out = self.clip.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            feats.append(_features(out).cpu())
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    def score(self, image_features: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Row i: image_features[i] against captions[i]."""
        cos = (image_features * self.text_features(captions)).sum(-1)
        return 100 * cos.clamp(min=0)

    def __call__(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        return self.score(self.image_features(images), captions)


def word_stats(caption: str) -> tuple[int, float]:
    """Length in words and distinct-word ratio (0 for an empty caption: nothing said, no variety)."""
    words = caption.lower().split()
    return len(words), (len(set(words)) / len(words) if words else 0.0)


@dataclass(frozen=True)
class CaptionMetrics:
    """Metrics of one generated caption."""

    caption: str
    ppl: float
    clip: float
    length: int
    distinct: float
    exact_match: bool


@dataclass(frozen=True)
class MetricSummary:
    """Aggregate over the images of one evaluated mask; non-finite PPLs are counted, not averaged."""

    n_images: int
    ppl_median: float
    ppl_nonfinite: int
    clip_mean: float
    length_mean: float
    distinct_mean: float
    exact_match: float

    @classmethod
    def of(cls, metrics: Sequence[CaptionMetrics]) -> MetricSummary:
        """Median PPL over the non-NaN values (inf is an honest order statistic), means of the rest."""
        if not metrics:
            raise InputError("no captions to summarize")
        ppl = torch.tensor([m.ppl for m in metrics], dtype=torch.float64)
        ppl_ok = ppl[~ppl.isnan()]
        n = len(metrics)
        return cls(
            n_images=n,
            ppl_median=_median(ppl_ok),
            ppl_nonfinite=int((~ppl.isfinite()).sum()),
            clip_mean=_nanmean([m.clip for m in metrics]),
            length_mean=sum(m.length for m in metrics) / n,
            distinct_mean=sum(m.distinct for m in metrics) / n,
            exact_match=sum(m.exact_match for m in metrics) / n,
        )


def _median(values: torch.Tensor) -> float:
    """The midpoint median (mean of the two middle values), so it does not depend on ties' order."""
    if values.numel() == 0:
        return math.nan
    s = values.sort().values
    mid = s.numel() // 2
    return float(s[mid]) if s.numel() % 2 else float((s[mid - 1] + s[mid]) / 2)


def _nanmean(values: list[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else math.nan


class MaskEvaluator:
    """Captions and metrics of a fixed image set under any number of neuron masks.

    ``ppl_scorer``: ``"unmasked"`` (the model without the mask scores the masked model's caption on
    the same image and prompt; the default, as in the paper), ``"masked"`` (the masked model scores
    its own caption), or a path/name of a separate causal LM that scores the caption text alone.
    ``batch_size`` counts generation rows; one row is one (mask, image) pair. ``reuse_features``:
    encode each image once and reuse the encoding under every mask that leaves the image encoder
    alone (see ``canprobe.features``); results are the same either way, only the cost differs.
    ``images`` are all the images; under ``torch.distributed`` this process works on its shard.
    """

    def __init__(
        self,
        lm: LoadedModel,
        images: list[Image.Image],
        clip: LoadedModel,
        ppl_scorer: str = default("ppl_scorer"),
        prompt: str | None = None,
        max_new_tokens: int = default("max_new_tokens"),
        batch_size: int = default("batch_size"),
        kind: str = default("ablation"),
        means: Mapping[str, torch.Tensor] | None = None,
        ppl_lm: LoadedModel | None = None,
        reuse_features: bool = True,
    ):
        if not images:
            raise InputError("no images to evaluate")
        if max_new_tokens <= 0 or batch_size <= 0:
            raise InputError("max new tokens and batch size must be positive")
        if ppl_scorer not in PPL_SCORERS and ppl_lm is None:
            ppl_lm = load_model(ppl_scorer)
        if ppl_lm is not None and ppl_lm.kind != "decoder":
            raise InputError(f"--ppl-scorer {ppl_scorer} is a {ppl_lm.kind} model; give a causal LM")
        self.world = distributed.world()
        self.n_images = len(images)
        self.lm, self.images, self.prompt = lm, self.world.take(images), prompt
        self.ppl_scorer, self.ppl_lm = ppl_scorer, ppl_lm
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.kind, self.means = kind, means
        self.clip = ClipScorer(clip, batch_size)
        self._image_features: torch.Tensor | None = None
        self._baseline: list[str] | None = None
        self._ppl_cache: dict[tuple[int, str], float] = {}
        self.features = features.FeatureCache(lm, self.images, prompt, batch_size) if reuse_features else None
        self._registry = SiteRegistry.of(lm.model)

    def _features(self, image_ids: Sequence[int], reusable: bool = True) -> list[torch.Tensor] | None:
        """Cached encodings of these (local) images, or None: no cache, or a mask touches the encoder."""
        return self.features.rows(image_ids) if self.features is not None and reusable else None

    @property
    def image_features(self) -> torch.Tensor:
        if self._image_features is None:
            self._image_features = self.clip.image_features(self.images)
        return self._image_features

    def baseline_captions(self) -> list[str]:
        """The unmasked model's captions of this process's images (computed once; see ``set_baseline``)."""
        if self._baseline is None:
            ids = list(range(len(self.images)))
            self._baseline = generate_captions(
                self.lm, self.images, self.prompt, self.max_new_tokens, self.batch_size, self._features(ids)
            )
        return self._baseline

    def set_baseline(self, captions: list[str]) -> None:
        """Restore the unmasked captions of all images (a resumed search stores them at k = 0)."""
        if len(captions) != self.n_images:
            raise InputError(f"{len(captions)} stored baseline captions for {self.n_images} images")
        self._baseline = self.world.take(captions)

    def evaluate_baseline(self) -> list[CaptionMetrics]:
        """Metrics of the unmasked captions (k = 0) of all images: the reference every threshold is relative to."""
        captions = self.baseline_captions()
        ppl = self._score_ppl(list(range(len(captions))), captions)
        clip = self.clip.score(self.image_features, captions)
        return distributed.gather(self._assemble([(0, i) for i in range(len(captions))], captions, ppl, clip, 1)[0])

    def evaluate(self, masks: Sequence[NeuronSpec]) -> list[list[CaptionMetrics]]:
        """Per mask, metrics of all images in order; all masks share batched generates through per-row masks."""
        n = len(self.images)
        rows = [(m, i) for m in range(len(masks)) for i in range(n)]
        # per mask, once: whether it leaves the image encoder alone (then the cached features hold)
        reusable = [features.reusable(self.lm, group_by_site(self._registry, mask)) for mask in masks]
        captions: list[str] = []
        masked_ppl: list[torch.Tensor] = []
        for chunk in _batches(rows, self.batch_size):
            ims = [self.images[i] for _, i in chunk]
            chunk_masks = [masks[m] for m, _ in chunk]
            feats = self._features([i for _, i in chunk], all(reusable[m] for m, _ in chunk))
            with ablate_rows(self.lm, chunk_masks, kind=self.kind, means=self.means):
                caps = generate_captions(self.lm, ims, self.prompt, self.max_new_tokens, len(chunk), feats)
                if self.ppl_scorer == "masked":
                    masked_ppl.append(caption_ppl(self.lm, ims, caps, self.prompt, len(chunk), feats))
            captions += caps
        ppl = torch.cat(masked_ppl) if masked_ppl else self._score_ppl([i for _, i in rows], captions)
        clip = self.clip.score(self.image_features[[i for _, i in rows]], captions)
        local = self._assemble(rows, captions, ppl, clip, len(masks))
        return [distributed.gather(per_mask) for per_mask in local]

    def _score_ppl(self, image_ids: list[int], captions: list[str]) -> torch.Tensor:
        """PPL under the mask-independent scorer, each distinct (image, caption) scored once per evaluator.

        Most captions at small k repeat the unmasked ones, and collapsed ones repeat each other, so
        the cache removes most scoring passes.
        """
        scorer = self.lm if self.ppl_lm is None else self.ppl_lm
        todo = [key for key in dict.fromkeys(zip(image_ids, captions)) if key not in self._ppl_cache]
        if todo:
            prompt = self.prompt if self.ppl_lm is None else None
            images = [self.images[i] for i, _ in todo]
            feats = self._features([i for i, _ in todo]) if self.ppl_lm is None else None
            values = caption_ppl(scorer, images, [c for _, c in todo], prompt, self.batch_size, feats)
            self._ppl_cache.update(zip(todo, values.tolist()))
        return torch.tensor([self._ppl_cache[key] for key in zip(image_ids, captions)], dtype=torch.float32)

    def _assemble(self, rows, captions, ppl, clip, n_masks) -> list[list[CaptionMetrics]]:
        base = self.baseline_captions()
        out: list[list[CaptionMetrics]] = [[] for _ in range(n_masks)]
        for (m, i), cap, p, c in zip(rows, captions, ppl.tolist(), clip.tolist()):
            length, distinct = word_stats(cap)
            out[m].append(CaptionMetrics(cap, p, c, length, distinct, cap == base[i]))
        return out
