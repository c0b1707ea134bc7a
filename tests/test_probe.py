"""measure_sink on a language model with a planted first-token peak, against independent computations."""

import pytest
import torch
from transformers import LlamaForCausalLM

from canprobe.inputs import teacher_forcing_inputs
from canprobe.organisms.build import IMAGE_ID, _text_config, build_llava
from canprobe.organisms.probe import measure_sink
from canprobe.organisms.scenes import make_scenes
from canprobe.organisms.textstream import StreamConfig, TextStream
from tests.conftest import TINY

DIM, VALUE = 5, 40.0


@pytest.fixture(scope="module")
def peaked():
    """A random tiny Llama whose layer-0 MLP writes VALUE into dimension DIM of the first token (a test hook)."""
    torch.manual_seed(0)
    stream = TextStream(StreamConfig(segments=3), seed=4)
    model = LlamaForCausalLM(_text_config(TINY, stream.vocab_size)).eval()

    def plant(_module, _args, out):
        out = out.clone()
        out[:, 0, DIM] += VALUE
        return out

    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(plant)
    ids = stream.batch(6)
    yield model, {"input_ids": ids, "labels": ids}
    handle.remove()


def test_the_planted_peak_is_found_with_its_writer(peaked):
    model, inputs = peaked
    m = measure_sink(model, inputs)
    assert m.peak_dim == DIM and all(layer.first_dim == DIM for layer in m.layers)
    assert m.peak.first_ratio > 50 * m.peak.rest_ratio
    assert m.writers[0].address == f"language.layers.0.mlp.down_proj:{DIM}"
    assert m.writers[0].share == pytest.approx(1.0, abs=0.05)
    assert m.channels[0] == m.writers[0].address
    assert model.config._attn_implementation == "sdpa"  # eager only while measuring


@torch.no_grad()
def test_ratios_and_attention_match_the_model_outputs(peaked):
    model, inputs = peaked
    m = measure_sink(model, inputs)
    model.set_attn_implementation("eager")
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    model.set_attn_implementation("sdpa")
    h = out.hidden_states[1].abs()  # layer 0's output
    median = h.flatten(1).median(dim=1).values
    assert m.layers[0].first_ratio == pytest.approx(float((h[:, 0].amax(-1) / median).mean()), rel=1e-4)
    assert m.layers[0].rest_ratio == pytest.approx(float((h[:, 1:].flatten(1).amax(-1) / median).mean()), rel=1e-4)
    norms = out.hidden_states[1].norm(dim=-1)
    assert m.layers[0].norm_ratio == pytest.approx(float((norms[:, 0] / norms[:, 1:].mean(1)).mean()), rel=1e-4)
    to_first = out.attentions[1][:, :, 1:, 0].mean((0, 2))
    assert torch.allclose(torch.tensor(m.layers[1].first_attention), to_first, atol=1e-5)
    assert m.loss == pytest.approx(float(out.loss), rel=1e-5)


@torch.no_grad()
def test_ablation_losses_match_direct_replacement(peaked):
    model, inputs = peaked
    m = measure_sink(model, inputs)
    down = model.model.layers[0].mlp.down_proj
    clean = {}
    handle = down.register_forward_hook(lambda _m, _a, out: clean.setdefault("x", out.detach()))
    model(**inputs)
    handle.remove()

    def loss_with(value):
        def replace(_m, _a, out):
            out = out.clone()
            out[..., DIM] = value
            return out

        handle = down.register_forward_hook(replace)
        loss = float(model(**inputs).loss)
        handle.remove()
        return loss

    assert m.ablation["zero"] == pytest.approx(loss_with(0.0), rel=1e-5)
    assert m.ablation["mean_position"] == pytest.approx(loss_with(clean["x"][..., DIM].mean(0)), rel=1e-5)
    assert m.ablation["mean_position"] == pytest.approx(m.loss, rel=1e-3)  # the peak is the same on every row


@torch.no_grad()
def test_image_tokens_get_their_attention_share_and_scale():
    torch.manual_seed(0)
    model, processor = build_llava(TINY)
    model.eval()
    scenes = make_scenes(3, seed=1)
    inputs = teacher_forcing_inputs(processor, "llava", [im for im, _ in scenes], [s.caption for _, s in scenes])
    m = measure_sink(model, inputs, image_token=IMAGE_ID)
    model.set_attn_implementation("eager")
    out = model(**inputs, output_attentions=True)
    image = inputs["input_ids"] == IMAGE_ID
    queries = (inputs["attention_mask"].bool() & ~image)[:, 1:]
    to_image = (out.attentions[0][:, :, 1:] * image[:, None, None]).sum(-1)
    expected = (to_image * queries[:, None]).sum((0, 2)) / queries.sum()
    assert torch.allclose(torch.tensor(m.layers[0].image_attention), expected, atol=1e-5)
    assert set(m.input_rms) == {"text", "image"} and m.input_rms["image"] > 0
