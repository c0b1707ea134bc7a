"""The robustness study from `canprobe run`: fault x ranking k*, protections, the report section, bad input."""

import json
import re

import pytest

from canprobe.organisms.scenes import write_scenes
from canprobe.runfolder import PROTECTION_FILE


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("robust") / "scenes", per_category=1, seed=5)


def _run_flags(images, out) -> list[str]:
    return [
        "run",
        "--model",
        "toy-llava",
        "--images",
        str(images),
        "--out",
        str(out),
        "--categories",
        "car,fish,house",
        "--scopes",
        "language.down_proj",
        "--no-per-category",
        "--no-split-half",
        "--controls",
        "random",
        "--max-new-tokens",
        "10",
        "--batch-size",
        "64",
        "--collapse-clip-ratio",
        "0.6",
    ]


def test_run_fills_the_fault_and_protection_tables(cli, images, tmp_path):
    out = tmp_path / "run"
    faults = ("bitflip", "stuck:value=1000", "mean:by=position")
    flags = ["--faults", ",".join(faults), "--protections", "protect_top,range", "--fault-counts", "1,3"]
    result = cli(*_run_flags(images, out), *flags, "--fault-trials", "2")
    assert result.code == 0, result.err
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["robustness"]
    rows = {(r["fault"], r["ranking"]): r for r in entry["faults"]}
    assert set(rows) == {(f, r) for f in faults for r in ("can", "activation", "random")}
    for r in rows.values():
        assert (out / entry["path"] / r["path"] / "curve.jsonl").is_file()
        assert r["k_star"] is None or 1 <= r["k_star"] <= r["scope_size"] == 512
    # an exponent flip of one float32 activation is 2^128 times the value: one neuron is enough
    assert rows[("bitflip", "can")]["k_star"] == 1
    protection = json.loads((out / entry["path"] / PROTECTION_FILE).read_text())
    assert protection["k_protect"] == 1 and protection["protected"][0].startswith("language.layers.")
    rates = {(r["count"], r["protection"]): r["collapse_rate"] for r in protection["rates"]}
    assert set(rates) == {(n, p) for n in (1, 3) for p in ("none", "protect_top", "range", "protect_top+range")}
    assert all(0 <= v <= 1 for v in rates.values())
    assert all(rates[(n, "range")] <= rates[(n, "none")] for n in (1, 3))
    # neither protection changes a clean caption
    assert all(c["exact_match"] == 1.0 for c in protection["clean_cost"].values())
    page = (out / "report.html").read_text()
    section = re.search(r'<section id="faults">(.*?)</section>', page, flags=re.S).group(1)
    assert "k* per fault model and ranking" in section and "collapse rate under random bitflip" in section
    assert "fewest neurons: bitflip collapses the model at k* = 1" in section
    assert section.count("<img") == 2
    # a rerun resumes every search and reuses protection.json
    again = cli(*_run_flags(images, out), *flags, "--fault-trials", "2")
    assert again.code == 0, again.err
    assert json.loads((out / "summary.json").read_text())["robustness"][0]["faults"] == entry["faults"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--faults", "melt"], "unknown fault 'melt'"),
        (["--faults", "bitflip:bit=16", "--dtype", "bfloat16"], "bit 16 is out of range for bfloat16"),
        (["--random-fault", "bitflip:bit=32"], "bit 32 is out of range for float32"),
        (["--faults", "stuck:value=inf"], "stuck-at value must be a finite number"),
        (["--faults", "stuck:at=max:factor=nan"], "stuck-at factor must be a finite number"),
        (["--protections", "prayer"], "'prayer' is not one of protect_top, range"),
        (["--fault-counts", "1,two"], "comma-separated whole numbers"),
    ],
)
def test_bad_fault_input_is_one_line_and_exit_2(cli, images, tmp_path, flags, message):
    result = cli(*_run_flags(images, tmp_path / "bad"), *flags)
    assert result.code == 2
    assert result.err.count("\n") == 1 and message in result.err
    assert not (tmp_path / "bad").exists()


def test_search_and_ablate_take_a_fault(cli, images, tmp_path):
    result = cli("search", "--model", "toy-llava", "--images", images, "--out", tmp_path / "s", "--fault", "melt")
    assert result.code == 2 and "unknown fault 'melt'" in result.err and result.err.count("\n") == 1
    neuron = "language.layers.1.mlp.down_proj:7"
    args = ["ablate", "--model", "toy-llava", "--images", images, "--neurons", neuron, "--max-new-tokens", "6"]
    result = cli(*args, "--fault", "bitflip:bit=exponent")
    assert result.code == 0, result.err
    assert "masked (1 neuron(s), bitflip:bit=exponent)" in result.out
    result = cli(*args, "--fault", "bitflip:bit=40")
    assert result.code == 2 and "bit 40 is out of range for float32" in result.err
    result = cli(*args, "--ablation", "sign")  # the setting's former name, as scripts of 0.1 give it
    assert result.code == 0 and "masked (1 neuron(s), sign)" in result.out, result.err
