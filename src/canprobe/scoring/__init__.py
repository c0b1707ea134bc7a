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
- a routed expert's units (``language.layers.N.mlp.experts.E.gate_proj``) exist only at the tokens
  routed to expert E: their score is the mean over the language positions above that were routed
  to E (all samples together), not a mean over samples.

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

from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from canprobe import distributed, features
from canprobe.captions import generate_captions
from canprobe.config import Generation, Model, Scoring, default
from canprobe.errors import InputError
from canprobe.identity import images_fingerprint, texts_fingerprint
from canprobe.inputs import is_texts, teacher_forcing_inputs
from canprobe.models import LoadedModel
from canprobe.runfolder import RANKING_COLUMNS, has_ranking
from canprobe.scoring import engine
from canprobe.scoring.engine import checkpointing, per_sample_loss
from canprobe.scoring.methods import make_method
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
    "experts": "a routed expert's units (language.experts.*): the language positions routed to that expert, "
    "mean over those tokens, not over samples",
}


def _validate(lm: LoadedModel, inputs, captions) -> tuple[list, list | None]:
    if not lm.family.takes_images:
        captions = captions or (list(inputs) if is_texts(inputs) else None)
        if not captions:
            raise InputError("a text-only model scores texts: pass them as captions (one per sample)")
        return [None] * len(captions), list(captions)
    inputs = list(inputs or [])
    if not inputs:
        raise InputError("no images to score; give at least one image")
    if captions is not None and len(captions) != len(inputs):
        raise InputError(f"{len(captions)} captions for {len(inputs)} images; give one caption per image")
    return inputs, None if captions is None else list(captions)


def score_inputs(
    lm: LoadedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    scope: str = default("scope"),
    scoring: Scoring = Scoring(),
    gradient_checkpointing: bool = default("gradient_checkpointing"),
) -> ScoreResult:
    """Score the sites in ``scope`` over ready-made teacher-forcing batches (``labels`` included).

    The engine behind ``score_neurons``; use it directly for inputs built without a processor
    (``scoring.loss_text`` plays no part: the batches carry their loss text). A batch may carry
    ``image_features`` (cached encodings, ``canprobe.features``) instead of pixels. Under
    ``torch.distributed`` each process passes its own batches and gets the scores of all.
    """
    score_method = make_method(scoring.method, scoring.alpha, scoring.seed)
    registry = SiteRegistry.of(lm.model)
    sites = registry.select(scope)
    accs, n = engine.run(lm, batches, sites, score_method, scoring.reduction, gradient_checkpointing)
    scores = score_method.finish(accs, n, registry)
    signed = {acc.site.name: acc.signed / n for acc in accs}
    config = {
        **score_method.config(),
        "reduction": scoring.reduction,
        "positions": {**POSITIONS, "language": POSITIONS["language"][scoring.reduction]},
        "loss": "mean caption-token NLL per sample",
        "signed": "-sum_t a_t dL_i/da_t over non-pad positions, mean over samples",
        "scope": scope,
        "n_samples": n,
        "seed": scoring.seed,
        "model": lm.source,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "processes": distributed.world().size,
        "gradient_checkpointing": gradient_checkpointing,
    }
    return ScoreResult(scores, signed, sites, config)


def score_neurons(
    lm: LoadedModel,
    inputs: list[Image.Image] | list[str] | None,
    scope: str = default("scope"),
    scoring: Scoring = Scoring(),
    generation: Generation = Generation(),
    captions: list[str] | None = None,
    gradient_checkpointing: bool = default("gradient_checkpointing"),
) -> ScoreResult:
    """Score every neuron of the sites in ``scope`` over the inputs (see the module doc).

    ``inputs``: images, or the texts of a text-only model (or None, its texts given as ``captions``).
    ``scoring``: the method, alpha, reduction and seed. Loss text: ``captions`` when given
    (reference captions, or the texts of a text-only model), otherwise the unmasked model's own
    greedy caption of each image, generated with ``generation``. Inputs stream through in batches
    of ``generation.batch_size``; scores do not depend on it. Under ``torch.distributed`` pass all
    the inputs to every process: each takes its shard.
    """
    make_method(scoring.method, scoring.alpha, scoring.seed)  # fail on bad options before generating captions
    inputs, captions = _validate(lm, inputs, captions)
    sites = SiteRegistry.of(lm.model).select(scope)  # fail on a bad scope before generating captions
    identity = score_identity(lm, inputs, scope, scoring, generation, captions)
    n_images = len(inputs)
    world = distributed.world()
    inputs, captions = world.take(inputs), world.take(captions)
    batch_size, prompt = generation.batch_size, generation.prompt
    cache = None
    if generation.reuse_features and features.reusable(lm, [s.name for s in sites]):
        cache = features.FeatureCache(lm, inputs, generation)
    if identity["loss_text"] == "self":
        feats = None if cache is None else cache.rows(range(len(inputs)))
        captions = generate_captions(lm, inputs, generation, feats)

    def batches() -> Iterator[dict]:
        for i in range(0, len(captions), batch_size):
            ims = inputs[i : i + batch_size] if lm.family.takes_images else None
            enc = teacher_forcing_inputs(lm.processor, lm.family, ims, captions[i : i + batch_size], prompt)
            if cache is not None:
                enc[engine.FEATURES_KEY] = cache.rows(range(i, min(i + batch_size, len(captions))))
            yield enc

    result = score_inputs(lm, batches(), scope, scoring, gradient_checkpointing)
    result.config.update(n_images=n_images if lm.family.takes_images else 0, batch_size=batch_size)
    result.config.update(identity)
    return result


def folder_ranking(
    lm: LoadedModel,
    inputs: list,
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
        check_ranking_identity(ranking, score_identity(lm, inputs, scope, scoring, generation, captions), remedy)
        return ranking
    result = score_neurons(lm, inputs, scope, scoring, generation, captions, model.gradient_checkpointing)
    if distributed.world().main:
        result.save(folder)
    return result.ranking()


def score_identity(
    lm: LoadedModel,
    inputs: list[Image.Image] | list[str] | None,
    scope: str = default("scope"),
    scoring: Scoring = Scoring(),
    generation: Generation = Generation(),
    captions: list[str] | None = None,
) -> dict:
    """What decides a ranking's numbers (``canprobe.identity``); recorded in both score files.

    The settings of ``scoring`` and ``generation`` that decide the numbers, as ``score_neurons``
    would use them, so a folder's ranking can be checked against the scoring a command would do
    before it is reused.
    """
    method, alpha, seed = scoring.method, scoring.alpha, scoring.seed
    if not lm.family.takes_images:  # a text-only model scores its texts, given either way
        captions = captions or (list(inputs) if is_texts(inputs) else None)
    source = "text" if not lm.family.takes_images else ("self" if captions is None else "reference")
    return {
        "weights": lm.fingerprint,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "images": images_fingerprint(list(inputs)) if lm.family.takes_images else None,
        "scope": scope,
        "method": method,
        "alpha": make_method(method, alpha, seed).config()["alpha"],
        "reduction": scoring.reduction,
        "seed": seed if method == "random" else None,
        "loss_text": source,
        "captions": texts_fingerprint(captions),
        "prompt": generation.prompt,
        "max_new_tokens": generation.max_new_tokens if source == "self" else None,
    }
