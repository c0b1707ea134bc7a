"""Evaluation under masks: captions, and the PPL and CLIP passes that measure them.

``MaskEvaluator`` ties masking, captioning and metrics together: it evaluates several neuron sets
in one batched generate (rows = masks x images) and caches what does not depend on the mask
(unmasked captions, CLIP image features, and the model's own image features while the masks stay
in the language model). Under ``torch.distributed`` each process evaluates its shard of the images
and every process receives all images' metrics, in order. PPL and CLIP are computed in float32
whatever the model dtype.
"""

from __future__ import annotations

import inspect
import logging
import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import torch
from PIL import Image

from canprobe import distributed, features
from canprobe.ablation import NeuronSpec, StandingMasks, ablate_rows, group_by_site
from canprobe.captions import generate_captions
from canprobe.config import PPL_SCORERS, Evaluation, Generation, Model
from canprobe.errors import InputError
from canprobe.faults import ChannelStats, ProtectedSet, RangeRestriction, parse_fault
from canprobe.features import FeatureCache
from canprobe.inputs import batches, caption_inputs, teacher_forcing_inputs, to_model_inputs
from canprobe.metrics import CaptionMetrics, word_stats
from canprobe.models import BUILTIN_MODELS, LoadedModel, load_model
from canprobe.sites import SiteRegistry

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def default_clip_model(model_name: str) -> str:
    """toy-clip for the organisms (they draw the same scenes), the paper's CLIP for real models."""
    return "toy-clip" if model_name in BUILTIN_MODELS else DEFAULT_CLIP


def load_scorers(
    lm: LoadedModel, model: Model, evaluation: Evaluation
) -> tuple[LoadedModel | None, LoadedModel | None]:
    """(the CLIP that scores ``lm``'s captions, the separate causal LM that ``evaluation.ppl_scorer`` names).

    None for what is not needed: a text-only model has no CLIP score; ``unmasked`` and ``masked``
    score with the probed model itself. Both load on ``model.device``.
    """
    clip = None
    if lm.family.takes_images:
        clip = load_model(evaluation.clip_model or default_clip_model(model.model), device=model.device)
    scorer = evaluation.ppl_scorer
    return clip, None if scorer in PPL_SCORERS else load_model(scorer, device=model.device)


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
    inputs: Sequence[Image.Image | str] | None,
    captions: list[str],
    generation: Generation = Generation(),
    image_features: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Perplexity of each caption as a continuation of the prompt (and image), float32; may hold inf/NaN.

    ``lm`` may be a vision-language model (``inputs`` are its images) or a text-only causal LM
    (``inputs`` None; or texts, each caption then scored as the continuation of its text). The
    prompt and the captions per pass are ``generation``'s. ``image_features``: cached encodings of
    the images (``canprobe.features``), one per caption.
    """
    if not lm.family.generates:
        raise InputError(f"{lm.source} is a {lm.kind} model; perplexity needs a language model")
    out, batch_size = [], generation.batch_size
    for start in range(0, len(captions), batch_size):
        caps = list(captions[start : start + batch_size])
        ims = list(inputs[start : start + batch_size]) if inputs is not None else None
        enc = teacher_forcing_inputs(lm.processor, lm.family, ims, caps, generation.prompt)
        enc = to_model_inputs(enc, lm.model)
        if image_features is not None:
            enc = features.model_inputs(lm, enc, image_features[start : start + batch_size])
        out.append(caption_nll(lm.model, enc))
    return torch.cat(out).exp() if out else torch.zeros(0)


def _output_cache(output):
    """The KV cache a forward pass returned (``cache`` in recent transformers, ``past_key_values`` before)."""
    output = output.get("language_model_outputs") or output  # InstructBLIP wraps its language model's outputs
    return next(output[key] for key in ("cache", "past_key_values") if key in output)


def _cache_kwarg(module: torch.nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class PrefixCache:
    """The unmasked model's KV cache of each image's prompt prefix, computed once per image.

    The PPL of a caption under the unmasked model conditions on the same prefix (image and prompt)
    whatever the caption, so each (image, caption) pair then costs a pass over the caption tokens
    only: the prefix's last logits predict the first caption token, the continuation the rest and
    the end token. The numbers equal the full teacher-forcing pass's up to float rounding.
    ``usable`` is False where prefixes differ in length across images (padded prompts).
    """

    def __init__(self, lm: LoadedModel, images: Sequence[Image.Image], generation: Generation):
        self.lm, self.images, self.prompt, self.batch_size = lm, list(images), generation.prompt, generation.batch_size
        self.text_model = lm.family.text_model(lm.model)  # None: this family has no cached-prefix path
        self._layers: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None  # per image, per layer (k, v)
        self._batches: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}  # as filled, per layer
        self._last: list[torch.Tensor] = []  # per image, the prefix's last logits (float32)
        self._mask: list[torch.Tensor] = []  # per image, the prefix's attention mask

    @torch.no_grad()
    def fill(self, features_of=None) -> bool:
        """Encode every image's prefix (once); ``features_of(ids)``: cached image encodings or None."""
        if self._layers is not None or self.text_model is None:
            return self.usable
        self._layers = []
        for start in range(0, len(self.images), self.batch_size):
            ids = list(range(start, min(start + self.batch_size, len(self.images))))
            enc = caption_inputs(self.lm, [self.images[i] for i in ids], self.prompt)
            feats = features_of(ids) if features_of is not None else None
            inputs = enc if feats is None else features.model_inputs(self.lm, enc, feats)
            out = self.lm.model(**inputs, use_cache=True)
            cache = _output_cache(out)
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            self._batches[tuple(ids)] = layers
            for row in range(len(ids)):
                self._layers.append([(k[row : row + 1], v[row : row + 1]) for k, v in layers])
                self._last.append(out.logits[row, -1].float())
                self._mask.append(enc["attention_mask"][row])
        return self.usable

    @property
    def usable(self) -> bool:
        return self.text_model is not None and self._layers is not None and len({m.shape[0] for m in self._mask}) == 1

    @torch.no_grad()
    def nll(self, image_ids: Sequence[int], captions: Sequence[str]) -> torch.Tensor:
        """Mean NLL (float32) of each caption and its end token after its image's prefix."""
        from transformers import DynamicCache

        tok = self.lm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out = []
        for start in range(0, len(captions), self.batch_size):
            rows = list(image_ids[start : start + self.batch_size])
            caption_ids = tok(list(captions[start : start + self.batch_size]), add_special_tokens=False)["input_ids"]
            width = max(len(c) for c in caption_ids)
            targets = torch.full((len(rows), width + 1), -100, dtype=torch.long)
            for r, c in enumerate(caption_ids):
                targets[r, : len(c) + 1] = torch.tensor(c + [tok.eos_token_id])
            targets = targets.to(self._last[rows[0]].device)  # one copy to the device, not one per row
            logits = torch.stack([self._last[i] for i in rows])[:, None]
            if width:
                ids = torch.where(targets[:, :width] >= 0, targets[:, :width], pad)
                prefix_mask = torch.stack([self._mask[i] for i in rows])
                mask = torch.cat([prefix_mask, (targets[:, :width] >= 0).to(prefix_mask.dtype)], dim=1)
                # the rows of a batch as filled (a search's usual call) take its cache as it is, without a copy
                layers = self._batches.get(tuple(rows)) or [
                    (torch.cat([self._layers[i][n][0] for i in rows]), torch.cat([self._layers[i][n][1] for i in rows]))
                    for n in range(len(self._layers[rows[0]]))
                ]
                cache = {_cache_kwarg(self.text_model): DynamicCache(layers)}
                step = self.text_model(input_ids=ids, attention_mask=mask, use_cache=True, **cache).logits
                logits = torch.cat([logits, step.float()], dim=1)
            keep = targets != -100
            picked = logits[keep]
            nll = -torch.log_softmax(picked, dim=-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
            total = torch.zeros(len(rows), dtype=torch.float32, device=nll.device)
            total.index_add_(0, keep.nonzero()[:, 0], nll)
            out.append((total / keep.sum(1)).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def _features(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features; earlier versions a tensor."""
    return (output if isinstance(output, torch.Tensor) else output.pooler_output).float()


class ClipScorer:
    """CLIP score ``100 * max(cos, 0)`` (torchmetrics' CLIPScore per pair), with image features cached."""

    def __init__(self, clip: LoadedModel, batch_size: int):
        if clip.family.generates:
            raise InputError(f"{clip.source} is a {clip.kind} model, not a CLIP model")
        self.clip = clip
        self.batch_size = batch_size
        config = clip.model.config
        self.max_length = getattr(getattr(config, "text_config", config), "max_position_embeddings", 77)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        feats = []
        for batch in batches(images, self.batch_size):
            enc = to_model_inputs(self.clip.processor(images=batch, return_tensors="pt"), self.clip.model)
            feats.append(_features(self.clip.model.get_image_features(pixel_values=enc["pixel_values"])).cpu())
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        feats = []
        tok = self.clip.processor.tokenizer
        for batch in batches(list(captions), self.batch_size):
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


class MaskEvaluator:
    """Captions and metrics of a fixed set of inputs under any number of neuron masks.

    ``inputs``: the images of a vision-language model, or the texts a text-only model continues
    (no CLIP score then: NaN); under ``torch.distributed`` this process works on its shard.
    ``generation``: the prompt, the caption length, the rows per generate (one row is one (mask,
    input) pair), the decoding (see ``generate_captions``; the same captions either way) and
    ``reuse_features``: encode each image once and reuse the encoding under every mask that leaves
    the image encoder alone (see ``canprobe.features``; the same results, only the cost differs).
    ``evaluation``: the fault every mask applies (a ``canprobe.faults`` spec) and ``ppl_scorer``:
    ``"unmasked"`` (the model without the mask scores the masked model's caption on the same image
    and prompt; the default, as in the paper), ``"masked"`` (the masked model scores its own
    caption), or a path/name of a separate causal LM (``ppl_lm`` when already loaded) that scores
    the caption text alone. ``stats``: the clean statistics the fault needs (``fault_stats``);
    ``protections``: applied to every mask unless ``evaluate`` is given others.
    ``reuse_prefix``: the unmasked scorer encodes each image's prefix once (``PrefixCache``) and
    scores every caption on it (the same PPL up to float rounding), for families that continue a
    cached prefix (``Family.text_model``). Compiled decoding keeps the masks' hooks installed for
    the evaluator's life (``StandingMasks`` on the sites given to ``reserve`` or met so far), so a
    new mask reuses the compiled step; faults that act on weights or draw noise, and calls with
    protections, decode with the static cache uncompiled.
    """

    def __init__(
        self,
        lm: LoadedModel,
        inputs: Sequence[Image.Image | str],
        clip: LoadedModel | None,
        generation: Generation = Generation(),
        evaluation: Evaluation = Evaluation(),
        *,
        ppl_lm: LoadedModel | None = None,
        stats: Mapping[str, ChannelStats] | None = None,
        protections: Sequence[ProtectedSet | RangeRestriction] = (),
        reuse_prefix: bool = True,
    ):
        if not inputs:
            raise InputError("no images to evaluate")
        ppl_scorer = evaluation.ppl_scorer
        if ppl_scorer not in PPL_SCORERS and ppl_lm is None:
            ppl_lm = load_model(ppl_scorer)
        if ppl_lm is not None and (ppl_lm.family.takes_images or not ppl_lm.family.generates):
            raise InputError(f"--ppl-scorer {ppl_scorer} is a {ppl_lm.kind} model; give a causal LM")
        self.world = distributed.world()
        self.n_images = len(inputs)
        self.lm, self.inputs, self.generation, self.evaluation = lm, self.world.take(inputs), generation, evaluation
        self.ppl_lm, self.stats, self.protections = ppl_lm, stats, tuple(protections)
        fault = parse_fault(evaluation.fault)
        self._standing_ok = generation.decoding == "compiled" and fault.acts_on == "activation" and fault.compiles
        self._reserved: list[str] = []
        self._standing: StandingMasks | None = None
        if lm.family.takes_images and clip is None:
            raise InputError("evaluating a vision-language model needs a CLIP model for the CLIP score")
        self.clip = ClipScorer(clip, generation.batch_size) if lm.family.takes_images else None
        self._image_features: torch.Tensor | None = None
        self._baseline: list[str] | None = None
        self._ppl_cache: dict[tuple[int, str], float] = {}
        self._prompts: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
        reuse = generation.reuse_features and features.supported(lm)
        self.features = FeatureCache(lm, self.inputs, generation) if reuse else None
        use_prefix = reuse_prefix and ppl_scorer == "unmasked" and lm.family.takes_images
        self.prefix = PrefixCache(lm, self.inputs, generation) if use_prefix else None
        self._registry = SiteRegistry.of(lm.model)

    def reserve(self, sites: Iterable[str]) -> None:
        """Sites the masks may touch (e.g. a search's scope): under compiled decoding their hooks are
        installed once, so masks within them never retrace the compiled step; a site met later costs one."""
        new = [name for name in sites if name not in self._reserved]
        if new:
            self._reserved += new
            self.close()

    def close(self) -> None:
        """Remove the standing hooks now (otherwise when the evaluator is collected)."""
        if self._standing is not None:
            self._release()
            self._standing = None

    def _standing_masks(self) -> StandingMasks:
        if self._standing is None:
            fault, rows = self.evaluation.fault, self.generation.batch_size
            standing = StandingMasks(self.lm, self._reserved, rows, fault, self.stats)
            self._release = weakref.finalize(self, standing.__exit__, None, None, None)
            self._standing = standing.__enter__()
        return self._standing

    def _features(self, image_ids: Sequence[int], reusable: bool = True) -> list[torch.Tensor] | None:
        """Cached encodings of these (local) images, or None: no cache, or a mask touches the encoder."""
        return self.features.rows(image_ids) if self.features is not None and reusable else None

    def _prompt(self, image_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """The prompt inputs of a batch of these (local) images without the encoder's (pixels): with cached
        features nothing else reaches the model, so the processor runs once per batch, not once per mask."""
        key = tuple(image_ids)
        if key not in self._prompts:
            enc = caption_inputs(self.lm, [self.inputs[i] for i in key], self.generation.prompt)
            self._prompts[key] = {k: v for k, v in enc.items() if k not in self.lm.family.encoder_inputs}
        return self._prompts[key]

    @property
    def image_features(self) -> torch.Tensor:
        if self._image_features is None:
            self._image_features = self.clip.image_features(self.inputs)
        return self._image_features

    def baseline_captions(self) -> list[str]:
        """The unmasked model's captions of this process's images (computed once; see ``set_baseline``)."""
        if self._baseline is None:
            ids = list(range(len(self.inputs)))
            if self._standing_ok:
                self._standing_masks()  # installed first, so masked evaluations reuse this trace's cache
            self._baseline = generate_captions(self.lm, self.inputs, self.generation, self._features(ids))
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
        clip = self._clip_scores(list(range(len(captions))), captions)
        return distributed.gather(self._assemble([(0, i) for i in range(len(captions))], captions, ppl, clip, 1)[0])

    def evaluate(
        self, masks: Sequence[NeuronSpec], protections: Sequence[ProtectedSet | RangeRestriction] | None = None
    ) -> list[list[CaptionMetrics]]:
        """Per mask, metrics of all images in order; all masks share batched generates through per-row masks.

        The evaluation's fault applies to every mask, with ``protections`` (default: the evaluator's) in place.
        """
        protections = self.protections if protections is None else tuple(protections)
        rows = [(m, i) for m in range(len(masks)) for i in range(len(self.inputs))]
        captions, masked_ppl = self._generate(masks, rows, protections)
        ppl = masked_ppl if masked_ppl is not None else self._score_ppl([i for _, i in rows], captions)
        clip = self._clip_scores([i for _, i in rows], captions)
        local = self._assemble(rows, captions, ppl, clip, len(masks))
        return [distributed.gather(per_mask) for per_mask in local]

    def masked_captions(self, masks: Sequence[NeuronSpec]) -> list[list[str]]:
        """Per mask, the captions of this process's images under it (no metrics): what ``evaluate`` generates."""
        n = len(self.inputs)
        captions, _ = self._generate(masks, [(m, i) for m in range(len(masks)) for i in range(n)], self.protections)
        return [captions[m * n : (m + 1) * n] for m in range(len(masks))]

    def _generate(self, masks, rows, protections) -> tuple[list[str], torch.Tensor | None]:
        """Captions of ``rows`` (mask, image) in batches of per-row masks, and their PPL if the masked model scores."""
        # per mask, once: whether it leaves the image encoder alone (then the cached features hold)
        clamped = [name for p in protections if isinstance(p, RangeRestriction) for name in p.stats]
        reusable = [features.reusable(self.lm, [*group_by_site(self._registry, mask), *clamped]) for mask in masks]
        standing = None
        if self._standing_ok and not protections:
            self.reserve(name for mask in masks for name in group_by_site(self._registry, mask))
            standing = self._standing_masks()
        generation = self.generation
        if generation.decoding == "compiled" and standing is None:
            generation = replace(generation, decoding="static")
        captions: list[str] = []
        masked_ppl: list[torch.Tensor] = []
        for chunk in batches(rows, generation.batch_size):  # each chunk one generate and one PPL pass
            ims = [self.inputs[i] for _, i in chunk]
            chunk_masks = [masks[m] for m, _ in chunk]
            ids = [i for _, i in chunk]
            feats = self._features(ids, all(reusable[m] for m, _ in chunk))
            prompts = None if feats is None else [self._prompt(ids)]
            if standing is not None:
                masking = standing.loaded(chunk_masks)
            else:
                masking = ablate_rows(self.lm, chunk_masks, self.evaluation.fault, self.stats, protections)
            with masking:
                caps = generate_captions(self.lm, ims, generation, feats, prompts)
                if self.evaluation.ppl_scorer == "masked":
                    masked_ppl.append(caption_ppl(self.lm, ims, caps, generation, feats))
            captions += caps
        return captions, torch.cat(masked_ppl) if masked_ppl else None

    def _score_ppl(self, image_ids: list[int], captions: list[str]) -> torch.Tensor:
        """PPL under the mask-independent scorer, each distinct (image, caption) scored once per evaluator.

        Most captions at small k repeat the unmasked ones, and collapsed ones repeat each other, so
        the cache removes most scoring passes.
        """
        scorer = self.lm if self.ppl_lm is None else self.ppl_lm
        todo = [key for key in dict.fromkeys(zip(image_ids, captions)) if key not in self._ppl_cache]
        if todo:
            ids, caps = [i for i, _ in todo], [c for _, c in todo]
            if self.prefix is not None and self.prefix.fill(self._features):
                values = self.prefix.nll(ids, caps).exp()
            else:  # a separate causal LM scores the caption text alone
                generation = self.generation if self.ppl_lm is None else replace(self.generation, prompt=None)
                feats = self._features(ids) if self.ppl_lm is None else None
                values = caption_ppl(scorer, [self.inputs[i] for i in ids], caps, generation, feats)
            self._ppl_cache.update(zip(todo, values.tolist()))
        return torch.tensor([self._ppl_cache[key] for key in zip(image_ids, captions)], dtype=torch.float32)

    def _clip_scores(self, image_ids: list[int], captions: list[str]) -> torch.Tensor:
        if self.clip is None:
            return torch.full((len(captions),), math.nan)
        return self.clip.score(self.image_features[image_ids], captions)

    def _assemble(self, rows, captions, ppl, clip, n_masks) -> list[list[CaptionMetrics]]:
        base = self.baseline_captions()
        out: list[list[CaptionMetrics]] = [[] for _ in range(n_masks)]
        for (m, i), cap, p, c in zip(rows, captions, ppl.tolist(), clip.tolist()):
            length, distinct = word_stats(cap)
            out[m].append(CaptionMetrics(cap, p, c, length, distinct, cap == base[i]))
        return out
