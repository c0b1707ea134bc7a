"""Reusing the image encoding across masks changes no caption and no metric, and encodes each image once."""

from __future__ import annotations

import pytest
import torch

from canprobe import features
from canprobe.captions import generate_captions
from canprobe.config import Generation
from canprobe.evaluation import MaskEvaluator
from canprobe.features import FeatureCache
from canprobe.models import load_model
from canprobe.organisms.scenes import make_scenes


@pytest.fixture(scope="module")
def clip():
    return load_model("toy-clip")


@pytest.fixture(scope="module", params=["toy-llava", "toy-instructblip"])
def lm(request):
    return load_model(request.param)


IMAGES = [im for im, _ in make_scenes(6, seed=17)]


def _needs_support(lm):
    if not features.supported(lm):
        import transformers

        pytest.skip(f"transformers {transformers.__version__} takes no pre-encoded image features")


def test_captions_from_cached_features_equal_captions_from_pixels(lm):
    _needs_support(lm)
    cache = FeatureCache(lm, IMAGES, Generation(batch_size=4))
    plain = generate_captions(lm, IMAGES, Generation(batch_size=4))
    cached = generate_captions(lm, IMAGES, Generation(batch_size=4), features=cache.rows(range(len(IMAGES))))
    assert cached == plain
    assert all(c.split()[0] == "a" for c in plain)  # real captions, not empty strings that match trivially


def test_only_language_masks_may_reuse_the_encoding(lm):
    language = ["language.layers.0.mlp.down_proj", "language.layers.3.mlp.gate_proj"]
    assert features.reusable(lm, language) == features.supported(lm)
    encoder_site = "vision.layers.0.mlp.fc1" if lm.kind == "llava" else "qformer.layers.0.intermediate_query"
    assert not features.reusable(lm, ["language.layers.0.mlp.down_proj", encoder_site])


def _masks(lm):
    from canprobe.sites import SiteRegistry

    registry = SiteRegistry(lm.model)
    down = registry.select("language.down_proj")
    vision = registry.select("vision.fc1")
    gen = torch.Generator().manual_seed(0)
    # language masks of growing size (up to every down_proj channel), and one on the vision tower
    return [{s.name: torch.randperm(s.size, generator=gen)[: s.size * j // 4] for s in down} for j in (1, 2, 4)] + [
        {vision[0].name: torch.arange(vision[0].size)}
    ]


def test_mask_metrics_are_the_same_with_and_without_reuse(lm, clip):
    masks = _masks(lm)
    on = MaskEvaluator(lm, IMAGES, clip, Generation(batch_size=8, max_new_tokens=16))
    off = MaskEvaluator(lm, IMAGES, clip, Generation(batch_size=8, max_new_tokens=16, reuse_features=False))
    for a, b in zip([on.evaluate_baseline()] + on.evaluate(masks), [off.evaluate_baseline()] + off.evaluate(masks)):
        assert [m.caption for m in a] == [m.caption for m in b]
        torch.testing.assert_close(
            torch.tensor([m.ppl for m in a]), torch.tensor([m.ppl for m in b]), rtol=1e-4, atol=0
        )
        torch.testing.assert_close(torch.tensor([m.clip for m in a]), torch.tensor([m.clip for m in b]))
    # the masks did something: the full down_proj mask and the vision mask change captions
    base = [m.caption for m in on.evaluate_baseline()]
    assert [m.caption for m in on.evaluate(masks[2:3])[0]] != base
    if features.supported(lm):
        assert on.features.encoded == len(IMAGES)  # once per image, for every mask and the PPL passes
    else:
        assert on.features is None
    assert off.features is None


def test_a_transformers_without_pre_encoded_inputs_falls_back_with_one_log_line(lm, clip, caplog, monkeypatch):
    """Before mm_encoder_outputs reached generate, its kwargs validation rejected it (transformers < 5.2x):
    the evaluator and scoring must then encode pixels, not crash."""
    import logging

    from canprobe.families import base
    from canprobe.scoring import score_neurons

    def rejects(model_kwargs, validate):
        if "mm_encoder_outputs" in model_kwargs:
            raise ValueError("The following `model_kwargs` are not used by the model: ['mm_encoder_outputs']")
        return validate(model_kwargs)

    reference = MaskEvaluator(lm, IMAGES[:2], clip, Generation(max_new_tokens=6, reuse_features=False))
    expected = [m.caption for m in reference.evaluate([["language.layers.0.mlp.down_proj:1"]])[0]]
    old = load_model(lm.source)
    monkeypatch.setattr(
        old.model, "_validate_model_kwargs", lambda kw, v=old.model._validate_model_kwargs: rejects(kw, v)
    )
    assert not base.validates_mm_encoder_outputs(old.model)
    with caplog.at_level(logging.INFO, logger="canprobe.features"):
        evaluator = MaskEvaluator(old, IMAGES[:2], clip, Generation(max_new_tokens=6))
        assert [m.caption for m in evaluator.evaluate([["language.layers.0.mlp.down_proj:1"]])[0]] == expected
        score_neurons(old, IMAGES[:2], generation=Generation(max_new_tokens=4), scope="language.down_proj")
    assert evaluator.features is None
    notes = [r for r in caplog.records if "pre-encoded" in r.getMessage()]
    assert len(notes) == 1, notes


def test_llava_next_evaluation_asks_before_reusing_features(tmp_path, clip):
    """LLaVA-NeXT's image encoder needs image_sizes; the evaluator reused features without asking (a crash)."""
    from tests.test_families import BUILDERS

    BUILDERS["llava_next"](tmp_path)
    lm = load_model(str(tmp_path))
    images = [IMAGES[0], IMAGES[1].resize((96, 40)), IMAGES[2].resize((40, 96))]
    mask = [["language.layers.0.mlp.down_proj:1", "language.layers.1.mlp.down_proj:3"]]
    on = MaskEvaluator(lm, images, clip, Generation(max_new_tokens=5))
    off = MaskEvaluator(lm, images, clip, Generation(max_new_tokens=5, reuse_features=False))
    for a, b in zip([on.evaluate_baseline()] + on.evaluate(mask), [off.evaluate_baseline()] + off.evaluate(mask)):
        assert [m.caption for m in a] == [m.caption for m in b]
        torch.testing.assert_close(
            torch.tensor([m.ppl for m in a]), torch.tensor([m.ppl for m in b]), rtol=1e-4, atol=0
        )
