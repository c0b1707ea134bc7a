"""Inventory of a model's neuron sites and the memory that scoring it will need.

Every model is built from its config alone on the meta device (shapes, no weights): the paper's two
models ship as config files (``configs/*.json``), and a folder or hub id needs only its config.json,
so true counts come out in seconds, with no weights read (a 30B model before downloading it).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from canprobe.errors import ModelLoadError
from canprobe.faults import DTYPES
from canprobe.models import first_line
from canprobe.sites import Site, SiteRegistry

CONFIGS_DIR = Path(__file__).parent / "configs"
SHIPPED_CONFIGS = tuple(sorted(p.stem for p in CONFIGS_DIR.glob("*.json")))
TEXT_TOKENS = 40  # caption + prompt tokens assumed by the activation estimate


@dataclass(frozen=True)
class SiteKindRow:
    """One site kind of one component, summed over its layers."""

    component: str
    kind: str
    layers: int
    neurons_per_layer: int
    neurons: int
    parameters: int  # of the linear layers whose rows/columns are these neurons


@dataclass(frozen=True)
class ComponentRow:
    component: str
    layers: int
    parameters: int  # in its layers (or the projector), embeddings excluded
    tokens: int  # sequence length per sample used by the activation estimate
    activation_bytes: int


@dataclass(frozen=True)
class Inventory:
    model: str
    dtype: str
    sites: list[SiteKindRow]
    components: list[ComponentRow]
    parameters: int
    weight_bytes: int
    activation_bytes: int

    @property
    def scoring_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


def build_shipped(name: str) -> torch.nn.Module:
    """The architecture of a shipped config on the meta device: shapes without storage."""
    from transformers import AutoConfig

    from canprobe.families import family_for

    data = json.loads((CONFIGS_DIR / f"{name}.json").read_text())
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    config = AutoConfig.for_model(**data)
    with torch.device("meta"):
        return family_for(config).model_class().from_config(config)


def component_modules(registry: SiteRegistry) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """Per component: (the module owning the layer list, for its config; the layer list itself)."""
    out = {}
    for site in registry.sites:
        parts = site.module_path.split(".")
        if site.component == "projector":
            module = registry.model.get_submodule(".".join(parts[:-1]))
            out.setdefault(site.component, (module, module))
            continue
        i = next(k for k, part in enumerate(parts) if part.isdigit())
        owner = registry.model.get_submodule(".".join(parts[: i - 1]))
        out.setdefault(site.component, (owner, registry.model.get_submodule(".".join(parts[:i]))))
    return out


def _activation_elements(module: torch.nn.Module, component: str, tokens: int, layers: int, widths: set[int]) -> int:
    """Elements saved for the backward pass with frozen weights, per sample.

    Per token and layer: 8 x hidden (norm inputs, q/k/v, attention and MLP outputs) plus
    4 x intermediate (MLP activations), plus heads x tokens attention probabilities where the
    attention is eager (SDPA and flash attention keep none); a rough upper bound of what autograd
    keeps, not a measurement (LLaVA-1.5's language model, measured on CPU: 0.78x of it).
    """
    cfg = getattr(module, "config", None)
    if cfg is None or component == "projector":
        width = max((m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)), default=0)
        return 4 * width * tokens
    # the MLP's narrowest site is its output (the hidden size), its widest its hidden units
    hidden, inter = min(widths), max(widths)
    eager = getattr(cfg, "_attn_implementation", None) in (None, "eager")
    heads = getattr(cfg, "num_attention_heads", 1) if eager else 0
    return layers * tokens * (8 * hidden + 4 * inter + heads * tokens)


def inventory(model: torch.nn.Module, name: str, dtype: str) -> Inventory:
    """Sites per component and kind, parameters, and the memory a batch-1 scoring pass needs."""
    registry = SiteRegistry.of(model)
    groups: dict[tuple[str, str], list[Site]] = {}
    for site in registry.sites:
        groups.setdefault((site.component, site.kind), []).append(site)
    experts = Counter(s.module_path for s in registry.sites if s.expert >= 0)  # routed experts per module
    rows = []
    for (component, kind), sites in groups.items():
        # the linears that own the neurons; a mixture of experts' output channels: the whole block; a routed
        # expert's units: its share of the experts module
        owners = [
            (registry.weight(s), s.parts)
            if s.weight_path
            else (registry.module(s), 1)
            if s.expert < 0
            else (registry.model.get_submodule(s.module_path.rsplit(".", 1)[0]), experts[s.module_path])
            for s in sites
        ]
        params = sum(p.numel() // parts for owner, parts in owners for p in owner.parameters())
        by_layer = Counter()  # a routed expert's kind: every expert's units of the layer
        for s in sites:
            by_layer[s.layer] += s.size
        sizes = set(by_layer.values())
        per_layer = sizes.pop() if len(sizes) == 1 else 0
        rows.append(SiteKindRow(component, kind, len(by_layer), per_layer, sum(by_layer.values()), params))
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    components = []
    for component, (owner, stack) in component_modules(registry).items():
        layers = len({s.layer for s in registry.sites if s.component == component})
        tokens = registry.family.tokens(model.config, component, TEXT_TOKENS)
        widths = {s.size for s in registry.sites if s.component == component and s.expert < 0}
        elements = _activation_elements(owner, component, tokens, layers, widths)
        components.append(
            ComponentRow(component, layers, sum(p.numel() for p in stack.parameters()), tokens, elements * itemsize)
        )
    total = sum(p.numel() for p in model.parameters())
    activation = sum(c.activation_bytes for c in components)
    # float32 score and signed accumulators for every neuron
    activation += 8 * sum(r.neurons for r in rows)
    return Inventory(name, dtype, rows, components, total, total * itemsize, activation)


def meta_model(name: str, sites: str | Path | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """The architecture of a shipped config, built-in organism, local folder or hub id, on the meta device.

    Only the config is read; ``sites``: a site file whose family is attached to the model.
    """
    if name in SHIPPED_CONFIGS:
        return build_shipped(name)
    from transformers import AutoConfig

    from canprobe.families import attach, family_for
    from canprobe.models import BUILTIN_MODELS, resolve_model_path

    if "/" not in name and name not in BUILTIN_MODELS and not Path(name).exists():
        raise ModelLoadError(
            f"unknown model {name!r}: shipped configs are {', '.join(SHIPPED_CONFIGS)}; built-in models are "
            f"{', '.join(BUILTIN_MODELS)}; otherwise give a local checkpoint folder or a hub id"
        )
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the config of {name!r}: {str(exc).splitlines()[0]}") from None
    if sites is not None:
        from canprobe.families.sitefile import read_site_file

        family = read_site_file(sites)
    else:
        family = family_for(config)
    try:
        with torch.device("meta"):
            model = family.model_class().from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a config transformers itself cannot build (its defaults, a missing library)
        raise ModelLoadError(f"cannot build {name!r} from its config: {first_line(exc)}") from None
    if sites is not None:
        attach(model, family)
    return model


def inspect_model(
    name: str, dtype: str = "float32", sites: str | Path | None = None, trust_remote_code: bool = False
) -> Inventory:
    """Inventory of any model from its config alone (``sites``: a site file)."""
    return inventory(meta_model(name, sites, trust_remote_code), name, dtype)


def format_inventory(inv: Inventory) -> list[str]:
    """Plain-text tables for the CLI."""
    gib = 1024**3
    lines = [f"{inv.model}: {inv.parameters:,} parameters", ""]
    lines.append(f"{'site':28s} {'layers':>6s} {'per layer':>10s} {'neurons':>12s} {'parameters':>15s}")
    for r in inv.sites:
        per = f"{r.neurons_per_layer:,}" if r.neurons_per_layer else "mixed"
        lines.append(f"{r.component + '.' + r.kind:28s} {r.layers:6d} {per:>10s} {r.neurons:12,d} {r.parameters:15,d}")
    lines.append(f"{'all sites':28s} {'':6s} {'':10s} {sum(r.neurons for r in inv.sites):12,d}")
    lines += ["", f"{'component':12s} {'layers':>6s} {'parameters':>15s} {'tokens':>7s} {'activations':>12s}"]
    for c in inv.components:
        lines.append(
            f"{c.component:12s} {c.layers:6d} {c.parameters:15,d} {c.tokens:7d} {c.activation_bytes / gib:9.2f} GiB"
        )
    lines += [
        "",
        f"memory to score one image ({inv.dtype}): {inv.scoring_bytes / gib:.2f} GiB = weights "
        f"{inv.weight_bytes / gib:.2f} GiB + activations {inv.activation_bytes / gib:.2f} GiB",
        f"(activations estimated: per token and layer, 8 x hidden + 4 x intermediate elements (+ heads x tokens "
        f"with eager attention) kept for backward, one image and {TEXT_TOKENS} text tokens, plus float32 score "
        f"accumulators; grows linearly with batch size)",
    ]
    return lines
