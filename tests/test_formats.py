"""Artifacts outlive a release: run folders written by canprobe 0.1 (tests/fixtures/run-0.1.0) still read.

The fixture is a tiny study (toy-llava, car and fish scenes of ``write_scenes(per_category=2,
seed=5)``, language.down_proj, the sign fault and the range protection) written by canprobe 0.1,
whose artifacts record no format. Readers take a field added since as missing, not as damage.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from canprobe.config import SearchConfig, names
from canprobe.errors import CanprobeError
from canprobe.runfolder import FORMAT, read_json, read_jsonl, read_summary

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1.0"
POOLED = "scopes/language.down_proj/pooled"


@pytest.fixture
def old_run(tmp_path):
    out = tmp_path / "run-0.1.0"
    shutil.copytree(FIXTURE, out)
    return out


def test_the_fixture_was_written_before_formats_were_recorded():
    assert "format" not in read_json(FIXTURE / "summary.json")
    assert all("format" not in p for p in read_jsonl(FIXTURE / POOLED / "curve.jsonl"))


def test_report_and_compare_read_a_run_folder_of_the_previous_release(cli, old_run, tmp_path):
    result = cli("report", old_run)
    assert result.code == 0, result.err
    page = (old_run / "report.html").read_text()
    assert "369" in page and "toy-llava" in page  # the pooled k* of the fixture's summary
    result = cli("compare", old_run, "--out", tmp_path / "compare.html")
    assert result.code == 0, result.err
    assert "369" in result.out and "toy-llava" in result.out


def test_a_newer_format_is_refused_with_one_line(cli, old_run):
    summary = read_json(old_run / "summary.json")
    (old_run / "summary.json").write_text(json.dumps({**summary, "format": FORMAT + 1}))
    with pytest.raises(CanprobeError, match="newer canprobe"):
        read_summary(old_run)
    result = cli("report", old_run)
    assert result.code == 2 and "upgrade canprobe" in result.err and len(result.err.strip().splitlines()) == 1


def test_a_search_resumes_from_a_curve_of_the_previous_release(old_run, tmp_path):
    """The pooled search of 0.1 resumes under today's config: nothing is evaluated again."""
    from canprobe.data import load_image_set
    from canprobe.models import load_model
    from canprobe.organisms.scenes import write_scenes
    from canprobe.scoring import load_folder_ranking
    from canprobe.search import find_k_star

    folder = old_run / POOLED
    old = read_json(folder / "summary.json")
    values = {**old["config"].pop("criterion"), **old["config"]}
    config = SearchConfig.of(**{k: v for k, v in values.items() if k in names(SearchConfig)})
    image_set = load_image_set(write_scenes(tmp_path / "scenes", per_category=2, seed=5), categories=["car", "fish"])
    lm, clip = load_model("toy-llava"), load_model("toy-clip")
    names_ = [r.name for r in image_set.records]
    result = find_k_star(lm, image_set.images, load_folder_ranking(folder), clip, config, folder, names_)
    points = read_jsonl(FIXTURE / POOLED / "curve.jsonl")
    assert result.evaluated == 0 and result.resumed == len(points) == 37
    assert (result.k_star, result.stage1_k) == (old["k_star"], old["stage1_k"]) == (369, 256)
    # empty_rate came after 0.1: the resumed points read it as missing
    assert "empty_rate" not in points[0] and all(math.isnan(p.metrics.empty_rate) for p in result.points)
    assert result.baseline.ppl_median == points[0]["ppl_median"]
    summary = read_json(folder / "summary.json")
    assert summary["format"] == FORMAT and summary["config"]["growth"] == 2.0


def test_a_study_of_the_previous_release_refuses_a_changed_setting_and_names_it(old_run, tmp_path):
    """0.1 recorded no growth: it reads as the default it ran with, so 3.0 is a change, named as such."""
    from canprobe.config import make_config
    from canprobe.errors import InputError
    from canprobe.experiment import Experiment
    from canprobe.organisms.scenes import write_scenes

    values = read_json(old_run / "summary.json")["config"]
    assert "growth" not in values
    images = write_scenes(tmp_path / "scenes", per_category=2, seed=5)
    values.update(images=str(images), out=str(old_run), growth=3.0)
    with pytest.raises(InputError, match=r"another config \(config.growth \(was 2.0, now 3.0\)\)"):
        Experiment(make_config(values), progress=False).run()
