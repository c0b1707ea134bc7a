"""Neuron sites and addresses: where the neurons of a model live, and one printable name per neuron.

A *site* is one tensor of neurons in one layer, read at a module's output (or input), e.g. the
output channels of ``down_proj`` in language layer 17. A neuron is a site plus an index, printed
as ``language.layers.17.mlp.down_proj:2533``; ``parse_address`` turns that string back into the
same neuron. A *scope* selects sites: ``language.down_proj``, ``vision``, ``qformer.output_query``,
or several joined by commas.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from canprobe.errors import InputError, UnsupportedModelError
from canprobe.families import family_for, known_kinds
from canprobe.families.base import get_module

# ASCII digits only and no leading zeros, "mlp." exactly where the printed name has it, nothing
# around the address: every accepted string prints back to itself.
_ADDRESS = re.compile(
    r"(?:(?P<comp>language|vision)\.layers\.(?P<layer>0|[1-9][0-9]{0,5})\.mlp\.(?P<kind>[a-z_0-9.]+)"
    r"|qformer\.layers\.(?P<qlayer>0|[1-9][0-9]{0,5})\.(?P<qkind>[a-z_0-9.]+)"
    r"|projector\.(?P<pkind>linear_1|linear_2))"
    r":(?P<index>0|[1-9][0-9]{0,8})",
    re.ASCII,
)


@dataclass(frozen=True)
class Site:
    """One layer's tensor of neurons."""

    component: str
    layer: int
    kind: str
    module_path: str
    hook: str
    weight_path: str
    weight_axis: str
    size: int
    part: int = 0  # the neurons are this slice of the weight's axis (and of a reading that wide), in
    parts: int = 1  # ``parts`` equal slices (Phi-3's fused gate_up_proj); see ``SiteKind``

    @property
    def offset(self) -> int:
        """Index of neuron 0 along the weight's axis."""
        return self.part * self.size

    @property
    def name(self) -> str:
        if self.component == "projector":
            return f"projector.{self.kind}"
        mid = "mlp." if self.component in ("language", "vision") else ""
        return f"{self.component}.layers.{self.layer}.{mid}{self.kind}"

    @property
    def scope(self) -> str:
        return f"{self.component}.{self.kind}"

    def address(self, index: int) -> str:
        return f"{self.name}:{index}"


@dataclass(frozen=True, order=True)
class Neuron:
    """A parsed address: the site's printable name and the neuron's index in it."""

    site: str
    index: int

    def __str__(self) -> str:
        return f"{self.site}:{self.index}"


def is_address(text: object) -> bool:
    """Whether ``text`` has the syntax of a neuron address (cheap: no site-kind check)."""
    return isinstance(text, str) and _ADDRESS.fullmatch(text) is not None


def parse_address(text: str) -> Neuron:
    """Parse a printed address (``language.layers.L.mlp.kind:i``, ``qformer.layers.L.kind:i``,
    ``projector.kind:i``) back into a Neuron; checks syntax and site kinds, not a model's sizes."""
    m = _ADDRESS.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise InputError(
            f"not a neuron address: {text!r}; expected e.g. language.layers.17.mlp.down_proj:2533, "
            "qformer.layers.3.output_query:7 or projector.linear_2:5"
        )
    if m["pkind"]:
        return Neuron(f"projector.{m['pkind']}", int(m["index"]))
    comp = m["comp"] or "qformer"
    kind, layer = (m["kind"], m["layer"]) if m["comp"] else (m["qkind"], m["qlayer"])
    kinds = known_kinds(comp)
    if kind not in kinds:
        raise InputError(f"{text!r}: {comp} has no site {kind!r}; its sites are {', '.join(kinds)}")
    mid = "mlp." if comp in ("language", "vision") else ""
    return Neuron(f"{comp}.layers.{int(layer)}.{mid}{kind}", int(m["index"]))


def _width_error(site: Site, width: int) -> InputError:
    return InputError(
        f"{site.name}: the {site.hook} of {site.module_path} has {width} features, but its weight "
        f"{site.weight_path} gives {site.size * site.parts} neurons; name the linear layer whose "
        f"{'rows' if site.weight_axis == 'out' else 'columns'} are these features (a site file's weight:)"
    )


def _reading_width(module: torch.nn.Module, reading: str) -> int | None:
    """The width of a linear module's output or input (None for other modules: known only when they run)."""
    if not isinstance(module, torch.nn.Linear):
        return None
    return module.out_features if reading == "output" else module.in_features


def _linear_size(linear: torch.nn.Module, axis: str, path: str) -> int:
    if not isinstance(linear, torch.nn.Linear):
        raise UnsupportedModelError(
            f"{path} is a {type(linear).__name__}, not a linear layer: its neurons cannot be sized"
        )
    return linear.out_features if axis == "out" else linear.in_features


def _site(model: torch.nn.Module, component: str, layer: int, layer_path: str, kind: str, spec) -> Site | None:
    """The site of one kind in one layer, or None where the layer has not its modules."""
    module = get_module(model, f"{layer_path}.{spec.module}")
    if module is None:
        return None
    if not spec.weight:  # no one linear owns these neurons: the kind says how many there are
        return Site(component, layer, kind, f"{layer_path}.{spec.module}", spec.reading, "", spec.axis, spec.size)
    weight_path = f"{layer_path}.{spec.weight}"
    linear = get_module(model, weight_path)
    if linear is None:
        return None
    size = _linear_size(linear, spec.axis, weight_path) // spec.parts
    site = Site(
        component,
        layer,
        kind,
        f"{layer_path}.{spec.module}",
        spec.reading,
        weight_path,
        spec.axis,
        size,
        spec.part,
        spec.parts,
    )
    width = _reading_width(module, spec.reading)
    if width is not None and width not in (site.size, site.size * site.parts):
        raise _width_error(site, width)
    return site


HOOK_POINTS = ("neurons", "weight_input")


def _first_arg(fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """A forward pre-hook that hands the module's first input to ``fn`` and swaps in what it returns."""

    def pre_hook(_module, args):
        new = fn(args[0])
        return None if new is None else (new, *args[1:])

    return pre_hook


class SiteRegistry:
    """Every neuron site of one model, in model order, with scope selection, address lookup and hooks.

    Build it with ``SiteRegistry.of(model)``: one registry per model object, built on first use and
    kept while the model lives. ``hook`` is the one way canprobe hooks a site.
    """

    _built: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model: torch.nn.Module) -> SiteRegistry:
        """The registry of ``model``, built once per model object."""
        registry = cls._built.get(model)
        if registry is None:
            registry = cls._built[model] = cls(model)
        return registry

    def __init__(self, model: torch.nn.Module):
        self.family = family_for(model)
        if not self.family.generates:
            raise UnsupportedModelError(f"{self.family.name} models have no neuron sites to probe")
        self.model = model
        self._modules: dict[str, torch.nn.Module] = {}
        self.sites: list[Site] = []
        for component in self.family.components(model):
            paths = self.family.layer_paths(model, component)
            if paths is None:
                raise UnsupportedModelError(
                    f"cannot find the {component} layers of this {self.family.name} model "
                    f"(looked for {', '.join(self.family.layer_roots[component])})"
                )
            for layer, layer_path in enumerate(paths):
                for kind, spec in self.family.layer_kinds(model, component, layer).items():
                    site = _site(model, component, layer, layer_path, kind, spec)
                    if site is not None:
                        self.sites.append(site)
            if not any(s.component == component for s in self.sites):
                inner = ", ".join(
                    f"{spec.module} ({spec.weight})" for spec in self.family.kinds(model, component).values()
                )
                raise UnsupportedModelError(
                    f"no {component} site of {self.family.name} under {paths[0] if paths else component}: "
                    f"looked for {inner}"
                )

        seen: dict[tuple[int, str], str] = {}
        for site in self.sites:
            key = (id(get_module(model, site.module_path)), site.hook, site.part)
            if key in seen:
                raise UnsupportedModelError(
                    f"{site.name} and {seen[key]} share one module instance; their neurons cannot be told apart"
                )
            seen[key] = site.name

    @cached_property
    def by_name(self) -> dict[str, Site]:
        return {s.name: s for s in self.sites}

    @property
    def scopes(self) -> list[str]:
        return list(dict.fromkeys(s.scope for s in self.sites))

    def select(self, scope: str) -> list[Site]:
        """Sites matching a scope: ``all``, a component, ``component.kind``, or a comma-separated list."""
        parts = [p.strip() for p in str(scope).split(",") if p.strip()]
        if not parts:
            raise InputError("empty scope; e.g. language.down_proj")
        chosen: list[Site] = []
        for part in parts:
            match = [s for s in self.sites if part in ("all", s.component, s.scope)]
            if not match:
                components = sorted({s.component for s in self.sites})
                raise InputError(
                    f"unknown scope {part!r} for this model; choose from all, {', '.join(components)}, "
                    f"{', '.join(self.scopes)}"
                )
            chosen += [s for s in match if s not in chosen]
        order = {s.name: i for i, s in enumerate(self.sites)}
        return sorted(chosen, key=lambda s: order[s.name])

    def resolve(self, address: str | Neuron) -> tuple[Site, int]:
        """The site and index of an address, checked against this model."""
        neuron = address if isinstance(address, Neuron) else parse_address(address)
        site = self.by_name.get(neuron.site)
        if site is None:
            raise InputError(f"{neuron}: this model has no site {neuron.site}")
        if neuron.index >= site.size:
            raise InputError(f"{neuron}: index out of range, {neuron.site} has {site.size} neurons")
        return site, neuron.index

    def module(self, site: Site) -> torch.nn.Module:
        return self._submodule(site.module_path)

    def weight(self, site: Site) -> torch.nn.Module:
        if not site.weight_path:
            raise UnsupportedModelError(
                f"{site.name} is a mixture of experts' output: no one linear layer owns its channels, so faults "
                "and scores that read or edit weights do not apply to it"
            )
        return self._submodule(site.weight_path)

    def _submodule(self, path: str) -> torch.nn.Module:
        """The module at ``path``, looked up once: hooks are installed per batch on every site."""
        found = self._modules.get(path)
        if found is None:
            found = self._modules[path] = get_module(self.model, path)
        return found

    def placed(self, site: Site) -> torch.Tensor:
        """A parameter beside the site's neurons, for the device and dtype of masks: its linear's weight, or
        (a mixture of experts' output) the block's first parameter."""
        if site.weight_path:
            return self.weight(site).weight
        return next(self.module(site).parameters())

    def weights(self, site: Site) -> torch.Tensor:
        """The site's rows (or columns) of its linear's weight, one per neuron, in neuron order."""
        weight = self.weight(site).weight
        span = slice(site.offset, site.offset + site.size)
        return weight[span] if site.weight_axis == "out" else weight[:, span]

    def hook(
        self, site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None], where: str = "neurons"
    ) -> torch.utils.hooks.RemovableHandle:
        """Call ``fn`` on every forward pass with a tensor of ``site``; remove the hook with the handle.

        ``where="neurons"``: the site's neurons [..., size], the module's output or input as the site
        reads it (its slice of it for a fused linear). ``where="weight_input"``: the input features of
        the linear layer that owns the neurons' weights. A tensor returned replaces the one ``fn`` got;
        None keeps it.
        """
        if where == "weight_input":
            return self.weight(site).register_forward_pre_hook(_first_arg(fn))
        if where != "neurons":
            raise ValueError(f"hook point {where!r} is not one of {', '.join(HOOK_POINTS)}")

        def apply(x: torch.Tensor) -> torch.Tensor | None:
            if x.shape[-1] == site.size:
                return fn(x)
            if x.shape[-1] != site.size * site.parts:
                raise _width_error(site, x.shape[-1])
            chunks = list(x.chunk(site.parts, dim=-1))
            new = fn(chunks[site.part])
            if new is None:
                return None
            chunks[site.part] = new
            return torch.cat(chunks, dim=-1)

        def on_output(_module, _args, output):
            if isinstance(output, tuple):  # a block that also returns its router's logits (Llama 4's experts)
                new = apply(output[0])
                return None if new is None else (new, *output[1:])
            return apply(output)

        module = self.module(site)
        if site.hook == "output":
            return module.register_forward_hook(on_output)
        return module.register_forward_pre_hook(_first_arg(apply))
