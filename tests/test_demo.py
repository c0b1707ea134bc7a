"""The demo's studies and its closing line per model."""

import pytest

from canprobe.config import make_config
from canprobe.demo import CATEGORY_SCOPES, POOLED_SCOPES, ModelStory, story_line, study_configs
from canprobe.massive import ActivationReport, LayerPeak, MassiveActivation, Writer
from canprobe.organisms.build import BUILDERS
from canprobe.sites import SiteRegistry
from tests.conftest import TINY


@pytest.mark.parametrize("name", list(POOLED_SCOPES))
def test_studies_cover_language_and_vision_scopes_of_the_organism(tmp_path, scene_dir, name):
    by_category, pooled = (make_config(c) for c in study_configs(name, scene_dir, tmp_path))
    assert by_category.study.scopes == CATEGORY_SCOPES and by_category.study.per_category and by_category.study.pooled
    assert not pooled.study.per_category and pooled.study.pooled
    for config in (by_category, pooled):
        assert (
            "mean" in config.study.controls
            and "random" in config.study.controls
            and config.study.mean_control == "position"
        )
    registry = SiteRegistry(BUILDERS[name](TINY)[0])
    components = {s.component for scope in pooled.study.scopes for s in registry.select(scope)}
    assert components == {"language", "vision", "projector" if name == "toy-llava" else "qformer"}
    assert by_category.study.out != pooled.study.out


def _result(scope, k_star, n, stage1=None, random=None, mean=None, category="pooled"):
    return {
        "scope": scope,
        "category": category,
        "k_star": k_star,
        "n_neurons": n,
        "stage1_k": stage1,
        "random_collapsed": random,
        "mean_ablation_collapsed": mean,
    }


def test_story_line_states_kstar_controls_side_and_peak():
    by_category = {
        "results": [
            _result("language.down_proj", 9, 512, category="car"),
            _result("language.down_proj", 4, 512, stage1=2, random=False, mean=False),
        ]
    }
    pooled = {
        "results": [
            _result("language.gate_proj", 300, 2048),
            _result("vision.fc1", None, 1536),
            _result("projector", 64, 256),
        ]
    }
    peak = LayerPeak(1, -812.0, 0.5, 1624.0, 0, "<s>", 33)
    writer = Writer("language.layers.1.mlp.down_proj:33", -800.0, 0.985)
    massive = MassiveActivation(33, 0, "<s>", 1, 3, 1, -812.0, 1624.0, 48, (writer,))
    story = ModelStory("toy-llava", by_category, pooled, ActivationReport(48, 100.0, [peak], [massive]))
    assert story_line(story) == (
        "toy-llava: language.down_proj k* 4 of 512 (0.8%); stage 1 from k 2; random 4: healthy; "
        "mean ablation: healthy; language.gate_proj k* 300 of 2048 (14.6%); "
        "vision.fc1 does not collapse (1536 neurons); projector k* 64 of 256 (25.0%); "
        "fewest neurons (as a share of the scope) in language.down_proj: language; "
        "largest residual |h| 812.0 = 1624x its median (layer 1, <s>, dim 33): 1 massive (>= 100x)"
    )


def test_story_line_without_collapse_or_massive_activation():
    by_category = {"results": [_result("language.down_proj", None, 512)]}
    pooled = {"results": [_result("vision.fc2", 100, 384)]}
    peak = LayerPeak(0, 25.0, 1.0, 25.0, 20, "<image>", 7)
    story = ModelStory("toy-x", by_category, pooled, ActivationReport(8, 100.0, [peak], []))
    assert story_line(story) == (
        "toy-x: language.down_proj does not collapse (512 neurons); vision.fc2 k* 100 of 384 (26.0%); "
        "fewest neurons (as a share of the scope) in vision.fc2: vision; "
        "largest residual |h| 25.0 = 25x its median (layer 0, <image>, dim 7): no massive activation (>= 100x)"
    )


def _where(item: int) -> tuple[float, int, int]:
    import os

    import torch

    return 1 / item, os.getpid(), torch.get_num_threads()


def test_each_item_runs_in_a_process_of_its_own_with_its_share_of_the_cores(monkeypatch):
    """The demo's two organisms: one process each, ``cores // 2`` torch threads each; a failure is raised."""
    import os

    from canprobe import demo

    monkeypatch.setattr(demo, "cores", lambda: 4)
    results = sorted(demo.in_processes(_where, [1, 2]))
    assert [value for value, _, _ in results] == [0.5, 1.0]
    assert len({pid for _, pid, _ in results} | {os.getpid()}) == 3
    assert [threads for _, _, threads in results] == [2, 2]
    monkeypatch.setattr(demo, "cores", lambda: 1)  # one core: one process, one thread, items in turn
    results = demo.in_processes(_where, [1, 0])
    assert next(results)[::2] == (1.0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)
