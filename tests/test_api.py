"""canprobe.api: the README's example runs, and its calls are the commands' own."""

import json
import re
import shutil
from pathlib import Path

import pytest

from canprobe import api
from canprobe.config import Generation, Model
from canprobe.errors import InputError

README = Path(__file__).parents[1] / "README.md"


def _api_example() -> str:
    """The first Python block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def two_scenes(tmp_path, monkeypatch):
    """A folder ``scenes`` of two images (a car and a fish) in the working directory, as the example reads."""
    from canprobe.organisms.scenes import write_scenes

    root = write_scenes(tmp_path / "scenes", per_category=1, seed=5)
    for folder in root.iterdir():
        if folder.is_dir() and folder.name not in ("car", "fish"):
            shutil.rmtree(folder)
    monkeypatch.chdir(tmp_path)
    return root


def test_the_readme_api_example_runs_and_matches_the_command_line(two_scenes, cli):
    namespace: dict = {}
    exec(compile(_api_example(), str(README), "exec"), namespace)
    result, ablated = namespace["result"], namespace["ablated"]
    summary = json.loads(Path("runs/search/summary.json").read_text())
    assert summary["k_star"] == result.k_star and summary["max_k"] == 64
    assert summary["config"]["max_new_tokens"] == 12 and summary["config"]["collapse_clip_ratio"] == 0.6
    assert ablated.images == ["car/0000.png", "fish/0000.png"] and len(ablated.masked) == 2
    assert ablated.label == "top 4" and ablated.fault == "sign"
    # the command line makes the same call: the same scores, bit for bit
    args = ("--model", "toy-llava", "--images", "scenes", "--scope", "language.down_proj", "--batch-size", 8)
    assert cli("score", *args, "--out", "cli-scores").code == 0
    import pandas as pd

    by_api, by_cli = (pd.read_parquet(f"{d}/ranking.parquet") for d in ("runs/scores", "cli-scores"))
    assert by_api["address"].tolist() == by_cli["address"].tolist()
    assert by_api["score"].tolist() == by_cli["score"].tolist()
    # a rerun resumes: nothing is evaluated again
    again = api.search(
        "toy-llava",
        "scenes",
        "runs/search",
        Generation(max_new_tokens=12),
        ranking="runs/scores",
        max_k=64,
        collapse_clip_ratio=0.6,
    )
    assert again.evaluated == 0 and again.k_star == result.k_star


def test_settings_combine_sections_and_keywords_and_refuse_unknown_names():
    values = api.settings(Model(model="toy-llava", dtype="bfloat16"), Generation(max_new_tokens=7), batch_size=2)
    assert (values["model"], values["dtype"], values["max_new_tokens"], values["batch_size"]) == (
        "toy-llava",
        "bfloat16",
        7,
        2,
    )
    assert api.settings("toy-llava", max_k=3) == {"model": "toy-llava", "max_k": 3}
    with pytest.raises(InputError, match="unknown setting.*max_kk"):
        api.settings("toy-llava", max_kk=3)
