"""Site files (--sites): a model with no adapter, and every malformed file ends in one line and exit 2.

The generic family tests (tests/test_families.py) run a GPT-NeoX model through its site file.
"""

from __future__ import annotations

import json

import pytest

from tests.test_families import BUILDERS, SITE_FILE


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    out = tmp_path_factory.mktemp("neox")
    BUILDERS["gpt_neox-sites"](out)
    return out


def _one_line_error(result, *needles: str) -> None:
    assert result.code == 2, (result.out, result.err)
    assert len(result.err.strip().splitlines()) == 1, result.err
    for needle in needles:
        assert needle in result.err, result.err


def test_a_model_with_no_adapter_and_no_site_file_is_told_the_families_and_the_option(cli, neox):
    _one_line_error(cli("inspect", neox), "gpt_neox", "llava", "instructblip", "--sites FILE")


def test_a_site_file_addresses_neurons_by_pattern(cli, neox):
    out = cli("inspect", neox, "--sites", neox / SITE_FILE)
    assert out.code == 0, out.err
    rows = {line.split()[0]: line.split() for line in out.out.splitlines() if line.startswith("language.")}
    assert set(rows) == {"language.up_proj", "language.down_proj", "language.down_proj.input"}
    assert rows["language.down_proj"][1:3] == ["2", "16"] and rows["language.up_proj"][1:3] == ["2", "24"]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("sites: []", "non-empty 'sites'"),
        ("loader: seq2seq\nsites: [{component: language, module: a.*.b, kind: down_proj}]", "loader must be"),
        ("sites: [{component: audio, module: a.*.b, kind: down_proj}]", "component must be"),
        ("sites: [{component: language, module: a.*.b, kind: w2}]", "no site kind 'w2'"),
        ("sites: [{component: language, module: a.b, kind: down_proj}]", "one '*'"),
        ("sites: [{component: language, module: a.*.b, kind: down_proj, reading: both}]", "reading must be"),
        ("sites: [{component: language, module: a.*.b, kind: down_proj, colour: red}]", "nothing else"),
        (
            "sites: [{component: language, module: a.*.b, kind: down_proj},"
            " {component: language, module: c.*.d, kind: up_proj}]",
            "same layer list",
        ),
        ("sites: [{component: language, module: nowhere.*.b, kind: down_proj}]", "cannot find the language layers"),
        ("sites: [{component: language, module: gpt_neox.layers.*.mlp.act, kind: up_proj}]", "not a linear layer"),
        ("sites: [{component: language, module: gpt_neox.layers.*.mlp.w2, kind: down_proj}]", "no language site"),
        ("sites: [unclosed", "cannot read site file"),
    ],
)
def test_a_bad_site_file_is_one_line(cli, neox, tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    _one_line_error(cli("inspect", neox, "--sites", path), needle)


def test_run_takes_a_site_file_and_trust_remote_code(cli, neox, scene_dir, tmp_path):
    """A whole study on the site-file model (text-only: it continues the set's captions)."""
    out = tmp_path / "run"
    args = ["run", "--model", neox, "--sites", neox / SITE_FILE, "--trust-remote-code", "--images", scene_dir]
    args += ["--out", out, "--categories", "car", "--scopes", "language.down_proj", "--max-new-tokens", "4"]
    args += ["--controls", "random", "--no-split-half", "--no-per-category", "--grid-per-octave", "0"]
    result = cli(*args)
    assert result.code == 0, result.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["sites"] == str(neox / SITE_FILE) and summary["config"]["trust_remote_code"] is True
    (row,) = summary["results"]
    assert row["n_neurons"] == 2 * 16  # 2 layers of 16 residual channels, as the site file addresses them
    assert (out / row["path"] / "curve.jsonl").is_file()
