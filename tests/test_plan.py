"""``--dry-run``: the plan and memory estimate come from the config alone and nothing is written."""

from __future__ import annotations

import re

import pytest

from canprobe.config import Generation, Model
from canprobe.plan import GIB, make_plan


def test_plan_of_the_7b_llava_counts_neurons_and_memory():
    llava = Model(model="llava-1.5-7b", dtype="bfloat16")
    plan = make_plan(llava, n_images=100, scope="language.down_proj", generation=Generation(batch_size=1))
    assert (plan.sites, plan.neurons) == (32, 131_072)
    assert plan.weight_bytes == 7_063_427_072 * 2
    # one image of 616 language tokens: several GiB of activations kept for backward, less than the weights
    assert 1 * GIB < plan.scoring_bytes < plan.weight_bytes
    checkpointed = make_plan(
        Model(model="llava-1.5-7b", dtype="bfloat16", gradient_checkpointing=True),
        100,
        "language.down_proj",
        Generation(batch_size=1),
    )
    assert checkpointed.scoring_bytes < 0.5 * plan.scoring_bytes
    two = make_plan(llava, 100, "language.down_proj", Generation(batch_size=64), processes=2)
    assert "50 per process" in "\n".join(two.lines)
    assert two.scoring_bytes == pytest.approx(50 * plan.scoring_bytes, rel=1e-6)  # batch capped at the shard


def test_the_backward_of_a_language_scope_keeps_no_vision_activations():
    """Scoring the language model never builds a graph through the vision tower; scoring the ViT does."""
    llava, one = Model(model="llava-1.5-7b", dtype="bfloat16"), Generation(batch_size=1)
    language = make_plan(llava, 1, "language", one)
    everything = make_plan(llava, 1, "all", one)
    # LLaVA-1.5's ViT-L: 24 layers x 577 tokens x (8 x 1024 + 4 x 4096) bf16 elements, SDPA attention
    vision = 24 * 577 * (8 * 1024 + 4 * 4096) * 2
    assert everything.scoring_bytes - language.scoring_bytes == pytest.approx(vision, rel=0.05)
    # language: 32 layers x 616 tokens x (8 x 4096 + 4 x 11008) elements, no attention probabilities
    assert language.scoring_bytes == pytest.approx(32 * 616 * (8 * 4096 + 4 * 11008) * 2, rel=0.01)


def test_plan_of_an_organism_and_of_a_search():
    plan = make_plan(Model(model="toy-instructblip"), 12, "language", searches=1)
    assert plan.neurons == 4 * (512 + 512 + 128 + 512)
    assert any(line.startswith("search: 1 k* search") for line in plan.lines)


def test_dry_run_prints_the_plan_and_writes_nothing(cli, scene_dir, tmp_path):
    out = tmp_path / "never"
    result = cli(
        "score", "--model", "llava-1.5-7b", "--images", scene_dir, "--dtype", "bfloat16", "--out", out, "--dry-run"
    )
    assert result.code == 0, result.err
    assert "131,072 neurons" in result.out and "12 per process" in result.out
    assert float(re.search(r"about ([\d.]+) GiB", result.out).group(1)) > 13
    search = cli("search", "--model", "toy-llava", "--images", scene_dir, "--out", out, "--dry-run")
    assert search.code == 0, search.err
    assert "k* search" in search.out and "dry run" in search.out
    assert not out.exists()


def test_run_dry_run_plans_every_scope_and_group(cli, scene_dir, tmp_path):
    out = tmp_path / "never"
    result = cli("run", "--model", "toy-instructblip", "--images", scene_dir, "--out", out, "--dry-run")
    assert result.code == 0, result.err
    assert "7 image group(s)" in result.out  # 6 categories + pooled
    assert result.out.count("== scope") == 2 and "search: 7 k* search(es)" in result.out
    assert not out.exists()


@pytest.fixture
def broken_category(tmp_path, scene_dir):
    """The scenes plus a category whose only image does not decode: the real run refuses it."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(scene_dir, images)
    (images / "truck").mkdir()
    (images / "truck" / "0.png").write_bytes(b"not a png")
    return images


@pytest.mark.parametrize(
    "extra, needle",
    [
        ((), "category 'truck' has no readable image"),  # the dropped category
        (("--categories", "car,truck"), "category 'truck' has no readable image"),
        (("--categories", "car", "--seed", str(2**63)), "config field seed"),  # the huge seed
        (("--categories", "car", "--faults", "bitflip:bit=1e1"), "is not a bit"),  # the bad fault spec
        (("--categories", "car", "--protections", "range", "--fault-counts", "1,100000"), "scope language"),
    ],
)
def test_a_dry_run_checks_everything_that_needs_no_weights(cli, broken_category, tmp_path, extra, needle):
    out = tmp_path / "never"
    args = ("run", "--model", "toy-llava", "--images", broken_category, "--out", out, "--scopes", "language.down_proj")
    result = cli(*args, *extra, "--dry-run")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, (result.out, result.err)
    assert needle in result.err
    assert not out.exists()


def test_a_dry_run_checks_the_ranking_and_reference_captions(cli, scene_dir, tmp_path):
    bad = tmp_path / "ranking.parquet"
    bad.write_bytes(b"PAR1 not really")
    out = tmp_path / "never"
    search = cli("search", "--model", "toy-llava", "--images", scene_dir, "--out", out, "--ranking", bad, "--dry-run")
    assert search.code == 2 and "not a readable parquet file" in search.err, search.err
    bare = tmp_path / "bare"
    (bare / "car").mkdir(parents=True)
    (bare / "car" / "0.png").write_bytes((scene_dir / "car" / "0000.png").read_bytes())
    score = cli("score", "--model", "toy-llava", "--images", bare, "--captions", "reference", "--out", out, "--dry-run")
    assert score.code == 2 and "no caption for 1 image" in score.err, score.err
    assert not out.exists()
