"""Sites found from a model's structure (``canprobe.families.structure``), and inventories from a config alone.

The sweep saves the default config of every type in the installed transformers' image-text-to-text
table and runs ``canprobe inspect`` on it: built on the meta device, no weights read.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig

from canprobe.errors import UnsupportedModelError
from canprobe.families import STRUCTURED, attach, family_for
from canprobe.sites import SiteRegistry


def _row(out: str, site: str) -> list[str] | None:
    return next((x.split() for x in out.splitlines() if x.split() and x.split()[0] == site), None)


def test_every_image_text_type_is_inventoried_from_its_config_or_refused_in_one_line(cli, tmp_path):
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as TYPES
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # default configs warn about their own defaults
    found, refused, unbuildable = [], {}, []
    try:
        for model_type in sorted(TYPES):
            try:
                config = AutoConfig.for_model(model_type)
            except ValueError:  # no default config at all (5.6's vision-encoder-decoder wants its two halves)
                unbuildable.append(model_type)
                continue
            folder = tmp_path / model_type
            config.save_pretrained(folder)
            result = cli("inspect", folder)
            if result.code == 0:
                text = config.get_text_config()
                row = _row(result.out, "language.down_proj")
                assert row is not None, (model_type, result.out)
                if int(row[3].replace(",", "")) == text.num_hidden_layers * text.hidden_size:
                    found.append(model_type)
                else:
                    refused[model_type] = f"{row[3]} down_proj channels"
                continue
            lines = result.err.strip().splitlines()
            assert result.code == 2 and len(lines) == 1 and "Traceback" not in result.err, (model_type, result.err)
            assert not lines[0].endswith(": "), lines[0]  # the line says why (ImportError texts start with a newline)
            if "from its config" in lines[0]:  # its default config does not build (transformers' own defaults)
                unbuildable.append(model_type)
            else:
                refused[model_type] = lines[0]
    finally:
        hf_logging.set_verbosity(verbosity)
    with_ffn = len(found) + len(refused)
    print(f"\n{len(found)} of {with_ffn} buildable image-text-to-text types give language down_proj = layers x width")
    print(f"unbuildable default configs: {', '.join(unbuildable)}")
    for model_type, why in refused.items():
        print(f"  {model_type}: {why}")
    assert len(found) >= 0.9 * with_ffn


def _meta(model_type: str, **changes):
    config = AutoConfig.for_model(model_type, **changes)
    with torch.device("meta"):
        return family_for(config).model_class().from_config(config)


# what the adapters declared by hand before their sites were read from structure: site -> (the end of the
# module read, the end of its weight's path; transformers releases differ in the paths' beginnings)
DECLARED = {
    "llava": {
        "language.layers.31.mlp.gate_proj": ("language_model.layers.31.mlp.act_fn", "mlp.gate_proj"),
        "language.layers.0.mlp.down_proj.input": ("language_model.layers.0.mlp.down_proj", "mlp.down_proj"),
        "vision.layers.23.mlp.fc1": ("encoder.layers.23.mlp.activation_fn", "mlp.fc1"),
        "projector.linear_1": ("model.multi_modal_projector.act", "multi_modal_projector.linear_1"),
        "projector.linear_2": ("model.multi_modal_projector.linear_2", "multi_modal_projector.linear_2"),
    },
    "qwen2_vl": {
        "vision.layers.0.mlp.fc1": ("model.visual.blocks.0.mlp.act", "mlp.fc1"),
        "projector.linear_1": ("model.visual.merger.mlp.1", "merger.mlp.0"),
        "projector.linear_2": ("model.visual.merger.mlp.2", "merger.mlp.2"),
    },
    "qwen2_5_vl": {"vision.layers.1.mlp.gate_proj": ("model.visual.blocks.1.mlp.act_fn", "mlp.gate_proj")},
    "qwen3_vl": {
        "vision.layers.0.mlp.fc1": ("model.visual.blocks.0.mlp.act_fn", "mlp.linear_fc1"),
        "projector.linear_1": ("model.visual.merger.act_fn", "merger.linear_fc1"),
    },
    "gemma3": {"vision.layers.0.mlp.fc2": ("encoder.layers.0.mlp.fc2", "mlp.fc2")},
    "phi3": {
        "language.layers.0.mlp.gate_proj": ("model.layers.0.mlp.activation_fn", "mlp.gate_up_proj"),
        "language.layers.0.mlp.up_proj": ("model.layers.0.mlp.gate_up_proj", "mlp.gate_up_proj"),
    },
}


@pytest.mark.parametrize("model_type", list(DECLARED))
def test_structure_finds_the_sites_the_adapters_declared(model_type):
    registry = SiteRegistry(_meta(model_type))
    for name, (module, weight) in DECLARED[model_type].items():
        site = registry.by_name[name]
        assert site.module_path.endswith(module) and site.weight_path.endswith(weight), (name, site)
    if model_type == "phi3":  # the fused linear's halves
        gate, up = (registry.by_name[f"language.layers.0.mlp.{k}"] for k in ("gate_proj", "up_proj"))
        assert (gate.part, up.part, gate.parts) == (0, 1, 2) and gate.size == up.size
    if model_type == "gemma3":  # a projection weight, no MLP: no projector sites
        assert "projector" not in {s.component for s in registry.sites}


def test_moe_blocks_are_sites_with_their_shared_expert():
    model = _meta("qwen3_5_moe")
    registry = SiteRegistry(model)
    text = model.config.text_config
    block = registry.by_name["language.layers.3.mlp.down_proj"]
    assert block.module_path == "model.language_model.layers.3.mlp" and block.size == text.hidden_size
    shared = registry.by_name["language.layers.3.mlp.shared_expert.gate_proj"]
    assert (
        shared.module_path.endswith("mlp.shared_expert.act_fn") and shared.size == text.shared_expert_intermediate_size
    )
    assert registry.resolve("language.layers.3.mlp.shared_expert.up_proj:7")[1] == 7


def test_an_ffn_that_adds_more_than_down_proj_writes_is_refused():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        text_config=LlamaConfig(
            hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
        ),
        vision_config=dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2),
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    attach(model, STRUCTURED)
    assert SiteRegistry(model).by_name["language.layers.1.mlp.down_proj"].size == 16
    other = LlavaForConditionalGeneration(config).eval()
    mlp = other.model.language_model.layers[1].mlp
    forward = mlp.forward
    mlp.forward = lambda x: forward(x) + 1.0  # something after down_proj reaches the residual stream
    attach(other, STRUCTURED)
    with pytest.raises(UnsupportedModelError, match="layers.1.mlp returns more than its mlp.down_proj writes"):
        SiteRegistry(other)


def test_a_config_only_folder_has_a_dry_run(cli, tmp_path, scene_dir, caplog):
    config = AutoConfig.for_model("qwen3_5")
    config.save_pretrained(tmp_path / "qwen3_5")
    with caplog.at_level(logging.INFO):
        result = cli(
            "score", "--model", tmp_path / "qwen3_5", "--images", scene_dir, "--out", tmp_path / "o", "--dry-run"
        )
    assert result.code == 0, result.err
    assert f"{32 * 4096:,}" in result.out  # the language down_proj channels of the default Qwen3.5
    assert not (tmp_path / "o").exists()


def _readme_types(header: str) -> set[str]:
    """The model types in the first column of the README table under ``header``."""
    import re
    from pathlib import Path

    lines = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1])
    return {t for row in rows for t in re.findall(r"`([^`]+)`", row)}


def test_the_readme_tables_are_the_families_in_the_code():
    from canprobe.families import BY_MODEL_TYPE
    from tests.test_families import STRUCTURED as TESTED

    adapters = {t for t, fs in BY_MODEL_TYPE.items() if any(f.generates for f in fs)}
    assert _readme_types("| `model_type` | models | language sites |") == adapters
    assert _readme_types("| `model_type` | models | what structure finds |") == set(TESTED)
    assert not adapters & set(TESTED)  # the end-to-end structure families have no adapter


@pytest.mark.parametrize(
    "model_type, experts",
    [("qwen3_vl_moe", "num_experts"), ("qwen3_5_moe", "num_experts"), ("glm4v_moe", "n_routed_experts")],
)
def test_inspect_lists_each_routed_experts_units_from_a_config_alone(cli, tmp_path, model_type, experts):
    """A config folder alone (meta device): every MoE layer has num_experts x moe_intermediate_size gate units."""
    config = AutoConfig.for_model(model_type)
    config.save_pretrained(tmp_path)
    out = cli("inspect", tmp_path)
    assert out.code == 0, out.err
    text = config.get_text_config()
    dense = getattr(text, "first_k_dense_replace", 0)
    row = _row(out.out, "language.experts.gate_proj")
    per_layer = getattr(text, experts) * text.moe_intermediate_size
    layers = text.num_hidden_layers - dense
    assert [int(x.replace(",", "")) for x in row[1:4]] == [layers, per_layer, layers * per_layer], row
    registry = SiteRegistry(_meta(model_type))
    last = registry.by_name[
        f"language.layers.{text.num_hidden_layers - 1}.mlp.experts.{getattr(text, experts) - 1}.gate_proj"
    ]
    assert last.size == text.moe_intermediate_size and last.module_path.endswith("mlp.experts.act_fn")
    assert registry.resolve(f"{last.name}:{last.size - 1}") == (last, last.size - 1)
    with pytest.raises(UnsupportedModelError, match="routed expert's units"):
        registry.weight(last)


@pytest.fixture(scope="module")
def moe():
    """A tiny Qwen3-VL-MoE (4 experts, 2 per token) and a batch of two rows of text."""
    from tests.structure_builders import build_qwen3_vl_moe

    torch.manual_seed(0)
    model = build_qwen3_vl_moe()[0].eval()
    return model, torch.randint(20, 60, (2, 9))


def _routed(model, ids: torch.Tensor, layer: int, hooks=()):
    """Layer ``layer``'s block output per token and the experts each token was routed to (one forward)."""
    block = model.model.language_model.layers[layer].mlp
    seen = {}
    handles = [
        block.register_forward_hook(lambda _m, _a, out: seen.update(out=out.reshape(-1, out.shape[-1]))),
        block.experts.register_forward_pre_hook(lambda _m, args: seen.update(top_k=args[1])),
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return seen["out"], seen["top_k"]


def test_masking_one_experts_unit_leaves_every_token_routed_elsewhere_unchanged(moe):
    from canprobe.ablation import ablate

    model, ids = moe
    registry = SiteRegistry.of(model)
    clean, top_k = _routed(model, ids, 1)
    for expert in range(4):
        routed = (top_k == expert).any(dim=1)
        assert 0 < int(routed.sum()) < routed.numel()  # the batch has tokens routed to it and tokens that are not
        with ablate(model, [f"language.layers.1.mlp.experts.{expert}.gate_proj:3"]):
            masked, again = _routed(model, ids, 1)
        assert torch.equal(again, top_k)  # the mask acts after the router: the routing is the same
        assert torch.equal(masked[~routed], clean[~routed]), expert
        changed = (masked != clean).any(dim=1)
        assert changed[routed].all(), expert
    # masking all of an expert's units is dropping its contribution: its routing weight set to zero by hand
    site = registry.by_name["language.layers.1.mlp.experts.2.gate_proj"]
    with ablate(model, [site.address(j) for j in range(site.size)]):
        masked, _ = _routed(model, ids, 1)

    def drop_expert(_m, args):
        hidden, index, weights = args
        return hidden, index, weights.masked_fill(index == 2, 0.0)

    handle = model.model.language_model.layers[1].mlp.experts.register_forward_pre_hook(drop_expert)
    try:
        by_hand, _ = _routed(model, ids, 1)
    finally:
        handle.remove()
    assert torch.equal(masked, by_hand)


def test_each_routed_experts_hook_gets_the_rows_of_the_tokens_routed_to_it(moe):
    """The rows handed to expert E's hook are E's units at its tokens, checked against transformers' batched_mm
    implementation, which runs every (token, k) pair in token order (no sort)."""
    model, ids = moe
    registry = SiteRegistry.of(model)
    act = model.model.language_model.layers[0].mlp.experts.act_fn
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    sites = [registry.by_name[f"language.layers.0.mlp.experts.{e}.gate_proj"] for e in range(4)]
    handles = [
        registry.hook(s, lambda x, s=s: seen.__setitem__(s.expert, (x.clone(), registry.expert_rows(s)[0])))
        for s in sites
    ]
    try:
        _, top_k = _routed(model, ids, 0)
    finally:
        for h in handles:
            h.remove()
    assert not act._forward_hooks and not model.model.language_model.layers[0].mlp.experts._forward_pre_hooks
    rows = {}
    handle = act.register_forward_hook(lambda _m, _a, out: rows.update(all=out))
    model.set_experts_implementation("batched_mm")
    try:
        _routed(model, ids, 0)
    finally:
        model.set_experts_implementation("grouped_mm")
        handle.remove()
    pairs = rows["all"].view(*top_k.shape, -1)  # batched_mm: row t * top_k + k is token t's k-th expert
    for expert, (values, tokens) in seen.items():
        token, slot = (top_k == expert).nonzero(as_tuple=True)
        assert sorted(tokens.tolist()) == token.tolist()
        expected = pairs[token, slot][tokens.argsort().argsort()]  # in the order of the hook's rows
        torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-6)


def test_routed_experts_refuse_what_they_cannot_place(moe):
    """Another experts implementation, or experts that see a part of their layer's tokens (ERNIE 4.5-VL's
    modality experts): one line, and the model is left unhooked."""
    from canprobe.ablation import ablate
    from canprobe.errors import InputError

    model, ids = moe
    address = ["language.layers.0.mlp.experts.1.gate_proj:0"]
    model.set_experts_implementation("eager")
    try:
        with pytest.raises(InputError, match="grouped_mm experts implementation; this model runs 'eager'"):
            with ablate(model, address):
                model(input_ids=ids)
    finally:
        model.set_experts_implementation("grouped_mm")
    block = model.model.language_model.layers[0].mlp
    handle = block.register_forward_pre_hook(
        lambda _m, args: (args[0][:, 1:].contiguous(),)
    )  # one position fewer per row
    try:
        with pytest.raises(InputError, match="read 16 of their layer's 18 tokens"):
            with ablate(model, address):
                model(input_ids=ids)
    finally:
        handle.remove()
    assert not block.experts._forward_pre_hooks and not block.experts.act_fn._forward_hooks
