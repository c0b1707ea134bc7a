"""Every family on a tiny random checkpoint built here from its config (no downloads).

One builder per family in BUILDERS writes a checkpoint folder (model + processor or tokenizer);
every test below runs for each of them: the CLI from inspect to search, Captum cross-checks of
each site kind, masks against hand edits, per-row masks, and the empty mask.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from canprobe.ablation import StandingMasks, ablate, ablate_rows, to_model_inputs
from canprobe.captions import generate_captions
from canprobe.config import Generation, Scoring
from canprobe.families import family_for
from canprobe.inputs import teacher_forcing_inputs
from canprobe.models import LoadedModel, load_model
from canprobe.organisms.scenes import make_scenes
from canprobe.scoring import per_sample_loss, score_neurons
from canprobe.sites import SiteRegistry
from tests.conftest import TINY

TEXTS = ["a small red car", "a large blue boat on the left with a white background", "a tree"]


def _tiny_text_config(config_class, vocab_size: int):
    from canprobe.organisms.build import BOS_ID, EOS_ID, PAD_ID

    return config_class(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def _organism(builder, **shape) -> Callable[[Path], None]:
    import dataclasses

    def build(out: Path) -> None:
        model, processor = builder(dataclasses.replace(TINY, **shape))
        model.save_pretrained(out)
        processor.save_pretrained(out)

    return build


def _llava(out: Path) -> None:
    from canprobe.organisms.build import build_llava

    _organism(build_llava)(out)


def _instructblip(out: Path) -> None:
    from canprobe.organisms.build import build_instructblip

    # two Q-Former layers: the text branch of the last one never reaches the loss
    _organism(build_instructblip, qformer_layers=2)(out)


def _llava_next(out: Path) -> None:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from canprobe.organisms.build import IMAGE_ID, LLAVA_CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    pins = [[16, 32], [32, 16], [32, 32]]
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=20, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=_tiny_text_config(LlamaConfig, len(tok)),
        image_grid_pinpoints=pins,
        image_token_index=IMAGE_ID,
        vision_feature_layer=-1,
    )
    LlavaNextForConditionalGeneration(config).save_pretrained(out)
    LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=pins
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    ).save_pretrained(out)


def _decoder(config_name: str, model_name: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        import transformers

        from canprobe.organisms.build import build_tokenizer

        tok = build_tokenizer(image_token_attribute=False)
        config = _tiny_text_config(getattr(transformers, config_name), len(tok))
        getattr(transformers, model_name)(config).save_pretrained(out)
        tok.save_pretrained(out)

    return build


# a model with no adapter, probed through a site file written beside it (--sites)
NEOX_SITES = """\
loader: causal-lm
sites:
  - {component: language, module: gpt_neox.layers.*.mlp.act, weight: gpt_neox.layers.*.mlp.dense_h_to_4h, kind: up_proj}
  - {component: language, module: gpt_neox.layers.*.mlp.dense_4h_to_h, kind: down_proj}
  - {component: language, module: gpt_neox.layers.*.mlp.dense_4h_to_h, kind: down_proj.input, reading: input}
"""


def _gpt_neox_with_site_file(out: Path) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from canprobe.organisms.build import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

    tok = build_tokenizer(image_token_attribute=False)
    config = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    GPTNeoXForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    (out / SITE_FILE).write_text(NEOX_SITES)


SITE_FILE = "sites.yaml"

# family checkpoint name -> builder writing a tiny random checkpoint folder (and a site file, if it needs one)
BUILDERS: dict[str, Callable[[Path], None]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "instructblip": _instructblip,
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM"),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM"),
    "gpt_neox-sites": _gpt_neox_with_site_file,
}


def _new_family(name: str, builders: str = "new_family_builders") -> Callable[[Path], None]:
    def build(out: Path) -> None:
        import importlib

        model, processor = getattr(importlib.import_module(f"tests.{builders}"), f"build_{name}")()
        model.save_pretrained(out)
        processor.save_pretrained(out)

    return build


NEW_DECODERS = ("qwen3", "gemma2", "gemma3_text", "phi3")
NEW_VLMS = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma", "gemma3", "idefics3", "mllama")
NEW_VLMS += ("blip2_opt", "blip2_flan_t5", "blip2_t5", "instructblip_flan_t5")
BUILDERS.update({name: _new_family(name) for name in NEW_DECODERS + NEW_VLMS})
# families with no adapter, read from their structure (tests/structure_builders.py)
STRUCTURED = ("vipllava", "aya_vision", "idefics2", "smolvlm", "internvl", "paddleocr_vl", "qwen3_5")
STRUCTURED += ("gemma4", "glm4v", "glm46v", "glm4v_moe", "qwen3_vl_moe", "qwen3_5_moe")

BUILDERS.update({name: _new_family(name, "structure_builders") for name in STRUCTURED})
DECODERS = ("llama", "mistral", "qwen2", "gpt_neox-sites", *NEW_DECODERS)


@pytest.fixture(scope="module", params=list(BUILDERS))
def checkpoint(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    BUILDERS[request.param](out)
    return out


def _sites(checkpoint: Path) -> list:
    """The --sites option for a checkpoint that came with a site file."""
    return ["--sites", checkpoint / SITE_FILE] if (checkpoint / SITE_FILE).exists() else []


@pytest.fixture(scope="module")
def lm(checkpoint) -> LoadedModel:
    sites = _sites(checkpoint)
    return load_model(str(checkpoint), sites=sites[1] if sites else None)


IMAGES = [im for im, _ in make_scenes(len(TEXTS), seed=5)]


def _images(lm: LoadedModel):
    return IMAGES if lm.family.takes_images else None


def _inputs(lm: LoadedModel) -> dict:
    enc = teacher_forcing_inputs(lm.processor, lm.family, _images(lm), TEXTS)
    return to_model_inputs(enc, lm.model)


def test_family_is_found_by_model_type(lm):
    assert family_for(lm.model) is lm.family
    assert SiteRegistry(lm.model).select("language.down_proj")


def test_cli_inspect_and_score(cli, checkpoint, lm, scene_dir, tmp_path):
    out = cli("inspect", checkpoint, *_sites(checkpoint))
    assert out.code == 0, out.err
    assert "language.down_proj" in out.out
    args = [
        "score",
        "--model",
        checkpoint,
        *_sites(checkpoint),
        "--images",
        scene_dir,
        "--out",
        tmp_path / "s",
        "--max-new-tokens",
        "4",
    ]
    if not lm.family.takes_images:
        args += ["--captions", "reference"]  # a text-only model scores the texts themselves
    out = cli(*args, "--scope", "language")
    assert out.code == 0, out.err
    assert (tmp_path / "s" / "ranking.parquet").exists() and "language.layers." in out.out


def _captum(lm: LoadedModel, sites, to_input: bool) -> dict[str, dict[str, torch.Tensor]]:
    """CAN alpha=1 and alpha=0 per site from Captum, with position weights built here."""
    from captum.attr import LayerActivation, LayerGradientXActivation

    enc = teacher_forcing_inputs(lm.processor, lm.family, _images(lm), TEXTS)
    key = "pixel_values" if lm.family.takes_images else "attention_mask"

    def forward(x):
        return per_sample_loss(lm.model, {**enc, key: x})

    registry = SiteRegistry(lm.model)
    labels = enc["labels"]
    if "decoder_input_ids" in enc:  # T5's decoder predicts the labels in place
        loss_pos = (labels != -100).float()
    else:
        loss_pos = torch.zeros_like(labels, dtype=torch.float32)
        loss_pos[:, :-1] = (labels[:, 1:] != -100).float()
    out = {}
    routed = [s for s in sites if s.expert >= 0]
    if routed:
        out.update(_captum_routed(lm, routed, forward, enc[key], loss_pos))
        sites = [s for s in sites if s.expert < 0]
    layers = [registry.module(s) for s in sites]
    gxa = LayerGradientXActivation(forward, layers).attribute(enc[key], attribute_to_layer_input=to_input)
    act = LayerActivation(forward, layers).attribute(enc[key], attribute_to_layer_input=to_input)
    for site, g, a in zip(sites, gxa, act):
        if g.shape[-1] != site.size:  # the site's slice of a fused linear's output (Phi-3's gate_up_proj)
            g, a = g.chunk(site.parts, dim=-1)[site.part], a.chunk(site.parts, dim=-1)[site.part]
        if site.component == "language" and lm.family.encoder_site(site.module_path):  # T5's encoder: the prompt
            am = enc["attention_mask"].float()
            w = am / am.sum(1, keepdim=True)
        elif site.component == "language":
            w = loss_pos / loss_pos.sum(1, keepdim=True)
        elif site.component == "qformer" and not site.kind.endswith("_query"):
            qm = enc["qformer_attention_mask"].float()
            w = qm / qm.sum(1, keepdim=True)
        elif g.dim() == 2:  # one sequence of every image's patches, in merger groups (Qwen-VL)
            counts = enc["image_grid_thw"].prod(-1)
            w = torch.repeat_interleave(1.0 / counts, counts).view(g.shape[0], -1).sum(1)
        else:  # every position of every image row; the same number of rows (crops) per image here
            crops = g.shape[0] // len(TEXTS)
            w = torch.full(g.shape[:2], 1.0 / (g.shape[1] * crops))
        w = w.reshape(g.shape[:-1])  # OPT's MLP sees rows and positions flattened into one
        dims = tuple(range(g.dim() - 1))
        out[site.name] = {
            "can1": (w[..., None] * g.abs()).sum(dims) / len(TEXTS),
            "can0": (w[..., None] * a.abs()).sum(dims) / len(TEXTS),
        }
    return out


def _captum_routed(lm: LoadedModel, sites, forward, x, loss_pos) -> dict[str, dict[str, torch.Tensor]]:
    """Routed experts' units from Captum, run under transformers' batched_mm experts implementation: its act_fn
    sees every (token, k) pair in token order, so row r is token r // top_k's expert top_k_index[r] (no sort).
    The reference averages over the loss positions routed to each expert."""
    from captum.attr import LayerActivation, LayerGradientXActivation

    registry = SiteRegistry(lm.model)
    modules = list(dict.fromkeys(registry.module(s) for s in sites))
    top_k: dict[int, torch.Tensor] = {}
    handles = [
        registry.model.get_submodule(s.module_path.rsplit(".", 1)[0]).register_forward_pre_hook(
            lambda _m, args, layer=s.layer: top_k.__setitem__(layer, args[1])
        )
        for s in {s.module_path: s for s in sites}.values()
    ]
    lm.model.set_experts_implementation("batched_mm")
    try:
        gxa = LayerGradientXActivation(forward, modules).attribute(x)
        act = LayerActivation(forward, modules).attribute(x)
    finally:
        lm.model.set_experts_implementation("grouped_mm")
        for h in handles:
            h.remove()
    gxa, act = (dict(zip(modules, v if isinstance(v, list) else [v])) for v in (gxa, act))
    loss = loss_pos.reshape(-1) > 0
    out = {}
    for site in sites:
        module, index = registry.module(site), top_k[site.layer]
        rows = index.reshape(-1) == site.expert
        w = loss[torch.arange(index.numel()) // index.shape[-1]][rows].float()[:, None]
        g, a = gxa[module][rows], act[module][rows]
        out[site.name] = {
            "can1": (w * g.abs()).sum(0) / w.sum().clamp(min=1),
            "can0": (w * a.abs()).sum(0) / w.sum().clamp(min=1),
        }
    return out


def _reaching_sites(lm: LoadedModel, scope: str):
    """Sites of ``scope`` whose output reaches the loss (Captum cannot attribute a site that does not)."""
    registry = SiteRegistry(lm.model)
    enc = _inputs(lm)
    sites = registry.select(scope)
    grads = {}
    handles = []
    for site in sites:

        def keep(x, name=site.name):
            if not x.requires_grad:
                x.requires_grad_(True)
            x.register_hook(lambda g: grads.__setitem__(name, g.abs().sum()))

        module = registry.module(site)
        if site.hook == "output":
            handles.append(module.register_forward_hook(lambda _m, _a, out, keep=keep: keep(out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda _m, args, keep=keep: keep(args[0])))
    try:
        with torch.enable_grad():
            per_sample_loss(lm.model, enc).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return [s for s in sites if float(grads.get(s.name, 0)) > 0]


@pytest.mark.parametrize("to_input", [False, True], ids=["outputs", "down_proj.input"])
def test_can_matches_captum_for_every_site_kind(lm, to_input):
    registry = SiteRegistry(lm.model)
    scope = ",".join(s for s in registry.scopes if s.endswith(".input") == to_input)
    if not scope:  # a model of expert blocks alone has no site read at a module's input
        assert to_input and all(s.hook == "output" for s in registry.sites)
        return
    sites = _reaching_sites(lm, scope)
    assert {s.scope for s in sites} == set(scope.split(","))  # every kind has a site that reaches the loss
    reference = _captum(lm, sites, to_input)
    names = ",".join(dict.fromkeys(s.scope for s in sites))
    can1 = score_neurons(
        lm, _images(lm), scoring=Scoring(alpha=1.0), generation=Generation(batch_size=2), scope=names, captions=TEXTS
    )
    can0 = score_neurons(
        lm, _images(lm), scoring=Scoring(alpha=0.0), generation=Generation(batch_size=2), scope=names, captions=TEXTS
    )
    for site in sites:
        for ours, theirs in (
            (can1.scores[site.name], reference[site.name]["can1"]),
            (can0.scores[site.name], reference[site.name]["can0"]),
        ):
            err = float((ours - theirs.detach()).abs().max() / theirs.detach().abs().max().clamp(min=1e-30))
            assert err < 1e-5, (site.name, err)


def test_masking_all_down_proj_channels_equals_zeroing_the_mlp_output(lm):
    registry = SiteRegistry(lm.model)
    site = registry.by_name["language.layers.0.mlp.down_proj"]
    enc = _inputs(lm)
    enc.pop("labels")
    with ablate(lm, [site.address(i) for i in range(site.size)]):
        masked = lm.model(**enc).logits
    # the MLP module whose output down_proj writes (OPT has none: fc2 writes the layer's MLP output; a mixture
    # of experts' down_proj is the block's output)
    parent = site.weight_path.rsplit(".", 1)[0]
    if not site.weight_path:
        mlp = lm.model.get_submodule(site.module_path)
    else:
        mlp = lm.model.get_submodule(parent if parent.endswith((".mlp", ".DenseReluDense")) else site.weight_path)
    handle = mlp.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
    try:
        by_hand = lm.model(**enc).logits
    finally:
        handle.remove()
    assert torch.equal(masked, by_hand)
    assert not torch.equal(masked, lm.model(**enc).logits)


def test_per_row_masks_equal_each_mask_alone(lm):
    registry = SiteRegistry(lm.model)
    a = [s.address(1) for s in registry.select("language.down_proj")]
    # other kinds where the model has them (an all-experts model has only its blocks' outputs)
    others = [s for s in registry.select("language") if s.kind != "down_proj"] or registry.select("language")
    b = [others[-1].address(0), others[0].address(2)]
    masks = [a, b, []]
    enc = _inputs(lm)
    enc.pop("labels")
    with ablate_rows(lm, masks):
        together = lm.model(**enc).logits
    for row, mask in enumerate(masks):
        with ablate(lm, mask):
            alone = lm.model(**enc).logits[row]
        torch.testing.assert_close(together[row], alone, rtol=1e-5, atol=1e-6)


def test_an_empty_mask_leaves_outputs_bit_identical(lm):
    if lm.family.takes_images:
        plain = generate_captions(lm, IMAGES, Generation(max_new_tokens=6))
        with ablate(lm, []):
            masked = generate_captions(lm, IMAGES, Generation(max_new_tokens=6))
        routed = [s.name for s in SiteRegistry(lm.model).sites if s.expert >= 0]
        if routed:  # hooks on every routed expert's units, each row with nothing to mask
            with StandingMasks(lm, routed, len(IMAGES)) as standing, standing.loaded([[]] * len(IMAGES)):
                hooked = generate_captions(lm, IMAGES, Generation(max_new_tokens=6, batch_size=len(IMAGES)))
            assert hooked == plain
    else:
        enc = _inputs(lm)
        enc.pop("labels")
        plain = lm.model(**enc).logits
        with ablate(lm, []):
            masked = lm.model(**enc).logits
        plain, masked = plain.numpy().tobytes(), masked.numpy().tobytes()
    assert plain == masked


def test_cli_search_and_ablate(cli, checkpoint, lm, scene_dir, tmp_path):
    """Vision-language models caption the images; text-only models continue the texts of captions.jsonl."""
    common = ["--model", checkpoint, *_sites(checkpoint), "--images", scene_dir, "--per-category", "1"]
    common += ["--max-new-tokens", "4", "--batch-size", "16", "--clip-model", "toy-clip"]
    registry = SiteRegistry(lm.model)
    # a mixture of experts: its routed experts' units too (per-row masks in the batched evaluation)
    routed = [s for s in registry.sites if s.expert >= 0]
    scope = ["--scope", "language.down_proj,language.experts.gate_proj"] if routed else []
    out = cli("search", *common, *scope, "--out", tmp_path / "run", "--max-k", "8", "--grid-per-octave", "0")
    assert out.code == 0, out.err
    assert "k* = " in out.out
    neurons = ",".join(s.address(0) for s in [*registry.select("language.down_proj"), *routed[-2:]])
    out = cli("ablate", *common, "--neurons", neurons)
    assert out.code == 0, out.err
    assert f"masked ({neurons.count(',') + 1} neuron(s), zero)" in out.out
    if not lm.family.takes_images:
        assert "CLIP    nan" in out.out  # no CLIP score for text


@pytest.mark.parametrize("checkpoint", ["phi3"], indirect=True)
def test_fused_gate_up_sites_read_mask_and_flip_their_own_half(lm):
    """Phi-3's gate_up_proj: up units are the second half of its output and of its weight rows."""
    registry = SiteRegistry(lm.model)
    gate, up = (registry.by_name[f"language.layers.0.mlp.{k}"] for k in ("gate_proj", "up_proj"))
    linear = registry.weight(up)
    assert linear is registry.weight(gate) and gate.size == up.size == linear.out_features // 2
    enc = _inputs(lm)
    enc.pop("labels")
    seen: dict[str, torch.Tensor] = {}
    handles = [
        registry.hook(up, lambda x: seen.__setitem__("up", x.clone())),
        linear.register_forward_hook(lambda _m, _a, out: seen.__setitem__("fused", out.clone())),
    ]
    try:
        lm.model(**enc)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(seen["up"], seen["fused"][..., up.size :])
    with ablate(lm, [up.address(3)]):
        masked = lm.model(**enc).logits

    def zero_column(_m, _a, out):
        out = out.clone()
        out[..., up.size + 3] = 0
        return out

    handle = linear.register_forward_hook(zero_column)
    try:
        by_hand = lm.model(**enc).logits
    finally:
        handle.remove()
    assert torch.equal(masked, by_hand)
    before = linear.weight.detach().clone()
    with ablate(lm, [up.address(3), gate.address(5)], fault="weight_bitflip:bit=sign:weights=all"):
        changed = (linear.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [5, up.size + 3]
    assert torch.equal(linear.weight, before)


@pytest.mark.parametrize("checkpoint", [n for n in BUILDERS if n not in DECODERS], indirect=True)
def test_massive_activations_cover_every_layer_reading_the_prompt(lm):
    """inspect --activations: one peak per language layer that reads prompt and caption (a T5's encoder)."""
    from canprobe.massive import massive_activations

    report = massive_activations(lm, IMAGES, captions=TEXTS, ratio=2.0)
    family = lm.family
    layers = [
        s.layer
        for s in SiteRegistry(lm.model).select("language.down_proj")
        if not family.encoder_decoder or family.encoder_site(s.module_path)
    ]
    assert [p.layer for p in report.layers] == layers
    assert all(p.ratio >= 1 for p in report.layers)


@pytest.mark.parametrize("checkpoint", ["qwen2_vl"], indirect=True)
def test_a_torchvision_that_does_not_load_leaves_the_image_processor(checkpoint, lm, monkeypatch, caplog):
    """Where torchvision is installed but does not import against this torch, the processor is built
    without its video processor (one log line) and captions as the torchvision-free one does."""
    import transformers
    import transformers.utils

    def broken(*_args, **_kwargs):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", broken)
    with caplog.at_level("INFO", logger="canprobe.families.base"):
        processor = lm.family.load_processor(str(checkpoint))
    assert "torchvision does not load (operator torchvision::nms does not exist)" in caplog.text
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.chat_template == lm.processor.chat_template
    prompts = lm.family.prompts(processor, ["describe"]) * len(IMAGES)
    ours, theirs = (lm.family.inputs(p, IMAGES, prompts) for p in (processor, lm.processor))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("checkpoint", ["glm4v_moe"], indirect=True)  # its layers get position ids (Qwen3-VL's not)
def test_routed_experts_statistics_cover_the_tokens_routed_to_them(lm):
    """Clean means of a routed expert's units (mean ablation) average its rows at the non-pad tokens routed to it,
    overall and per token position: checked against transformers' batched_mm implementation (every (token, k)
    pair in token order)."""
    from canprobe.ablation import activation_stats
    from canprobe.errors import InputError
    from canprobe.neurons import record_neurons

    registry = SiteRegistry(lm.model)
    sites = [registry.by_name[f"language.layers.1.mlp.experts.{e}.gate_proj"] for e in range(4)]
    generation = Generation(batch_size=len(TEXTS))
    stats = activation_stats(lm, IMAGES, sites, captions=TEXTS, generation=generation, by_position=True)
    enc = _inputs(lm)
    enc.pop("labels")
    experts = lm.model.get_submodule(sites[0].module_path.rsplit(".", 1)[0])
    first = lm.model.get_submodule(registry.family.layer_paths(lm.model, "language")[0])
    seen = {}
    handles = [
        experts.register_forward_pre_hook(lambda _m, args: seen.update(top_k=args[1])),
        experts.act_fn.register_forward_hook(lambda _m, _a, out: seen.update(rows=out)),
        first.register_forward_pre_hook(lambda _m, _a, kw: seen.update(ids=kw["position_ids"]), with_kwargs=True),
    ]
    lm.model.set_experts_implementation("batched_mm")
    try:
        with torch.no_grad():
            lm.model(**enc)
    finally:
        lm.model.set_experts_implementation("grouped_mm")
        for h in handles:
            h.remove()
    top_k, k = seen["top_k"], seen["top_k"].shape[-1]
    attended = enc["attention_mask"].reshape(-1).bool()[torch.arange(top_k.numel()) // k]
    ids = seen["ids"][0] if seen["ids"].dim() == 3 else seen["ids"]  # multimodal RoPE: its first axis
    place = ids.expand(enc["attention_mask"].shape).reshape(-1)[torch.arange(top_k.numel()) // k]
    for site in sites:
        rows = (top_k.reshape(-1) == site.expert) & attended
        torch.testing.assert_close(stats[site.name].mean, seen["rows"][rows].mean(0), rtol=1e-5, atol=1e-6)
        for p in place[rows].unique().tolist():
            here = seen["rows"][rows & (place == p)].mean(0)
            torch.testing.assert_close(stats[site.name].position_mean[p], here, rtol=1e-5, atol=1e-6)
    # the routed rows follow their tokens when each layer is recomputed in the backward pass
    scope, scoring = "language.experts.gate_proj", Scoring(alpha=1.0)
    plain = score_neurons(lm, IMAGES, scope, scoring, Generation(batch_size=2), captions=TEXTS)
    again = score_neurons(lm, IMAGES, scope, scoring, Generation(batch_size=2), TEXTS, gradient_checkpointing=True)
    for name, value in plain.scores.items():
        torch.testing.assert_close(again.scores[name], value, rtol=1e-5, atol=1e-9)
    with pytest.raises(InputError, match="routed expert's units exist only at the tokens routed to it"):
        record_neurons(lm, IMAGES[:1], ["one"], [sites[0].address(0)])
