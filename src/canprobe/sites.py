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
from dataclasses import dataclass, replace
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


EXPERTS = "experts."  # a routed expert's kinds: ``experts.gate_proj``, printed ``experts.E.gate_proj``
_EXPERT_KIND = re.compile(r"experts\.(?:0|[1-9][0-9]{0,5})\.(?P<unit>.+)", re.ASCII)


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
    expert: int = -1  # a routed expert's units: the rows of the module's output that expert computes

    @property
    def offset(self) -> int:
        """Index of neuron 0 along the weight's axis."""
        return self.part * self.size

    @property
    def name(self) -> str:
        if self.component == "projector":
            return f"projector.{self.kind}"
        mid = "mlp." if self.component in ("language", "vision") else ""
        kind = self.kind if self.expert < 0 else self.kind.replace(EXPERTS, f"{EXPERTS}{self.expert}.", 1)
        return f"{self.component}.layers.{self.layer}.{mid}{kind}"

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
    expert = _EXPERT_KIND.fullmatch(kind)
    if (EXPERTS + expert["unit"] if expert else kind) not in kinds or (not expert and kind.startswith(EXPERTS)):
        printed = (k.replace(EXPERTS, f"{EXPERTS}E.", 1) if k.startswith(EXPERTS) else k for k in kinds)
        raise InputError(f"{text!r}: {comp} has no site {kind!r}; its sites are {', '.join(printed)}")
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
        self._routes: dict[str, _ExpertRows] = {}
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
                        self.sites += [replace(site, expert=e) for e in range(spec.experts)] if spec.experts else [site]
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
            key = (id(get_module(model, site.module_path)), site.hook, site.part, site.expert)
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
            what = "a routed expert's units" if site.expert >= 0 else "a mixture of experts' output"
            raise UnsupportedModelError(
                f"{site.name} is {what}: no one linear layer owns them, so faults and scores that read or edit "
                "weights do not apply to it"
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
        (a mixture of experts' output, a routed expert's units) the block's or the experts' first parameter."""
        if site.weight_path:
            return self.weight(site).weight
        path = site.module_path.rsplit(".", 1)[0] if site.expert >= 0 else site.module_path
        return next(self._submodule(path).parameters())

    def expert_rows(self, site: Site) -> tuple[torch.Tensor, int]:
        """For a routed expert's site, inside a call of its hook: the token of each row handed to the hook
        (an index into the block's tokens, batch rows x positions flattened) and the block's token count."""
        rows = self._routes.get(site.module_path)
        if rows is None or rows.current is None:
            raise RuntimeError(f"{site.name}: its routed rows are known only inside a call of its hook")
        return rows.current, rows.layer_tokens

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
        if site.expert >= 0:
            rows = self._routes.get(site.module_path)
            if rows is None:
                experts = self._submodule(site.module_path.rsplit(".", 1)[0])
                layer = self._submodule(self.family.layer_paths(self.model, site.component)[site.layer])
                rows = self._routes[site.module_path] = _ExpertRows(layer, experts, self.module(site), site.size)
            return rows.add(site, fn)

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


class _ExpertRows:
    """The hooks of one experts module's routed units: ``act_fn``'s output rows, handed to each expert's sites.

    transformers' ``grouped_mm`` experts implementation (the default, in 5.6 as in 5.25) sorts the routed
    (token, k) pairs by expert id, ``torch.sort(top_k_index.reshape(-1))`` (5.6 spells it ``argsort``: the
    same sort), and calls ``act_fn`` once on all of them: expert E's rows are the E-th group, in the order
    of that sort, and row r is token ``perm[r] // top_k``. A pre-hook on the experts module reads
    ``top_k_index`` and sorts it the same way; the hook on ``act_fn`` hands each expert's rows to its sites'
    functions and puts what they return back in place. A pre-hook on the decoder layer checks that the
    experts see every token of the layer (rows x positions, in order): experts that run on a part of them
    (ERNIE 4.5-VL's text and vision experts) are refused. The hooks are installed while a site has a function.
    """

    def __init__(self, layer: torch.nn.Module, experts: torch.nn.Module, act: torch.nn.Module, size: int):
        self.layer, self.experts, self.act, self.size = layer, experts, act, size
        self.layer_tokens = 0  # tokens of the layer's call (rows x positions), which its experts see
        self.fns: dict[int, dict[int, Callable]] = {}  # expert -> handle id -> fn
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._next = 0
        self.tokens: torch.Tensor | None = None  # per row of act_fn's output: its token
        self.counts: list[int] = []  # rows per expert
        self.current: torch.Tensor | None = None  # the tokens of the rows being handed to a site's function

    def add(self, site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> _Handle:
        if not self._handles:
            self._handles = [
                self.layer.register_forward_pre_hook(self._count, with_kwargs=True),
                self.experts.register_forward_pre_hook(self._route, with_kwargs=True),
                self.act.register_forward_hook(self._split),
            ]
        self._next += 1
        self.fns.setdefault(site.expert, {})[self._next] = fn
        return _Handle(self, site.expert, self._next)

    def remove(self, expert: int, key: int) -> None:
        self.fns.get(expert, {}).pop(key, None)
        if not self.fns.get(expert, True):
            del self.fns[expert]
        if not self.fns:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self.tokens, self.current = None, None

    def _count(self, _module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.layer_tokens = hidden.shape[:-1].numel()

    def _route(self, module, args, kwargs) -> None:
        implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
        if implementation != "grouped_mm" or getattr(module, "_is_expert_parallel", False):
            raise InputError(
                f"routed experts' units are read from transformers' grouped_mm experts implementation; this model "
                f"runs {implementation!r}{' with expert parallelism' if implementation == 'grouped_mm' else ''}: "
                "load it with experts_implementation='grouped_mm', or choose a scope without experts.* sites"
            )
        top_k = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
        if top_k.shape[0] != self.layer_tokens:
            raise InputError(
                f"the experts of {type(self.experts).__name__} read {top_k.shape[0]} of their layer's "
                f"{self.layer_tokens} tokens: their units cannot be placed at tokens; choose a scope without "
                "experts.* sites"
            )
        flat = top_k.reshape(-1)
        perm = torch.sort(flat)[1]
        self.tokens = perm // top_k.shape[-1]
        self.counts = torch.bincount(flat, minlength=self.experts.num_experts).tolist()

    def _split(self, _module, _args, output: torch.Tensor) -> torch.Tensor | None:
        if self.tokens is None or output.shape != (self.tokens.numel(), self.size):
            raise RuntimeError(
                f"act_fn of {type(self.experts).__name__} gave {tuple(output.shape)}, not one row of "
                f"{self.size} units per routed token (grouped_mm): its experts' units cannot be told apart"
            )
        rows = list(output.split(self.counts))
        tokens = self.tokens.split(self.counts)
        changed = False
        try:
            for expert, fns in self.fns.items():
                if not self.counts[expert]:
                    continue
                self.current = tokens[expert]
                for fn in list(fns.values()):
                    new = fn(rows[expert])
                    if new is not None:
                        rows[expert], changed = new, True
        finally:
            self.current, self.tokens = None, None
        return torch.cat(rows) if changed else None


class _Handle:
    """Removes one function of a routed expert's site (``RemovableHandle``'s ``remove``)."""

    def __init__(self, rows: _ExpertRows, expert: int, key: int):
        self.rows, self.expert, self.key = rows, expert, key

    def remove(self) -> None:
        self.rows.remove(self.expert, self.key)
