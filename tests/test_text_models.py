"""Plain decoder LMs under masks: they continue the given texts, judged on PPL and text statistics (no CLIP)."""

from __future__ import annotations

import math

import pytest
import torch

from canprobe.captions import generate_captions
from canprobe.config import CollapseCriterion, Evaluation, Generation
from canprobe.evaluation import MaskEvaluator, caption_ppl
from canprobe.metrics import MetricSummary
from canprobe.models import load_model
from tests.test_families import BUILDERS

TEXTS = ["a small red car", "a large blue boat on the left with a white background", "a tree", "a green fish"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    BUILDERS["llama"](out)
    return load_model(str(out))


def test_texts_of_different_lengths_continue_and_score_as_they_would_alone(lm):
    together = generate_captions(lm, TEXTS, Generation(max_new_tokens=5, batch_size=4))
    alone = [generate_captions(lm, [t], Generation(max_new_tokens=5))[0] for t in TEXTS]
    assert together == alone and all(together)
    ppl = caption_ppl(lm, TEXTS, together, Generation(batch_size=4))
    one_by_one = torch.cat([caption_ppl(lm, [t], [c]) for t, c in zip(TEXTS, together)])
    torch.testing.assert_close(ppl, one_by_one, rtol=1e-4, atol=0)
    # the text is the condition: the same continuation after another text has another PPL
    assert not torch.allclose(caption_ppl(lm, TEXTS[1:2], together[:1]), ppl[:1])


def test_evaluator_needs_no_clip_and_reports_nan_clip(lm):
    evaluator = MaskEvaluator(lm, TEXTS, None, Generation(max_new_tokens=5), Evaluation(ppl_scorer="masked"))
    base = evaluator.evaluate_baseline()
    everything = {f"language.layers.{i}.mlp.down_proj": torch.arange(16) for i in range(2)}
    (masked,) = evaluator.evaluate([everything])
    assert all(math.isnan(m.clip) for m in base + masked)
    assert all(math.isfinite(m.ppl) for m in base)
    assert [m.ppl for m in base] != [m.ppl for m in masked]  # the masked model scored its own continuations


def _summary(ppl: float, distinct: float, clip: float = math.nan) -> MetricSummary:
    return MetricSummary.from_dict({"n_images": 4, "ppl_median": ppl, "clip_mean": clip, "distinct_mean": distinct})


def test_text_collapse_is_judged_on_ppl_and_distinct_words():
    criterion = CollapseCriterion()
    base = _summary(10.0, 0.9)
    assert criterion.stage(_summary(10.0, 0.9), base) == "healthy"
    assert criterion.stage(_summary(10.0, 0.7), base) == "degraded"  # less varied: below 90% of 0.9
    assert criterion.stage(_summary(30.0, 0.9), base) == "degraded"
    assert criterion.stage(_summary(1000.0, 0.9), base) == "degraded"  # PPL alone is not collapse
    assert criterion.stage(_summary(1000.0, 0.4), base) == "collapsed"
    # with a CLIP score the distinct ratio plays no part
    assert criterion.stage(_summary(1000.0, 0.1, clip=30.0), _summary(10.0, 0.9, clip=31.0)) == "degraded"
    assert "distinct-word ratio" in criterion.describe()
    assert [criterion.quality(x) for x in (base.clip_mean, 31.0)] == ["distinct_mean", "clip_mean"]
    text = criterion.describe("distinct_mean")
    assert "mean distinct-word ratio <" in text and "CLIP <" not in text


def test_a_whole_run_on_a_text_only_model(cli, lm, scene_dir, tmp_path):
    """`canprobe run` on a decoder: it continues the set's captions; the report reads NaN CLIP as data."""
    import json

    args = ["--model", lm.source, "--images", scene_dir, "--out", tmp_path / "run", "--categories", "car,fish"]
    args += ["--images-per-category", "2", "--max-new-tokens", "4", "--batch-size", "16", "--scopes", "language"]
    result = cli("run", *args)
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {r["category"] for r in summary["results"]} == {"car", "fish", "pooled"}
    assert (tmp_path / "run" / "report.html").exists()
    # every search's summary names the metric that stood in for CLIP
    search = json.loads((tmp_path / "run" / summary["results"][0]["path"] / "summary.json").read_text())
    assert search["criterion"]["quality"] == "distinct_mean" and "no CLIP score" in search["criterion"]["text"]
