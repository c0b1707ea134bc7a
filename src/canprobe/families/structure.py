"""Sites found from a model's structure, for vision-language models with no adapter.

Most vision-language models are three parts under different names: a vision tower of MLP blocks,
a projector, and a decoder whose layers hold an MLP or a mixture of experts. ``find`` reads them
from the module tree and the config, and checks what it found on the model:

- language: the text config gives the layer count L and width H; the layers are the list of L
  modules outside the towers (one under ``language_model``/``text_model`` first) whose items hold
  an FFN. A layer's FFN is its first submodule (outside attention) whose children match a layout
  in ``GATED``, ``FUSED`` or ``TWO_LAYER``, or that holds ``experts`` (a mixture of experts);
- vision: the list of the vision config's layer count under a vision tower, each layer an MLP;
- projector: a module named like one (``PROJECTORS``) that is ``linear, activation, linear`` and
  takes the image features alone (one that also takes the image grid runs once per image).

Checks, before any site is used: every language FFN writes H channels and the layer count is the
config's; each FFN module, called alone, calls each site module once and returns exactly what its
``down_proj`` wrote (the channels it adds to the residual stream; on the meta device, the same
tensor object); each MLP maps its width back to itself. What is not found or does not check out
stops with one line saying what, and ``--sites FILE``.

Addresses keep canprobe's one scheme: a dense FFN's ``gate_proj`` (its activation's output),
``up_proj``, ``down_proj`` and ``down_proj.input`` (two-layer MLPs: ``up_proj`` is the first
linear's output, as OPT's); a mixture of experts' ``down_proj`` is the block's output (every
expert's and the shared expert's contribution), its shared expert's units ``shared_expert.*``, and
routed expert E's gate units ``experts.E.gate_proj`` (``routed_experts``: fused 3-D experts only).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch

from canprobe.errors import UnsupportedModelError
from canprobe.families.base import Family, SiteKind, chat, chat_prompts, get_module, patch_rows, processor_for_images

log = logging.getLogger(__name__)

# dense FFN layouts: the names of their linears, gate -> up -> down, fused gate+up -> down, in -> out
GATED = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"), ("wi_0", "wi_1", "wo"))
FUSED = (("gate_up_proj", "down_proj"),)
TWO_LAYER = (
    ("fc1", "fc2"),
    ("linear_fc1", "linear_fc2"),
    ("c_fc", "c_proj"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("up_proj", "down_proj"),
    ("wi", "wo"),
)
ACTIVATIONS = ("act_fn", "activation_fn", "act", "act_func")
SHARED_EXPERTS = ("shared_expert", "shared_experts", "shared_mlp")
# a layer list under a path with one of these parts belongs to a tower (or to a side model), not to the decoder
TOWERS = ("vision", "visual", "image", "video", "audio", "speech", "dit", "resampler", "perceiver", "sam")
PROJECTORS = ("multi_modal_projector", "mm_projector", "projector", "connector", "merger", "aligner")
# every kind a found model can have, per component (what an address may name)
KINDS = {
    "language": (
        "gate_proj",
        "up_proj",
        "down_proj",
        "down_proj.input",
        *(f"shared_expert.{k}" for k in ("gate_proj", "up_proj", "down_proj", "down_proj.input")),
        "experts.gate_proj",
    ),
    "vision": ("fc1", "fc2", "gate_proj", "up_proj", "down_proj", "down_proj.input"),
    "projector": ("linear_1", "linear_2"),
}


def is_activation(module: object) -> bool:
    """A transformers or torch activation module (where a gate unit or an MLP's hidden unit is read)."""
    if not isinstance(module, torch.nn.Module) or next(module.children(), None) is not None:
        return False
    homes = ("torch.nn.modules.activation", "transformers.activations")
    return any(c.__module__ in homes for c in type(module).__mro__) or type(module).__name__.endswith("Activation")


def _linears(module: torch.nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in names)


def _activation(module: torch.nn.Module) -> str | None:
    return next((n for n in ACTIVATIONS if is_activation(getattr(module, n, None))), None)


@dataclass(frozen=True)
class FFN:
    """One FFN found in a layer: where it is, what kind of block, its site kinds (relative to the layer)."""

    path: str  # relative to the layer
    moe: bool
    kinds: dict[str, SiteKind]
    linears: tuple[str, ...] = ()  # dense: the first linear, the one writing the output (relative to the layer)
    activation: str = ""


def dense_ffn(module: torch.nn.Module, path: str, component: str) -> FFN | None:
    """The sites of a dense MLP at ``path`` (relative to its layer), from its children's names; None if none match."""
    p = f"{path}." if path else ""
    act = _activation(module)
    for gate, up, down in GATED:
        if _linears(module, gate, up, down):
            kinds = {"up_proj": SiteKind(p + up, "output", p + up, "out")}
            if act:
                kinds = {"gate_proj": SiteKind(p + act, "output", p + gate, "out"), **kinds}
            kinds["down_proj"] = SiteKind(p + down, "output", p + down, "out")
            kinds["down_proj.input"] = SiteKind(p + down, "input", p + down, "in")
            return FFN(path, False, kinds, (p + gate, p + down), act and p + act)
    for fused, down in FUSED:
        if _linears(module, fused, down) and act:
            kinds = {
                "gate_proj": SiteKind(p + act, "output", p + fused, "out", part=0, parts=2),
                "up_proj": SiteKind(p + fused, "output", p + fused, "out", part=1, parts=2),
                "down_proj": SiteKind(p + down, "output", p + down, "out"),
                "down_proj.input": SiteKind(p + down, "input", p + down, "in"),
            }
            return FFN(path, False, kinds, (p + fused, p + down), p + act)
    for first, second in TWO_LAYER:
        if _linears(module, first, second):
            if component == "language":
                kinds = {
                    "up_proj": SiteKind(p + first, "output", p + first, "out"),
                    "down_proj": SiteKind(p + second, "output", p + second, "out"),
                    "down_proj.input": SiteKind(p + second, "input", p + second, "in"),
                }
            else:
                hidden = (
                    SiteKind(p + act, "output", p + first, "out")
                    if act
                    else SiteKind(p + first, "output", p + first, "out")
                )
                kinds = {"fc1": hidden, "fc2": SiteKind(p + second, "output", p + second, "out")}
            return FFN(path, False, kinds, (p + first, p + second), act and p + act)
    return None


def bert_ffn(layer: torch.nn.Module) -> FFN | None:
    """A BERT-style layer's feed-forward part: ``intermediate`` (dense, activation) then ``output.dense``."""
    inner, out = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    if inner is None or out is None or not (_linears(inner, "dense") and _linears(out, "dense")):
        return None
    kinds = {
        "up_proj": SiteKind("intermediate.dense", "output", "intermediate.dense", "out"),
        "down_proj": SiteKind("output.dense", "output", "output.dense", "out"),
        "down_proj.input": SiteKind("output.dense", "input", "output.dense", "in"),
    }
    return FFN("", False, kinds, ("intermediate.dense", "output.dense"))


def routed_experts(experts: torch.nn.Module, path: str) -> SiteKind | None:
    """The gate units of fused 3-D experts run by transformers' experts implementations, or None.

    Such a module (``@use_experts_implementation``, ``has_gate``) keeps every expert's ``gate_up_proj`` in
    one [experts, 2 x units, hidden] parameter (transposed: [experts, hidden, 2 x units]), and its default
    gate (``transformers.integrations.moe``) calls ``act_fn`` once on the gate half of every routed
    (token, expert) row: ``act_fn``'s output holds the units ``act(gate)`` of all experts. Up units and
    the products ``act(gate) * up`` are computed by functions, out of reach of hooks; experts with their
    own gate (clamped, fused or without ``act_fn``) and experts of their own forward (Llama 4) get no sites.
    """
    act = _activation(experts)
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    gate = getattr(type(experts), "_apply_gate", None)
    if not (
        act
        and getattr(experts, "has_gate", False)
        and getattr(gate, "__module__", "") == "transformers.integrations.moe"
        and isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == down.dim() == 3
    ):
        return None
    units = down.shape[1] if getattr(experts, "is_transposed", False) else down.shape[2]
    return SiteKind(f"{path}.{act}", "output", "", "out", size=units, experts=gate_up.shape[0])


def moe_ffn(module: torch.nn.Module, path: str, width: int) -> FFN | None:
    """A mixture-of-experts block at ``path``: its output channels, its shared expert's units, and its
    routed experts' gate units."""
    experts = getattr(module, "experts", None)
    if experts is None:
        return None
    kinds = {"down_proj": SiteKind(path, "output", "", "out", size=width)}
    for name in SHARED_EXPERTS:
        shared = getattr(module, name, None)
        found = dense_ffn(shared, f"{path}.{name}", "language") if shared is not None else None
        if found is not None:
            kinds.update({f"shared_expert.{k}": v for k, v in found.kinds.items()})
            break
    routed = routed_experts(experts, f"{path}.experts") if isinstance(experts, torch.nn.Module) else None
    if routed is not None:
        kinds["experts.gate_proj"] = routed
    return FFN(path, True, kinds)


def _find_ffn(layer: torch.nn.Module, component: str, width: int) -> FFN | None:
    """The first submodule of a layer, outside attention, that is an FFN (a mixture of experts first); then
    an FFN written into the layer itself (OPT's fc1/fc2, BERT's intermediate/output)."""
    for path, module in layer.named_modules():
        parts = path.split(".")
        if not path or len(parts) > 2 or any("attn" in x or "attention" in x for x in parts):
            continue
        found = (moe_ffn(module, path, width) if component == "language" else None) or dense_ffn(
            module, path, component
        )
        if found is not None:
            return found
    return dense_ffn(layer, "", component) or (bert_ffn(layer) if component == "language" else None)


def _first(config, *names: str):
    return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)


@dataclass
class Structure:
    """What ``find`` read from one model: per component its layer paths and, per layer, its site kinds."""

    paths: dict[str, list[str]] = field(default_factory=dict)
    kinds: dict[str, list[dict[str, SiteKind]]] = field(default_factory=dict)
    ffns: dict[str, list[FFN]] = field(default_factory=dict)


def _refuse(model: torch.nn.Module, what: str) -> UnsupportedModelError:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    return UnsupportedModelError(
        f"no adapter for model type {model_type!r}, and its structure does not tell its sites: {what}; "
        "describe its neuron sites in a YAML file and pass --sites FILE"
    )


def _in_tower(model: torch.nn.Module, path: str) -> bool:
    """Whether a module path lies in a vision/audio tower (or a side model): by the names on its path, or
    by the classes of the modules it passes through below the base model (Pix2Struct's encoder is its ViT)."""
    parts = path.split(".")
    if any(any(t in part for t in TOWERS) for part in parts):
        return True
    for i in range(1, len(parts)):
        module = get_module(model, ".".join(parts[:i]))
        name = type(module).__name__.lower()
        if module is not model.base_model and any(t in name for t in (*TOWERS, "vit")):
            return True
    return False


def _layer_lists(model: torch.nn.Module, length: int, tower: bool) -> list[tuple[str, torch.nn.ModuleList]]:
    """Module lists of ``length`` items inside (tower) or outside (not tower) the vision/audio towers."""
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) != length or path.endswith("experts"):
            continue
        if _in_tower(model, path) == tower:
            found.append((path, module))
    return found


def _language(model: torch.nn.Module, structure: Structure) -> None:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = _first(text, "num_hidden_layers", "num_layers", "n_layer")
    width = _first(text, "hidden_size", "d_model", "n_embd")
    if layers is None or width is None:
        raise _refuse(model, "its text config gives no layer count and width (num_hidden_layers, hidden_size)")
    candidates = []
    for path, stack in _layer_lists(model, layers, tower=False):
        ffns = [_find_ffn(layer, "language", width) for layer in stack]
        if any(f is not None for f in ffns):
            candidates.append((path, ffns))
    if not candidates:
        raise _refuse(
            model,
            f"no list of {layers} decoder layers (num_hidden_layers) holding a feed-forward block "
            "(gate/up/down_proj, w1/w3/w2, gate_up_proj, fc1/fc2, c_fc/c_proj, or experts)",
        )
    stacks = [p for p, _ in candidates]
    if any("encoder" in p and "decoder" not in p for p in stacks) and any("decoder" in p for p in stacks):
        raise _refuse(model, f"its language model is an encoder-decoder ({', '.join(stacks)}), which needs an adapter")
    preferred = ("language_model", "text_model", "decoder")
    path, ffns = next((c for name in preferred for c in candidates if name in c[0]), candidates[0])
    missing = [i for i, f in enumerate(ffns) if f is None]
    if missing:
        raise _refuse(model, f"no feed-forward block in {path}.{missing[0]} ({len(missing)} of {layers} layers)")
    for i, ffn in enumerate(ffns):
        if not ffn.moe:
            out = get_module(model, f"{path}.{i}.{ffn.linears[1]}").out_features
            if out != width:
                raise _refuse(
                    model, f"{path}.{i}.{ffn.linears[1]} writes {out} channels, the text config's width is {width}"
                )
    structure.paths["language"] = [f"{path}.{i}" for i in range(layers)]
    structure.ffns["language"] = ffns
    structure.kinds["language"] = [f.kinds for f in ffns]


def _vision(model: torch.nn.Module, structure: Structure) -> None:
    vision = getattr(model.config, "vision_config", None)
    layers = _first(vision, "num_hidden_layers", "depth", "num_layers") if vision is not None else None
    if layers is None:
        return
    for path, stack in _layer_lists(model, layers, tower=True):
        if "video" in path or "audio" in path:
            continue
        ffns = [_find_ffn(layer, "vision", 0) for layer in stack]
        if any(f is None for f in ffns):
            continue
        shapes = [
            (get_module(model, f"{path}.{i}.{f.linears[0]}"), get_module(model, f"{path}.{i}.{f.linears[1]}"))
            for i, f in enumerate(ffns)
        ]
        if any(first.in_features != second.out_features for first, second in shapes):
            continue
        structure.paths["vision"] = [f"{path}.{i}" for i in range(layers)]
        structure.ffns["vision"] = ffns
        structure.kinds["vision"] = [f.kinds for f in ffns]
        return
    log.info("no vision tower of %d MLP layers found: no vision sites", layers)


def _projector(model: torch.nn.Module, structure: Structure) -> None:
    """The first module named like a projector whose children (or its ``mlp``'s) are linear, activation, linear."""
    import inspect

    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] not in PROJECTORS:
            continue
        required = [p for p in inspect.signature(module.forward).parameters.values() if p.default is p.empty]
        if len(required) > 1:  # it also takes the image grid and runs once per image (PaddleOCR-VL's): rows unknown
            continue
        for inner, holder in ((path, module), (f"{path}.mlp", getattr(module, "mlp", None))):
            if not isinstance(holder, torch.nn.Module):
                continue
            children = [
                (n, c) for n, c in holder.named_children() if isinstance(c, torch.nn.Linear) or is_activation(c)
            ]
            if [isinstance(c, torch.nn.Linear) for _, c in children] != [True, False, True]:
                continue
            (first, lin1), (act, _), (second, lin2) = children
            if lin1.out_features != lin2.in_features:
                continue
            rel = inner[len(path) + 1 :]
            p = f"{rel}." if rel else ""
            structure.paths["projector"] = [path]
            structure.kinds["projector"] = [
                {
                    "linear_1": SiteKind(p + act, "output", p + first, "out"),
                    "linear_2": SiteKind(p + second, "output", p + second, "out"),
                }
            ]
            return


def _check(model: torch.nn.Module, structure: Structure) -> None:
    """Call each dense FFN alone on two positions: it calls each site module once and returns what down_proj wrote."""
    for component in ("language", "vision"):
        for layer_path, ffn in zip(structure.paths.get(component, []), structure.ffns.get(component, [])):
            if ffn.moe or not ffn.path:  # a block routes tokens; an FFN written into its layer is not called alone
                continue
            module = get_module(model, f"{layer_path}.{ffn.path}")
            down = get_module(model, f"{layer_path}.{ffn.linears[1]}")
            watched = {s.module for s in structure.kinds[component][0].values()} | {ffn.linears[1]}
            seen: dict[str, list] = {name: [] for name in watched}
            handles = [
                get_module(model, f"{layer_path}.{name}").register_forward_hook(
                    lambda _m, _a, out, name=name, seen=seen: seen[name].append(out)
                )
                for name in watched
            ]
            weight = down.weight
            width = get_module(model, f"{layer_path}.{ffn.linears[0]}").in_features
            # a fixed, varied input (the global random state is left alone: runs stay reproducible)
            x = torch.linspace(-2.0, 2.0, 2 * width, device=weight.device).view(1, 2, width)
            training = [m.training for m in module.modules()]
            try:
                with torch.no_grad():
                    out = module.eval()(x.to(weight.dtype))
            except Exception as exc:  # a module that cannot be called alone cannot be checked
                raise _refuse(model, f"{layer_path}.{ffn.path} cannot be called alone ({type(exc).__name__})") from None
            finally:
                for h in handles:
                    h.remove()
                for m, mode in zip(module.modules(), training):
                    m.train(mode)
            if any(len(v) != 1 for v in seen.values()):
                name = next(n for n, v in seen.items() if len(v) != 1)
                raise _refuse(model, f"{layer_path}.{name} runs {len(seen[name])} times in one call of its FFN")
            written = seen[ffn.linears[1]][0]
            same = out is written or (out.device.type != "meta" and torch.equal(out, written))
            if not same:
                raise _refuse(model, f"{layer_path}.{ffn.path} returns more than its {ffn.linears[1]} writes")


_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def find(model: torch.nn.Module) -> Structure:
    """The structure of ``model``, read and checked once per model object."""
    structure = _FOUND.get(model)
    if structure is None:
        structure = Structure()
        _language(model, structure)
        _vision(model, structure)
        _projector(model, structure)
        _check(model, structure)
        _FOUND[model] = structure
    return structure


class FromStructure:
    """Mixin for a family whose sites are read from the model (``find``) rather than declared: an adapter
    then says only what structure cannot tell (prompts, inputs, cached features, crops, token counts)."""

    def components(self, model):
        return list(find(model).paths)

    def layer_paths(self, model, component):
        return find(model).paths.get(component)

    def kinds(self, model, component):
        merged: dict[str, SiteKind] = {}
        for kinds in find(model).kinds.get(component, []):
            merged.update({k: v for k, v in kinds.items() if k not in merged})
        return merged

    def layer_kinds(self, model, component, layer):
        return find(model).kinds[component][layer]


class Structured(FromStructure, Family):
    """Any image-text-to-text model with no adapter: sites from ``find``, prompts through the chat template."""

    name = "structure"

    def load_processor(self, path, trust_remote_code=False):
        """``AutoProcessor``; where it fails (a video processor needs torchvision): the processor without video."""
        try:
            return super().load_processor(path, trust_remote_code)
        except (ImportError, ValueError, RuntimeError, OSError) as exc:
            return processor_for_images(path, "", (str(exc).splitlines() or [type(exc).__name__])[0])

    def prompts(self, processor, prompts):
        """The processor's chat template with one image; the image token and the instruction without one."""
        if getattr(processor, "chat_template", None):
            try:
                return chat_prompts(processor, prompts)
            except AttributeError:  # an override reading the video part it was built without (SmolVLM's)
                from transformers.processing_utils import ProcessorMixin

                return [
                    ProcessorMixin.apply_chat_template(processor, m, add_generation_prompt=True) for m in chat(prompts)
                ]
        return [f"{getattr(processor, 'image_token', '<image>')}{p}" for p in prompts]

    def inputs(self, processor, images, texts):
        return dict(processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True))

    def vision_rows(self, model, enc):
        """Per image row (crop) the vision tower encodes, 1 / the crops of its sample; crops are assigned to
        samples in order, in proportion to each sample's image tokens (the config's image token id)."""
        if "image_grid_thw" in enc:  # one sequence of every image's patches (Qwen-VL, GLM-4V)
            return patch_rows(enc)
        pixels = enc.get("pixel_values")
        samples = enc["input_ids"].shape[0]
        if pixels is None or pixels.dim() != 4 or pixels.shape[0] == samples:
            return torch.ones(samples)
        image_id = _first(model.config, "image_token_id", "image_token_index")
        tokens = (enc["input_ids"] == image_id).sum(dim=1)
        crops = (tokens * pixels.shape[0] // tokens.sum()).tolist()
        return torch.cat([torch.full((c,), 1.0 / c) for c in crops])

    def tokens(self, config, component, text_tokens):
        vision = getattr(config, "vision_config", None)
        size, patch = (_first(vision, "image_size"), _first(vision, "patch_size")) if vision is not None else (0, 0)
        patches = (size // patch) ** 2 if size and patch else 256
        if component in ("vision", "projector"):
            return patches
        return patches + text_tokens


STRUCTURED = Structured()
