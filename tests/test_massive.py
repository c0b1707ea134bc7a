"""Massive activations: found where they are, with the values and writers the model really has."""

import pytest
import torch

from canprobe.config import Generation
from canprobe.massive import ActivationReport, format_activations, massive_activations
from canprobe.models import LoadedModel
from canprobe.organisms.build import build_llava
from canprobe.organisms.scenes import make_scenes
from tests.conftest import TINY

PLANTED = 400.0


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = build_llava(TINY)
    return LoadedModel(model.eval(), processor, "llava", "tiny")


def _plant(lm: LoadedModel, layer: int, dim: int):
    """Add PLANTED to one down_proj output channel at the first token (a test fixture, not an organism)."""
    down = lm.model.model.language_model.layers[layer].mlp.down_proj

    def hook(_module, _args, out):
        out = out.clone()
        out[:, 0, dim] += PLANTED
        return out

    return down.register_forward_hook(hook)


def test_planted_activation_is_found_with_its_writer(tiny):
    scenes = make_scenes(6, seed=5)
    images, captions = [im for im, _ in scenes], [s.caption for _, s in scenes]
    clean = massive_activations(tiny, images, captions)
    assert clean.massive == []  # a random model has none
    handle = _plant(tiny, layer=1, dim=5)
    try:
        report = massive_activations(tiny, images, captions, generation=Generation(batch_size=4))
    finally:
        handle.remove()
    assert report.n_images == 6 and [p.layer for p in report.layers] == [0, 1]
    top = report.massive[0]
    assert (top.dim, top.position, top.token, top.first_layer, top.last_layer) == (5, 0, "<s>", 1, 1)
    assert top.images == 6
    assert top.value == pytest.approx(PLANTED, abs=3.0)
    assert top.writers[0].address == "language.layers.1.mlp.down_proj:5"
    assert top.writers[0].contribution == pytest.approx(PLANTED, abs=1.0)
    assert top.writers[0].share == pytest.approx(1.0, abs=0.01)
    assert report.layers[1].dim == 5 and report.layers[1].position == 0
    assert report.peak == report.layers[1]
    assert any("language.layers.1.mlp.down_proj:5 (+4" in line for line in format_activations(report))
    assert ActivationReport.from_dict(report.to_dict()) == report


def test_layer_peaks_match_the_models_own_hidden_states(tiny):
    """Layer 0's peak and median equal those of HF's hidden_states[1] (the output of layer 0)."""
    from canprobe.inputs import teacher_forcing_inputs

    scenes = make_scenes(3, seed=6)
    images, captions = [im for im, _ in scenes], [s.caption for _, s in scenes]
    report = massive_activations(tiny, images, captions)
    enc = teacher_forcing_inputs(tiny.processor, "llava", images, captions)
    enc.pop("labels")
    with torch.no_grad():
        h = tiny.model(**enc, output_hidden_states=True).hidden_states[1]
    mask = enc["attention_mask"].bool()
    ratios = []
    for b in range(3):
        row = h[b][mask[b]].abs()
        ratios.append((float(row.max() / row.median()), float(row.median())))
    ratio, median = max(ratios)
    assert report.layers[0].ratio == pytest.approx(ratio, rel=1e-5)
    assert report.layers[0].median == pytest.approx(median, rel=1e-5)


def test_inspect_activations_cli(cli, scene_dir):
    result = cli("inspect", "toy-llava", "--activations", "--images", scene_dir, "--per-category", "1", "--ratio", "5")
    assert result.code == 0, result.err
    out = result.out
    assert "language.down_proj" in out  # the inventory comes first
    table = out[out.index("residual stream") :].splitlines()
    assert [line.split()[0] for line in table[2:6]] == ["0", "1", "2", "3"]
    assert "massive activations (|h| >= 5x" in out


def test_inspect_images_without_activations_is_one_line(cli, scene_dir):
    result = cli("inspect", "toy-llava", "--images", scene_dir)
    assert result.code == 2
    assert result.err.strip().count("\n") == 0 and "--activations --images" in result.err
