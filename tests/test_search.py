"""The k* search: exact bracketing on a synthetic model, resumption, and real searches on the organisms."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from canprobe.ablation import RankedNeurons
from canprobe.config import CollapseCriterion, Generation, SearchConfig
from canprobe.errors import InputError
from canprobe.metrics import CaptionMetrics, MetricSummary
from canprobe.models import ORGANISM_DIR
from canprobe.runfolder import read_jsonl
from canprobe.search import (
    CollapseSearch,
    find_k_star,
    grid_ks,
    growth_ks,
)

# ---------------------------------------------------------------- the search logic on a synthetic model


class FakeEvaluator:
    """Metrics that depend only on how many neurons are masked: collapsed on ``collapsed(k)``."""

    def __init__(self, collapsed, degraded=lambda k: False, n_images=3, fail_after=None):
        self.inputs = [None] * n_images
        self.n_images = n_images
        self.collapsed, self.degraded, self.fail_after = collapsed, degraded, fail_after
        self.calls: list[list[int]] = []
        self.baseline_set = None
        self.reserved: list[str] = []

    def reserve(self, sites):
        self.reserved += sites

    def _metrics(self, k: int) -> list[CaptionMetrics]:
        ppl, clip = (1000.0, 5.0) if self.collapsed(k) else (5.0, 28.0) if self.degraded(k) else (2.0, 30.0)
        return [CaptionMetrics(f"caption {k}", ppl, clip, 2, 1.0, k == 0)] * len(self.inputs)

    def evaluate_baseline(self):
        self.calls.append([0])
        return self._metrics(0)

    def set_baseline(self, captions):
        self.baseline_set = captions

    def evaluate(self, masks):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # stands for the process dying mid-search
        ks = [sum(len(v) for v in m.values()) for m in masks]
        self.calls.append(ks)
        return [self._metrics(k) for k in ks]


def _neurons(n: int) -> RankedNeurons:
    return RankedNeurons(tuple(f"s:{i}" for i in range(n)), ("s",), torch.zeros(n, dtype=torch.long), torch.arange(n))


def _search(evaluator, out=None, n=1000, **config):
    config.setdefault("grid_per_octave", 0)
    names = [f"img{i}.png" for i in range(len(evaluator.inputs))]
    return CollapseSearch(evaluator, _neurons(n), _neurons(n), SearchConfig.of(**config), names, out).run()


def test_growth_and_grid():
    assert growth_ks(10, 2) == [1, 2, 4, 8, 10]
    assert growth_ks(8, 2) == [1, 2, 4, 8]
    assert growth_ks(100, 4) == [1, 4, 16, 64, 100]
    assert growth_ks(1, 2) == [1]
    assert grid_ks(512, 1) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert grid_ks(100, 2) == [1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 100]
    assert grid_ks(100, 0) == []


def test_bisection_finds_the_exact_threshold_with_few_evaluations():
    ev = FakeEvaluator(lambda k: k >= 37, degraded=lambda k: k >= 18)
    result = _search(ev)
    assert result.k_star == 37 and result.stage1_k == 32
    evaluated = [k for call in ev.calls for k in call]
    assert evaluated == [0, 1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert result.summary["evaluations"]["search"] == 13 and result.summary["monotone"]
    assert result.summary["bracket"] == [36, 37]
    assert ev.reserved == ["s"]  # the scope's sites, reserved once before any mask
    assert [p.stage for p in result.curve()][:2] == ["healthy", "healthy"]


def test_sample_captions_come_from_images_spread_over_the_set():
    result = _search(FakeEvaluator(lambda k: k >= 37, n_images=24), n_samples=4)
    assert len(result.curve()[0].captions) == 24  # the baseline keeps every image
    assert [c["image"] for c in result.curve()[1].captions] == ["img0.png", "img8.png", "img15.png", "img23.png"]
    assert (
        _search(FakeEvaluator(lambda k: k >= 37, n_images=2), n_samples=4).curve()[1].captions[1]["image"] == "img1.png"
    )


def test_k_star_one_and_no_collapse():
    assert _search(FakeEvaluator(lambda k: k >= 1)).k_star == 1
    ev = FakeEvaluator(lambda k: False)
    result = _search(ev, n=300)
    assert result.k_star is None and result.stage1_k is None
    assert [k for call in ev.calls for k in call][-2:] == [256, 300]


def test_non_monotone_collapse_is_recorded_not_hidden():
    ev = FakeEvaluator(lambda k: 20 <= k < 25 or k >= 37)
    result = _search(ev, grid_per_octave=4, grid_max=64)
    assert result.k_star == 37
    assert result.summary["first_collapsed_evaluated"] == 23
    assert not result.summary["monotone"]
    assert result.point(23).phase == "grid" and result.point(23).stage == "collapsed"


def test_several_k_per_round_take_fewer_rounds_to_the_same_k_star():
    one = FakeEvaluator(lambda k: k >= 201)
    three = FakeEvaluator(lambda k: k >= 201)
    assert _search(one).k_star == _search(three, k_per_round=3).k_star == 201
    assert len(three.calls) < len(one.calls) - 4
    assert max(len(c) for c in three.calls) == 3


def test_random_control_uses_a_seeded_draw_of_the_same_counts():
    ev = FakeEvaluator(lambda k: k >= 37)
    result = _search(ev, control="random", seed=5, batch_size=12)
    top_ks = sorted(p.k for p in result.curve("top") if p.k > 0)
    assert sorted(p.k for p in result.curve("random")) == top_ks
    assert result.summary["random"]["seed"] == 5
    assert result.summary["random"]["at_k_star"]["k"] == 37
    assert max(len(c) for c in ev.calls) == 4  # 12 rows / 3 images: 4 independent k per batched round


def test_resume_after_a_crash_evaluates_nothing_twice(tmp_path):
    full = _search(FakeEvaluator(lambda k: k >= 37), out=tmp_path / "full", control="random")
    crashed = FakeEvaluator(lambda k: k >= 37, fail_after=6)
    with pytest.raises(KeyboardInterrupt):
        _search(crashed, out=tmp_path / "run", control="random")
    before = read_jsonl(tmp_path / "run" / "curve.jsonl")
    assert len(before) == 6
    again = FakeEvaluator(lambda k: k >= 37)
    result = _search(again, out=tmp_path / "run", control="random")
    assert again.baseline_set == ["caption 0"] * 3  # restored from curve.jsonl, not regenerated
    assert [0] not in again.calls
    lines = read_jsonl(tmp_path / "run" / "curve.jsonl")
    keys = [(r["control"], r["k"]) for r in lines]
    assert len(keys) == len(set(keys)) == len(full.points)
    assert result.k_star == full.k_star == 37
    assert result.resumed == 6 and result.evaluated == len(full.points) - 6
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["k_star"] == 37 and summary["evaluations"]["resumed"] == 6
    assert set(summary["versions"]) == {"torch", "transformers", "canprobe"}
    with pytest.raises(InputError, match=r"another config \(config.seed \(was 0, now 9\)\)"):
        _search(FakeEvaluator(lambda k: k >= 37), out=tmp_path / "run", control="random", seed=9)


@pytest.mark.parametrize(
    "bad",
    [
        dict(collapse_ppl_ratio=0.5),
        dict(stage1_ppl_ratio=1.0),
        dict(collapse_clip_ratio=1.5),
        dict(stage1_clip_ratio=0.0),
        dict(collapse_ppl_ratio=float("inf")),
        dict(stage1_ppl_ratio=200.0),
        dict(collapse_clip_ratio=0.95),
    ],
)
def test_thresholds_are_range_checked(bad):
    with pytest.raises(InputError):
        CollapseCriterion(**bad)


def test_stages_follow_the_documented_thresholds():
    def s(ppl, clip):
        return MetricSummary.from_dict({"n_images": 4, "ppl_median": ppl, "clip_mean": clip, "distinct_mean": 1.0})

    base, c = s(2.0, 30.0), CollapseCriterion()
    assert c.stage(s(200.0, 14.9), base) == "collapsed"
    assert c.stage(s(199.9, 14.9), base) == "degraded"  # PPL short of 100x
    assert c.stage(s(500.0, 15.0), base) == "degraded"  # CLIP not below 50%
    assert c.stage(s(4.0, 27.0), base) == "healthy"
    assert c.stage(s(4.01, 27.0), base) == "degraded"
    assert c.stage(s(2.0, 26.9), base) == "degraded"
    assert c.stage(s(float("nan"), 1.0), base) == "degraded"
    assert c.stage(s(float("inf"), 1.0), base) == "collapsed"
    for bad in (dict(growth=1.0), dict(k_per_round=0), dict(control="top"), dict(fault="melt"), dict(max_k=0)):
        with pytest.raises(InputError):
            SearchConfig.of(**bad)


# ---------------------------------------------------------------- real searches on the organisms

# toy-clip still rates word salad made of scene words at 50-57% of the unmasked mean CLIP score (a zeroed
# MLP in every layer of toy-llava scores 0.50-0.57x), so the paper's 50% collapses only on some image
# sets; the organism searches use 60%, and the CLI run below passes the same flag.
SEARCH = dict(
    collapse_clip_ratio=0.6, grid_per_octave=0, max_new_tokens=16, batch_size=48, control="random", control_at="k_star"
)


def _shipped(name: str) -> str:
    if not (ORGANISM_DIR / name / "config.json").exists():
        pytest.skip(f"{name} is not shipped yet (canprobe organisms train {name})")
    return name


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """12 scenes, a CLIP, and per organism (on first use) a CAN ranking of down_proj and gate_proj."""
    from canprobe.data import load_image_set
    from canprobe.models import load_model
    from canprobe.organisms.scenes import write_scenes

    root = tmp_path_factory.mktemp("search")
    images = write_scenes(root / "scenes", per_category=2, seed=21)
    clip_name = _shipped("toy-clip")
    return {
        "images": images,
        "image_set": load_image_set(images),
        "clip_name": clip_name,
        "clip": load_model(clip_name),
        "root": root,
    }


def _organism(setup, name: str):
    """(LoadedModel, ranking DataFrame, ranking.parquet path), scored once per module."""
    if name not in setup:
        from canprobe.models import load_model
        from canprobe.scoring import score_neurons

        lm = load_model(_shipped(name))
        images = setup["image_set"].images
        scope = "language.down_proj,language.gate_proj"
        scores = score_neurons(lm, images, scope, generation=Generation(batch_size=12))
        scores.save(setup["root"] / name)
        setup[name] = (lm, scores.ranking(), setup["root"] / name / "ranking.parquet")
    return setup[name]


RESULTS: dict = {}


@pytest.mark.parametrize("organism", ["toy-llava", "toy-instructblip"])
@pytest.mark.parametrize("scope", ["language.down_proj", "language.gate_proj"])
def test_search_finds_k_star_and_random_neurons_of_that_count_do_not_collapse(setup, organism, scope, tmp_path):
    lm, ranking, _ = _organism(setup, organism)
    image_set = setup["image_set"]
    config = SearchConfig.of(scope=scope, clip_model=setup["clip_name"], **SEARCH)
    out = setup["root"] / f"run-{organism}-{scope}"
    names = [r.name for r in image_set.records]
    result = find_k_star(lm, image_set.images, ranking, setup["clip"], config, out_dir=out, image_names=names)
    RESULTS[(organism, scope)] = (result, out)
    assert result.k_star is not None, [(p.k, p.stage) for p in result.curve()]
    at = result.point(result.k_star)
    assert at.stage == "collapsed" and result.point(result.k_star - 1).stage != "collapsed"
    base = result.baseline
    assert at.metrics.ppl_median >= 100 * base.ppl_median and at.metrics.clip_mean < 0.6 * base.clip_mean
    assert result.summary["evaluations"]["search"] < result.k_star / 3 + 3
    random = result.summary["random"]["at_k_star"]
    assert random["k"] == result.k_star and random["stage"] != "collapsed"
    print(
        f"\n{organism} {scope}: k* = {result.k_star} of {result.summary['scope_size']}, stage 1 from k = "
        f"{result.stage1_k}, {result.summary['evaluations']['search']} search evaluations; random control at k*: "
        f"{random['stage']} (PPL {random['ppl_median']:.3g} vs {at.metrics.ppl_median:.3g}, "
        f"CLIP {random['clip_mean']:.3g} vs {at.metrics.clip_mean:.3g}; unmasked {base.ppl_median:.3g}, "
        f"{base.clip_mean:.3g})"
    )


def _reference(setup):
    """The uninterrupted toy-llava down_proj search (shared with the k* test when it ran first)."""
    key = ("toy-llava", "language.down_proj")
    if key not in RESULTS:
        lm, ranking, _ = _organism(setup, "toy-llava")
        config = SearchConfig.of(scope=key[1], clip_model=setup["clip_name"], **SEARCH)
        names = [r.name for r in setup["image_set"].records]
        out = setup["root"] / "reference"
        RESULTS[key] = (find_k_star(lm, setup["image_set"].images, ranking, setup["clip"], config, out, names), out)
    return RESULTS[key]


def _cli_args(setup, out: Path) -> list[str]:
    return [
        "search",
        "--model",
        "toy-llava",
        "--images",
        str(setup["images"]),
        "--scope",
        "language.down_proj",
        "--ranking",
        str(_organism(setup, "toy-llava")[2]),
        "--out",
        str(out),
        "--clip-model",
        setup["clip_name"],
        "--control",
        "random",
        "--control-at",
        "k_star",
        "--collapse-clip-ratio",
        "0.6",
        "--grid-per-octave",
        "0",
        "--max-new-tokens",
        "16",
        "--batch-size",
        "48",
    ]


def test_sigkill_halfway_then_rerun_finishes_with_the_same_curve(setup, cli, tmp_path):
    reference, ref_dir = _reference(setup)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "canprobe.cli", *_cli_args(setup, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    curve = out / "curve.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if curve.exists() and curve.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the search ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done_before = len(read_jsonl(curve))
    total = len(reference.points)
    assert 5 <= done_before < total
    result = cli(*_cli_args(setup, out))
    assert result.code == 0, result.err
    assert f"k* = {reference.k_star} " in result.out
    assert f"evaluated {total - done_before} point(s) now, {done_before} resumed" in result.out
    lines = read_jsonl(curve)
    keys = [(r["control"], r["k"]) for r in lines]
    assert len(keys) == len(set(keys)) == total
    expected = {(r["control"], r["k"]): r for r in read_jsonl(ref_dir / "curve.jsonl")}
    for r in lines:
        e = expected[(r["control"], r["k"])]
        assert (r["phase"], r["stage"], r["captions"]) == (e["phase"], e["stage"], e["captions"])
        assert r["ppl_median"] == pytest.approx(e["ppl_median"], rel=1e-4)
        assert r["clip_mean"] == pytest.approx(e["clip_mean"], abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k_star"] == reference.k_star and summary["stage1_k"] == reference.stage1_k


# ---------------------------------------------------------------- the command line


def _one_line_error(result, *needles):
    assert result.code == 2, (result.code, result.out, result.err)
    lines = [x for x in result.err.splitlines() if x.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("canprobe: error:") and "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_ablate_prints_masked_and_unmasked_side_by_side(setup, cli):
    args = ["ablate", "--model", "toy-llava", "--images", setup["images"], "--clip-model", setup["clip_name"]]
    result = cli(
        *args,
        "--top",
        300,
        "--ranking",
        _organism(setup, "toy-llava")[2],
        "--scope",
        "language.down_proj",
        "--per-category",
        1,
    )
    assert result.code == 0, result.err
    assert result.out.count("  unmasked  PPL") == 6 and result.out.count("  masked    PPL") == 6
    assert "masked (top 300, zero): median PPL" in result.out
    assert "unmasked: median PPL" in result.out and "same as unmasked 100%" in result.out.splitlines()[-2]


def test_bad_input_is_one_line_and_exit_code_2(setup, cli):
    base = ["--model", "toy-llava", "--images", setup["images"], "--clip-model", setup["clip_name"]]
    ranking = _organism(setup, "toy-llava")[2]
    _one_line_error(cli("ablate", *base, "--top", 5000, "--ranking", ranking), "--top 5000", "2560")
    _one_line_error(cli("ablate", *base, "--top", 600, "--ranking", ranking, "--scope", "language.down_proj"), "512")
    _one_line_error(cli("ablate", *base, "--neurons", "language.layers.9.mlp.down_proj:1"), "no site")
    _one_line_error(cli("ablate", *base, "--neurons", "language.layers.0.mlp.down_proj:999"), "out of range")
    _one_line_error(cli("ablate", *base, "--neurons", "down_proj-17"), "not a neuron address")
    _one_line_error(cli("ablate", *base), "exactly one of --neurons")
    search = ["search", *base, "--ranking", ranking, "--out", setup["root"] / "bad"]
    _one_line_error(cli(*search, "--max-k", 100000), "max k 100000", "512")
    _one_line_error(cli(*search, "--collapse-ppl-ratio", 0.5), "collapse-ppl-ratio")
    _one_line_error(cli(*search, "--stage1-clip-ratio", 1.5), "stage1-clip-ratio")
    _one_line_error(cli(*search, "--collapse-clip-ratio", 0.95), "collapse-clip-ratio")
    _one_line_error(cli(*search, "--scope", "language.nothing"), "unknown scope")


def test_compiled_decoding_finds_the_same_curve(setup, tmp_path):
    """The whole search with the decoding step compiled (traced on this CPU) equals the eager one, point by point."""
    from canprobe.models import load_model
    from tests.test_captions import compile_on_cpu

    reference, _ = _reference(setup)
    _, ranking, _ = _organism(setup, "toy-llava")
    lm = load_model(_shipped("toy-llava"))
    compile_on_cpu(lm)
    config = SearchConfig.of(scope="language.down_proj", clip_model=setup["clip_name"], decoding="compiled", **SEARCH)
    names = [r.name for r in setup["image_set"].records]
    result = find_k_star(lm, setup["image_set"].images, ranking, setup["clip"], config, tmp_path, names)
    assert result.k_star == reference.k_star and result.summary["config"]["decoding"] == "compiled"
    assert [(p.k, p.control) for p in result.points] == [(p.k, p.control) for p in reference.points]
    for got, want in zip(result.points, reference.points):
        assert [c["caption"] for c in got.captions] == [c["caption"] for c in want.captions]
        assert got.metrics.ppl_median == pytest.approx(want.metrics.ppl_median, rel=1e-4)
