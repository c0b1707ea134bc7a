"""Neuron sites and addresses: every address round-trips, scopes select the right sites, errors are clear."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from canprobe.errors import InputError, UnsupportedModelError
from canprobe.families import known_kinds
from canprobe.organisms.build import build_instructblip, build_llava
from canprobe.sites import Neuron, SiteRegistry, parse_address
from tests.conftest import TINY


@pytest.fixture(scope="module")
def llava():
    return SiteRegistry(build_llava(TINY)[0])


@pytest.fixture(scope="module")
def blip():
    return SiteRegistry(build_instructblip(TINY)[0])


def _tiny_text_config(cls, **extra):
    return cls(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        **extra,
    )


def test_llava_sites_and_sizes(llava):
    sizes = {s.scope: s.size for s in llava.sites}
    assert sizes == {
        "language.gate_proj": TINY.text_ffn,
        "language.up_proj": TINY.text_ffn,
        "language.down_proj": TINY.text_hidden,
        "language.down_proj.input": TINY.text_ffn,
        "vision.fc1": TINY.vision_ffn,
        "vision.fc2": TINY.vision_hidden,
        "projector.linear_1": TINY.text_hidden,
        "projector.linear_2": TINY.text_hidden,
    }
    assert len(llava.sites) == 4 * TINY.text_layers + 2 * TINY.vision_layers + 2
    gate = llava.by_name["language.layers.1.mlp.gate_proj"]
    assert isinstance(llava.module(gate), torch.nn.SiLU) or "SiLU" in type(llava.module(gate)).__name__
    assert llava.weight(gate).weight.shape[0] == gate.size and gate.weight_axis == "out"
    down_in = llava.by_name["language.layers.1.mlp.down_proj.input"]
    assert down_in.hook == "input" and llava.weight(down_in).weight.shape[1] == down_in.size


def test_instructblip_sites(blip):
    assert blip.scopes == [
        "language.gate_proj",
        "language.up_proj",
        "language.down_proj",
        "language.down_proj.input",
        "vision.fc1",
        "vision.fc2",
        "qformer.intermediate",
        "qformer.output",
        "qformer.intermediate_query",
        "qformer.output_query",
    ]
    site = blip.by_name["qformer.layers.0.output_query"]
    assert site.size == TINY.text_hidden and blip.module(site) is blip.weight(site)


@pytest.mark.parametrize("which", ["llava", "blip"])
def test_every_address_round_trips(which, llava, blip):
    registry = llava if which == "llava" else blip
    count = 0
    for site in registry.sites:
        for index in range(site.size):
            address = site.address(index)
            neuron = parse_address(address)
            assert str(neuron) == address
            assert registry.resolve(address) == (site, index)
            assert registry.resolve(neuron) == (site, index)
            count += 1
    assert count == sum(s.size for s in registry.sites)


def test_scope_selection(llava):
    assert [s.name for s in llava.select("projector")] == ["projector.linear_1", "projector.linear_2"]
    assert len(llava.select("all")) == len(llava.sites)
    assert [s.name for s in llava.select("language.down_proj")] == [
        "language.layers.0.mlp.down_proj",
        "language.layers.1.mlp.down_proj",
    ]
    # comma lists are deduplicated and come back in model order
    picked = llava.select("vision.fc2, language.down_proj,language")
    assert [s.name for s in picked] == [s.name for s in llava.sites if s.component == "language" or s.kind == "fc2"]


@pytest.mark.parametrize(
    "scope,needle",
    [("language.o_proj", "unknown scope 'language.o_proj'"), ("qformer", "unknown scope 'qformer'"), (" , ", "empty")],
)
def test_bad_scopes(llava, scope, needle):
    with pytest.raises(InputError, match=needle):
        llava.select(scope)


@pytest.mark.parametrize(
    "address,needle",
    [
        ("language.layers.0.mlp.down_proj:32", "index out of range"),
        ("language.layers.7.mlp.down_proj:0", "no site"),
        ("qformer.layers.0.output:0", "no site"),
    ],
)
def test_resolve_checks_the_model(llava, address, needle):
    with pytest.raises(InputError, match=needle):
        llava.resolve(address)


@pytest.mark.parametrize(
    "text",
    [
        "language.layers.01.mlp.down_proj:3",
        "language.layers.1.down_proj:3",
        "language.layers.1.mlp.o_proj:3",
        "qformer.layers.0.mlp.output:1",
        "projector.linear_3:0",
        " language.layers.1.mlp.down_proj:3",
        "language.layers.1.mlp.down_proj:3\n",
        "language.layers.1.mlp.down_proj:-1",
        "language.layers.\u0661.mlp.down_proj:3",
        "language.layers.1.mlp.experts.gate_proj:3",
        "language.layers.1.mlp.experts.01.gate_proj:3",
        "language.layers.1.mlp.experts.2.up_proj:3",
        "",
    ],
)
def test_malformed_addresses(text):
    with pytest.raises(InputError):
        parse_address(text)


def test_neurons_order_and_print():
    a, b = parse_address("projector.linear_1:2"), parse_address("projector.linear_1:10")
    assert a < b and str(b) == "projector.linear_1:10" and b == Neuron("projector.linear_1", 10)


_kinds = st.sampled_from(  # a routed expert's kinds are printed with the expert's number
    [
        f"{c}.layers.{{0}}.mlp.{k.replace('experts.', 'experts.{1}.')}"
        for c in ("language", "vision")
        for k in known_kinds(c)
    ]
    + [f"qformer.layers.{{0}}.{k}" for k in known_kinds("qformer")]
)
_valid = st.builds(
    lambda kind, layer, expert, index: f"{kind.format(layer, expert)}:{index}",
    _kinds,
    st.integers(0, 999),
    st.integers(0, 999),
    st.integers(0, 10**8),
) | st.builds(lambda k, i: f"projector.{k}:{i}", st.sampled_from(["linear_1", "linear_2"]), st.integers(0, 10**8))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), _valid, _valid.map(lambda s: s[: len(s) // 2] + "x" + s[len(s) // 2 :])))
def test_any_string_parses_to_itself_or_raises(text):
    try:
        neuron = parse_address(text)
    except InputError:
        return
    assert str(neuron) == text


@given(_valid)
def test_valid_addresses_always_parse(text):
    assert str(parse_address(text)) == text


def test_decoder_families_and_llava_next():
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    for cls, config in ((MistralForCausalLM, MistralConfig), (Qwen2ForCausalLM, Qwen2Config)):
        registry = SiteRegistry(cls(_tiny_text_config(config)))
        assert [s.size for s in registry.select("language.gate_proj")] == [24, 24]
        assert registry.scopes == [
            "language.gate_proj",
            "language.up_proj",
            "language.down_proj",
            "language.down_proj.input",
        ]
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=20, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8
    )
    next_model = LlavaNextForConditionalGeneration(
        LlavaNextConfig(
            vision_config=vision,
            text_config=_tiny_text_config(LlamaConfig),
            image_grid_pinpoints=[[16, 32], [32, 16]],
            image_token_index=3,
        )
    )
    registry = SiteRegistry(next_model)
    assert {s.scope: s.size for s in registry.sites}["vision.fc1"] == 20
    assert registry.resolve("projector.linear_2:15")[1] == 15


def test_unsupported_architectures_name_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedModelError, match="llama.*llava"):
        SiteRegistry(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)))


def test_shared_modules_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(_tiny_text_config(LlamaConfig))
    model.model.layers[1].mlp.act_fn = model.model.layers[0].mlp.act_fn
    with pytest.raises(UnsupportedModelError, match="share one module"):
        SiteRegistry(model)


def test_one_registry_per_model_and_its_hooks_see_and_replace_the_site_tensors():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_text_config(LlamaConfig)).eval()
    registry = SiteRegistry.of(model)
    assert SiteRegistry.of(model) is registry and SiteRegistry.of(LlamaForCausalLM(model.config)) is not registry
    down = registry.by_name["language.layers.1.mlp.down_proj"]
    unit = registry.by_name["language.layers.1.mlp.down_proj.input"]
    mlp = model.model.layers[1].mlp
    seen: dict[str, torch.Tensor] = {}
    ids = torch.tensor([[1, 5, 9]])
    expected = {}
    handles = [
        mlp.down_proj.register_forward_hook(lambda _m, args, out: expected.update(x=args[0], out=out)),
        registry.hook(down, lambda a: seen.update(out=a)),
        registry.hook(unit, lambda a: seen.update(unit=a)),
        registry.hook(down, lambda x: seen.update(weight_input=x), where="weight_input"),
    ]
    clean = model(ids).logits
    for h in handles:
        h.remove()
    assert torch.equal(seen["out"], expected["out"]) and seen["out"].shape[-1] == down.size == 16
    assert torch.equal(seen["unit"], expected["x"]) and torch.equal(seen["weight_input"], expected["x"])
    with_zero = registry.hook(down, torch.zeros_like)
    zeroed = model(ids).logits
    with_zero.remove()
    assert not torch.allclose(zeroed, clean) and torch.equal(model(ids).logits, clean)
    with pytest.raises(ValueError, match="hook point"):
        registry.hook(down, torch.zeros_like, where="elsewhere")
