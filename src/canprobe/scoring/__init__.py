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

The package: ``engine`` (the forward and backward pass with a tap per site), ``methods`` (one
class per score method: ``activation`` = CAN with alpha 0, ``gradient``, ``random``, ``wanda``),
and ``result`` (``ScoreResult``, the ranking, and their files). Every method also returns
``signed``: the first-order estimate of the loss change from zero-ablating the neuron at every
position, -sum_t a_t dL_i/da_t over non-pad positions, averaged over samples.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from canprobe import distributed, features
from canprobe.captions import generate_captions
from canprobe.config import REDUCTIONS, Generation, Model, Scoring, default
from canprobe.errors import InputError
from canprobe.identity import images_fingerprint, texts_fingerprint
from canprobe.inputs import is_texts, teacher_forcing_inputs
from canprobe.models import LoadedModel
from canprobe.runfolder import RANKING_COLUMNS, has_ranking
from canprobe.scoring import engine
from canprobe.scoring.engine import checkpointing, per_sample_loss
from canprobe.scoring.methods import Method, make_method
from canprobe.scoring.result import (
    ScoreResult,
    check_ranking_identity,
    check_ranking_model,
    load_folder_ranking,
    load_ranking,
    load_scores,
)
from canprobe.sites import SiteRegistry

__all__ = [
    "RANKING_COLUMNS",
    "ScoreResult",
    "check_ranking_identity",
    "check_ranking_model",
    "checkpointing",
    "load_folder_ranking",
    "load_ranking",
    "load_scores",
    "per_sample_loss",
    "score_inputs",
    "score_identity",
    "score_neurons",
]

POSITIONS = {
    "language": {"loss": "positions predicting a caption token", "all": "all non-pad positions"},
    "vision": "all positions of every crop (no caption positions)",
    "projector": "all image-token positions (no caption positions)",
    "qformer": "all query tokens (query branch); non-pad instruction tokens (text branch)",
}


def _options(method: str, alpha: float, seed: int, reduction: str) -> Method:
    if reduction not in REDUCTIONS:
        raise InputError(f"unknown reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}")
    return make_method(method, alpha, seed)


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
    scope: str = default("scope"),
    method: str = default("method"),
    alpha: float = default("alpha"),
    reduction: str = default("reduction"),
    seed: int = default("seed"),
    gradient_checkpointing: bool = default("gradient_checkpointing"),
) -> ScoreResult:
    """Score the sites in ``scope`` over ready-made teacher-forcing batches (``labels`` included).

    The engine behind ``score_neurons``; use it directly for inputs built without a processor. A
    batch may carry ``image_features`` (cached encodings, ``canprobe.features``) instead of pixels.
    Under ``torch.distributed`` each process passes its own batches and gets the scores of all.
    """
    score_method = _options(method, alpha, seed, reduction)
    registry = SiteRegistry.of(lm.model)
    sites = registry.select(scope)
    accs, n = engine.run(lm, batches, sites, score_method, reduction, gradient_checkpointing)
    scores = score_method.finish(accs, n, registry)
    signed = {acc.site.name: acc.signed / n for acc in accs}
    config = {
        **score_method.config(),
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
    scope: str = default("scope"),
    method: str = default("method"),
    alpha: float = default("alpha"),
    reduction: str = default("reduction"),
    captions: list[str] | None = None,
    prompt: str | None = None,
    batch_size: int = default("batch_size"),
    seed: int = default("seed"),
    max_new_tokens: int = default("max_new_tokens"),
    gradient_checkpointing: bool = default("gradient_checkpointing"),
    reuse_features: bool = default("reuse_features"),
) -> ScoreResult:
    """Score every neuron of the sites in ``scope`` over the images (see the module docstring).

    Loss text: ``captions`` when given (reference captions, or the texts of a text-only model),
    otherwise the unmasked model's own greedy caption of each image. Images stream through in
    batches of ``batch_size``; scores do not depend on it. Under ``torch.distributed`` pass all
    the images to every process: each takes its shard.
    """
    _options(method, alpha, seed, reduction)  # fail on bad options before generating captions
    images, captions = _validate(lm, images, captions, batch_size, max_new_tokens)
    sites = SiteRegistry.of(lm.model).select(scope)  # fail on a bad scope before generating captions
    identity = score_identity(
        lm,
        images,
        scope,
        method=method,
        alpha=alpha,
        reduction=reduction,
        captions=captions,
        prompt=prompt,
        seed=seed,
        max_new_tokens=max_new_tokens,
    )
    n_images = len(images)
    world = distributed.world()
    images, captions = world.take(images), world.take(captions)
    cache = None
    if reuse_features and features.reusable(lm, [s.name for s in sites]):
        cache = features.FeatureCache(lm, images, prompt, batch_size)
    if identity["loss_text"] == "self":
        feats = None if cache is None else cache.rows(range(len(images)))
        captions = generate_captions(lm, images, prompt, max_new_tokens, batch_size, feats)

    def batches() -> Iterator[dict]:
        for i in range(0, len(captions), batch_size):
            ims = images[i : i + batch_size] if lm.family.takes_images else None
            enc = teacher_forcing_inputs(lm.processor, lm.family, ims, captions[i : i + batch_size], prompt)
            if cache is not None:
                enc[engine.FEATURES_KEY] = cache.rows(range(i, min(i + batch_size, len(captions))))
            yield enc

    result = score_inputs(lm, batches(), scope, method, alpha, reduction, seed, gradient_checkpointing)
    result.config.update(n_images=n_images if lm.family.takes_images else 0, batch_size=batch_size)
    result.config.update(identity)
    return result


def score_sections(
    lm: LoadedModel,
    images: list,
    scope: str,
    scoring: Scoring,
    generation: Generation,
    model: Model,
    captions: list[str] | None = None,
) -> ScoreResult:
    """``score_neurons`` with its settings passed as the sections that hold them (the command line's call)."""
    return score_neurons(
        lm,
        images,
        scope,
        **_identity_options(scoring, generation, captions),
        batch_size=generation.batch_size,
        gradient_checkpointing=model.gradient_checkpointing,
        reuse_features=model.reuse_features,
    )


def _identity_options(scoring: Scoring, generation: Generation, captions: list[str] | None) -> dict:
    """The arguments of ``score_neurons`` that decide the numbers (``IDENTITY_OPTIONS``), from the sections."""
    return dict(
        method=scoring.method,
        alpha=scoring.alpha,
        reduction=scoring.reduction,
        captions=captions,
        prompt=generation.prompt,
        seed=scoring.seed,
        max_new_tokens=generation.max_new_tokens,  # loss captions are generated like the evaluated ones
    )


def folder_ranking(
    lm: LoadedModel,
    images: list,
    folder: Path,
    scope: str,
    scoring: Scoring,
    generation: Generation,
    model: Model,
    captions: list[str] | None = None,
) -> pd.DataFrame:
    """The ranking of ``folder``: read back when it was scored as asked, else scored and saved there (rank 0 writes).

    A ranking there that was scored otherwise (``score_identity``) is refused, naming the fields.
    """
    if has_ranking(folder):
        ranking = load_folder_ranking(folder)
        remedy = "resume with the same scope, scoring settings and images, or use a new --out folder"
        check_ranking_identity(
            ranking, score_identity(lm, images, scope, **_identity_options(scoring, generation, captions)), remedy
        )
        return ranking
    result = score_sections(lm, images, scope, scoring, generation, model, captions)
    if distributed.world().main:
        result.save(folder)
    return result.ranking()


IDENTITY_OPTIONS = ("method", "alpha", "reduction", "captions", "prompt", "seed", "max_new_tokens")


def score_identity(lm: LoadedModel, images: list[Image.Image] | None, scope: str = default("scope"), **options) -> dict:
    """What decides a ranking's numbers (``canprobe.identity``); recorded in both score files.

    ``options``: ``score_neurons``' own arguments that decide the numbers (``IDENTITY_OPTIONS``),
    with its defaults, so a folder's ranking can be checked against the scoring a command would do
    before it is reused.
    """
    unknown = sorted(options.keys() - set(IDENTITY_OPTIONS))
    if unknown:
        raise TypeError(f"score_identity got {', '.join(unknown)}; it takes {', '.join(IDENTITY_OPTIONS)}")
    defaults = inspect.signature(score_neurons).parameters
    method, alpha, reduction, captions, prompt, seed, max_new_tokens = (
        options.get(name, defaults[name].default) for name in IDENTITY_OPTIONS
    )
    if not lm.family.takes_images:  # a text-only model scores its texts, given either way
        captions = captions or (list(images) if is_texts(images) else None)
    source = "text" if not lm.family.takes_images else ("self" if captions is None else "reference")
    return {
        "weights": lm.fingerprint,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "images": images_fingerprint(list(images)) if lm.family.takes_images else None,
        "scope": scope,
        "method": method,
        "alpha": make_method(method, alpha, seed).config()["alpha"],
        "reduction": reduction,
        "seed": seed if method == "random" else None,
        "loss_text": source,
        "captions": texts_fingerprint(captions),
        "prompt": prompt,
        "max_new_tokens": max_new_tokens if source == "self" else None,
    }
