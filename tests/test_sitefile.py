"""Site files (--sites): a model with no adapter, and every malformed file ends in one line and exit 2.

The generic family tests (tests/test_families.py) run a GPT-NeoX model through its site file.
"""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.test_families import BUILDERS, NEOX_SITES, SITE_FILE


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


def test_a_site_file_that_is_not_utf8_is_one_line(cli, neox, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# Größe\n".encode("latin-1") + NEOX_SITES.encode())  # the case
    _one_line_error(cli("inspect", neox, "--sites", path), "not UTF-8", "0xf6")
    path.write_bytes(b"\xff\xfe" + NEOX_SITES.encode("utf-16-le"))  # a UTF-16 file from a Windows editor
    _one_line_error(cli("inspect", neox, "--sites", path), "not UTF-8", "0xff")


@pytest.mark.parametrize(
    "site",
    [
        # a linear module read through another linear of another width: caught before any work
        "{component: language, module: gpt_neox.layers.*.mlp.dense_4h_to_h,"
        " weight: gpt_neox.layers.*.mlp.dense_h_to_4h, kind: down_proj}",
        "{component: language, module: gpt_neox.layers.*.mlp.dense_h_to_4h, kind: down_proj.input, reading: input,"
        " weight: gpt_neox.layers.*.mlp.dense_4h_to_h}",
    ],
)
def test_a_weight_whose_width_differs_from_the_modules_is_refused_by_inspect(cli, neox, tmp_path, site):
    path = tmp_path / "wide.yaml"
    path.write_text(f"loader: causal-lm\nsites:\n  - {site}\n")
    _one_line_error(cli("inspect", neox, "--sites", path), "features, but its weight", "neurons")


def test_a_weight_whose_width_differs_from_an_activations_is_refused_when_it_runs(cli, neox, tmp_path):
    """The activation module has no width of its own: the mismatch shows on the first forward pass."""
    path = tmp_path / "act.yaml"
    path.write_text(
        "loader: causal-lm\nsites:\n  - {component: language, module: gpt_neox.layers.*.mlp.act,"
        " weight: gpt_neox.layers.*.mlp.dense_4h_to_h, kind: up_proj}\n"
    )
    texts = tmp_path / "texts"
    texts.mkdir()
    Image.new("RGB", (8, 8)).save(texts / "a.png")
    (texts / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "a red car"}) + "\n")
    out = cli(
        "score", "--model", neox, "--sites", path, "--images", texts, "--scope", "language", "--out", tmp_path / "o"
    )
    _one_line_error(out, "has 24 features, but its weight", "16 neurons")
    assert not (tmp_path / "o" / "scores.safetensors").exists()


ODD = [
    "sites: [{component: language, module: gpt_neox.layers.*.99, kind: up_proj}]",
    "loader: [causal-lm]\nsites: [{component: language, module: a.*.b, kind: up_proj}]",
]


def _family_or_error(model, path):
    from canprobe.errors import CanprobeError
    from canprobe.families import attach
    from canprobe.families.sitefile import read_site_file
    from canprobe.sites import SiteRegistry

    try:
        family = read_site_file(path)
        attach(model, family)
        return SiteRegistry(model)
    except CanprobeError:
        return None


_names = st.sampled_from(
    ["component", "module", "kind", "reading", "weight", "loader", "sites", "language", "vision", "down_proj",
     "up_proj", "down_proj.input", "output", "input", "causal-lm", "image-text-to-text",
     "gpt_neox.layers.*.mlp.act", "gpt_neox.layers.*.mlp.dense_4h_to_h", "gpt_neox.layers.*.mlp.dense_h_to_4h",
     "gpt_neox.layers.*.9", "gpt_neox.*.0", "*", "a.*.b", "", "-1"]
)  # fmt: skip
_values = st.recursive(
    st.one_of(_names, st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_names, inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=120), _values.map(lambda v: yaml.safe_dump(v)), st.binary(max_size=60)))
def test_any_site_file_is_a_registry_or_one_input_error(neox_model, tmp_path, text):
    path = tmp_path / "any.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    registry = _family_or_error(neox_model, path)
    if registry is not None:
        assert registry.sites and all(s.size > 0 for s in registry.sites)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.sampled_from(ODD), st.text(max_size=80), _values.map(lambda v: yaml.safe_dump(v))))
def test_any_site_file_on_the_command_line_is_one_line_and_exit_2_or_an_inventory(
    cli, neox, neox_model, tmp_path, text
):
    path = tmp_path / "any.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    result = cli("inspect", neox, "--sites", path)
    if _family_or_error(neox_model, path) is None:
        _one_line_error(result)
        assert result.err.startswith("canprobe: error:") and "Traceback" not in result.err
    else:
        assert result.code == 0 and "language." in result.out, result.err


@pytest.fixture(scope="module")
def neox_model(neox):
    from canprobe.models import load_model

    return load_model(str(neox), sites=neox / SITE_FILE).model


@pytest.mark.parametrize("text", ODD)
def test_odd_site_files_found_by_the_property_are_one_line(cli, neox, tmp_path, text):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    result = cli("inspect", neox, "--sites", path)
    _one_line_error(result)


LLAVA_SITES = """\
loader: image-text-to-text
sites:
  - {component: language, module: model.language_model.layers.*.mlp.down_proj, kind: down_proj}
"""


@pytest.mark.parametrize(
    "prompt, ok",
    [
        (None, True),  # the case: the default prompt, placed by the processor's chat template
        ("USER: <image>\nWhat is this? ASSISTANT:", True),  # the image token once: the prompt as given
        ("<image> and <image>", False),  # twice: one image cannot fill two places
    ],
)
def test_a_site_file_model_that_takes_images_places_the_image_once(cli, scene_dir, tmp_path, prompt, ok):
    path = tmp_path / "llava-sites.yaml"
    path.write_text(LLAVA_SITES)
    args = ["inspect", "toy-llava", "--sites", path, "--activations", "--images", scene_dir, "--per-category", "1"]
    result = cli(*args, *(["--prompt", prompt] if prompt else []))
    if ok:
        assert result.code == 0, result.err
        assert "language.down_proj" in result.out
    else:
        _one_line_error(result, "holds the image token 2 times")


def test_the_site_file_prompt_without_a_chat_template_puts_the_image_token_first():
    from types import SimpleNamespace

    from canprobe.families.sitefile import SiteFileFamily

    family = SiteFileFamily("f", "image-text-to-text", {}, {})
    processor = SimpleNamespace(image_token="<img>", tokenizer=None, chat_template=None)
    assert family.prompt(processor, "Describe.") == "<img>\nDescribe."
    assert family.prompt(processor, "Look: <img> now") == "Look: <img> now"
    text_only = SiteFileFamily("f", "causal-lm", {}, {})
    assert text_only.prompt(processor, "Once upon a time") == "Once upon a time"
