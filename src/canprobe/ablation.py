"""Masking neurons: zero or mean ablation as ``with`` blocks, with a different mask per batch row.

A mask hooks the module of each site it touches and replaces the chosen neurons at every position,
so it applies to prompt encoding and to every generated token (with or without the KV cache: each
new token's activations pass through the same hooks). Per-row masks let one batched ``generate``
evaluate several neuron sets at once (rows = images x masks), which is how the k* search evaluates
several k values in one pass. Hooks are removed on exit, normal or by exception. Activation faults
never write the model's parameters; weight faults (``weight_bitflip``) flip bits of the neurons'
weights and copy the saved values back on exit, so either way the model is bit-identical afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from canprobe import distributed
from canprobe.captions import generate_captions
from canprobe.config import Generation, default
from canprobe.errors import InputError
from canprobe.families.base import get_module
from canprobe.faults import (
    ChannelStats,
    Fault,
    PositionMeans,
    ProtectedSet,
    RangeRestriction,
    clamp,
    flip_bit,
    parse_fault,
    resolve_bit,
)
from canprobe.inputs import batches, teacher_forcing_inputs, to_model_inputs
from canprobe.models import LoadedModel
from canprobe.sites import Neuron, Site, SiteRegistry

log = logging.getLogger(__name__)

# a neuron set: addresses (strings or parsed), or site name -> index tensor
NeuronSpec = Iterable[str | Neuron] | Mapping[str, torch.Tensor]


def _model_of(lm_or_model: LoadedModel | torch.nn.Module) -> torch.nn.Module:
    return lm_or_model.model if isinstance(lm_or_model, LoadedModel) else lm_or_model


def group_by_site(registry: SiteRegistry, neurons: NeuronSpec) -> dict[str, torch.Tensor]:
    """Site name -> sorted unique neuron indices, each address checked against the model."""
    if isinstance(neurons, Mapping):
        out = {}
        for name, idx in neurons.items():
            site = registry.by_name.get(name)
            if site is None:
                raise InputError(f"this model has no site {name}")
            idx = torch.as_tensor(idx, dtype=torch.long).unique()
            if idx.numel() and (idx.min() < 0 or idx.max() >= site.size):
                raise InputError(f"{name}: neuron index out of range, the site has {site.size} neurons")
            if idx.numel():
                out[name] = idx
        return out
    grouped: dict[str, list[int]] = {}
    for address in neurons:
        site, index = registry.resolve(address)
        grouped.setdefault(site.name, []).append(index)
    return {name: torch.tensor(sorted(set(ix)), dtype=torch.long) for name, ix in grouped.items()}


@dataclass(frozen=True)
class RankedNeurons:
    """An ordered neuron list as parallel tensors, so any prefix becomes a mask without parsing strings."""

    addresses: tuple[str, ...]
    site_names: tuple[str, ...]
    site_ids: torch.Tensor
    indices: torch.Tensor

    @classmethod
    def from_addresses(cls, registry: SiteRegistry, addresses: Sequence[str]) -> RankedNeurons:
        names: dict[str, int] = {}
        site_ids, indices = [], []
        for address in addresses:
            site, index = registry.resolve(address)
            site_ids.append(names.setdefault(site.name, len(names)))
            indices.append(index)
        if len(set(zip(site_ids, indices))) != len(site_ids):
            raise InputError("the neuron list names the same neuron twice")
        return cls(
            tuple(str(a) for a in addresses),
            tuple(names),
            torch.tensor(site_ids, dtype=torch.long),
            torch.tensor(indices, dtype=torch.long),
        )

    @classmethod
    def from_sites(cls, sites: Sequence[Site]) -> RankedNeurons:
        """Every neuron of ``sites`` in model order (the pool the random control draws from)."""
        sizes = torch.tensor([s.size for s in sites], dtype=torch.long)
        return cls(
            tuple(s.address(i) for s in sites for i in range(s.size)),
            tuple(s.name for s in sites),
            torch.repeat_interleave(torch.arange(len(sites)), sizes),
            torch.cat([torch.arange(s.size) for s in sites]),
        )

    def __len__(self) -> int:
        return len(self.addresses)

    def prefix(self, k: int) -> dict[str, torch.Tensor]:
        """The first ``k`` neurons, grouped by site."""
        if not 0 <= k <= len(self):
            raise InputError(f"k={k} is out of range: the list has {len(self)} neurons")
        ids, idx = self.site_ids[:k], self.indices[:k]
        return {self.site_names[s]: idx[ids == s].sort().values for s in ids.unique().tolist()}

    def subset(self, order: torch.Tensor) -> RankedNeurons:
        """The same neurons in another order (e.g. a random permutation for the control)."""
        return RankedNeurons(
            tuple(self.addresses[i] for i in order.tolist()),
            self.site_names,
            self.site_ids[order],
            self.indices[order],
        )


class TokenPositions:
    """The position of every token passing through a site, for per-position statistics and faults.

    Language sites: the ``position_ids`` the language model hands its first layer (so a token
    generated with the KV cache gets its place in the sequence, and a left-padded row counts from
    its first token where the model does); ``hook`` records them at every forward. Other sites
    (vision tower, projector, Q-Former): the index along the sequence of ``[batch, positions, neurons]``.
    """

    def __init__(self):
        self.ids: torch.Tensor | None = None
        self.registry: SiteRegistry | None = None

    def hook(self, registry: SiteRegistry) -> torch.utils.hooks.RemovableHandle:
        self.registry = registry
        layer = get_module(registry.model, registry.family.layer_paths(registry.model, "language")[0])

        def record(_module, _args, kwargs):
            ids = kwargs.get("position_ids")
            self.ids = ids[0] if ids is not None and ids.dim() == 3 else ids  # multimodal RoPE: its first axis

        return layer.register_forward_pre_hook(record, with_kwargs=True)

    def of(self, x: torch.Tensor, site: Site) -> torch.Tensor:
        """Positions shaped ``x.shape[:-1]``."""
        if site.component != "language":
            if x.dim() != 3:
                raise InputError(f"{site.name}: per-position means need activations shaped [batch, positions, neurons]")
            return torch.arange(x.shape[1], device=x.device).expand(x.shape[:2])
        if self.ids is None:
            raise InputError(
                f"{site.name}: per-position means need the position ids the language model passes to its layers; "
                "this model passes none"
            )
        ids = self.ids.to(x.device)
        if site.expert >= 0:  # a routed expert's rows: the positions of their tokens
            tokens, count = self.registry.expert_rows(site)
            seq = ids.shape[-1]
            return ids.reshape(-1, seq).expand(count // seq, seq).reshape(-1)[tokens.to(x.device)]
        rows, seq = x.shape[:-1].numel() // ids.shape[-1], ids.shape[-1]
        return ids.reshape(-1, seq).expand(rows, seq).reshape(x.shape[:-1])


class Ablation:
    """Hooks that put a fault on chosen neurons (zero by default); use as a ``with`` block.

    ``rows=None`` applies one mask to every batch row; otherwise ``masks[i]`` applies to batch row i
    and the batch must have exactly ``len(masks)`` rows. Masks are precomputed once as boolean
    tensors per site on the model's device, so the forward pass costs one ``torch.where`` per site.
    ``fault``: a fault (``canprobe.faults``) or its spec string; ``stats``: clean-image statistics per
    site for faults that need them (``activation_stats``, ``fault_stats``). ``protections``:
    ``ProtectedSet`` neurons are removed from every mask; ``RangeRestriction`` clamps its sites after
    the fault. Everything is undone on exit, normal or by exception: hooks removed, weights that a
    weight fault flipped copied back bit-exactly.
    """

    def __init__(
        self,
        lm_or_model: LoadedModel | torch.nn.Module,
        masks: Sequence[NeuronSpec],
        per_row: bool,
        fault: str | Fault = default("fault"),
        stats: Mapping[str, ChannelStats] | None = None,
        protections: Sequence[ProtectedSet | RangeRestriction] = (),
    ):
        if not masks:
            raise InputError("per-row ablation needs at least one row")
        self.fault = parse_fault(fault)
        self.model = _model_of(lm_or_model)
        self.registry = SiteRegistry.of(self.model)
        self.rows = len(masks) if per_row else None
        dtype = next(self.model.parameters()).dtype
        self.fault.check(dtype)
        self._protected = [group_by_site(self.registry, p.neurons) for p in protections if isinstance(p, ProtectedSet)]
        grouped = self._grouped(masks)
        order = [s.name for s in self.registry.sites]
        names = sorted({name for g in grouped for name in g}, key=order.index)
        stats = dict(stats or {})
        if self.fault.needs:
            missing = [n for n in names if any(getattr(stats.get(n), f, None) is None for f in self.fault.needs)]
            if missing:
                what = {("mean",): "reference means", ("mean", "position_mean"): "per-position means"}.get(
                    self.fault.needs, "clean statistics"
                )
                raise InputError(f"{self.fault.name} fault needs {what} for {', '.join(missing[:3])}")
        self._masks: dict[str, torch.Tensor] = {}
        self._state: dict[str, object] = {}
        self._neurons: dict[str, list[torch.Tensor]] = {}
        for name in names:
            site = self.registry.by_name[name]
            weight = self.registry.placed(site)
            mask = torch.zeros(len(grouped), site.size, dtype=torch.bool)
            for r, g in enumerate(grouped):
                if name in g:
                    mask[r, g[name]] = True
            self._neurons[name] = [g.get(name, torch.zeros(0, dtype=torch.long)) for g in grouped]
            mask = mask.to(weight.device)
            self._masks[name] = mask if per_row else mask[0]
            if self.fault.acts_on == "activation":
                for field in self.fault.needs:
                    value = torch.as_tensor(getattr(stats[name], field))
                    dims = 2 if field == "position_mean" else 1
                    if value.dim() != dims or value.shape[-1] != site.size:
                        shape = f"(positions, {site.size})" if dims == 2 else f"({site.size},)"
                        raise InputError(f"{field} of {name} has shape {tuple(value.shape)}, not {shape}")
                state = self.fault.prepare(site, stats.get(name), weight.device, weight.dtype)
                if isinstance(state, PositionMeans):
                    state.positions = lambda x, site=site: self._positions.of(x, site)
                self._state[name] = state
        self._bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for protection in protections:
            if isinstance(protection, RangeRestriction):
                for name in sorted(protection.stats, key=order.index):
                    site = self.registry.by_name[name]
                    weight = self.registry.placed(site)
                    self._bounds[name] = protection.bounds(name, weight.device, weight.dtype)
        self._positions = TokenPositions()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._saved: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]] = []

    def _grouped(self, masks: Sequence[NeuronSpec]) -> list[dict[str, torch.Tensor]]:
        """Each row's neurons by site, protected neurons taken out."""
        grouped = [group_by_site(self.registry, m) for m in masks]
        for protected in self._protected:
            grouped = [_without(g, protected) for g in grouped]
        return grouped

    @property
    def masked_sites(self) -> list[str]:
        return list(self._masks)

    def _check(self, x: torch.Tensor, site: Site) -> None:
        if not isinstance(x, torch.Tensor) or x.shape[-1] != site.size:
            raise RuntimeError(f"{site.name}: expected a tensor with {site.size} features at the hook")
        if self.rows is not None and site.expert < 0 and x.shape[0] != self.rows:
            raise InputError(
                f"per-row masks were given for {self.rows} rows but the batch at {site.name} has {x.shape[0]}"
            )

    def _row_mask(self, mask: torch.Tensor, x: torch.Tensor, site: Site) -> torch.Tensor:
        if self.rows is None:
            return mask
        if site.expert >= 0:  # a routed expert's rows, one per token routed to it: each its batch row's mask
            tokens, count = self.registry.expert_rows(site)
            if count % self.rows:
                raise InputError(f"per-row masks were given for {self.rows} rows but {site.name} reads {count} tokens")
            return mask[: self.rows][(tokens // (count // self.rows)).to(mask.device)]
        return mask[: self.rows].view(self.rows, *([1] * (x.dim() - 2)), site.size)

    def _replace(self, x: torch.Tensor, site: Site) -> torch.Tensor:
        flat = site.expert < 0 and site.component == "language" and x.dim() == 2
        if self.rows is not None and flat and x.shape[0] % self.rows == 0:
            # rows and positions flattened into one (OPT's MLP): each row's positions get its mask
            return self._replace(x.view(self.rows, -1, x.shape[-1]), site).view_as(x)
        self._check(x, site)
        mask = self._masks.get(site.name) if self.fault.acts_on == "activation" else None
        if mask is not None:
            x = self.fault.apply(x, self._row_mask(mask, x, site), self._state[site.name])
        bounds = self._bounds.get(site.name)
        if bounds is not None:
            x = clamp(x, *bounds)
        return x

    def _weight_hook(self, site: Site):
        """Per-row weight faults: each group of rows with the same neurons runs the linear with its own flipped copy."""
        neurons = self._neurons[site.name]
        linear = self.registry.weight(site)
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, idx in enumerate(neurons):
            if idx.numel():
                groups.setdefault(tuple(idx.tolist()), []).append(row)
        weights = [
            (
                torch.tensor(rows, device=linear.weight.device),
                self.fault.flipped(linear.weight, site.weight_axis, torch.tensor(idx) + site.offset),
            )
            for idx, rows in groups.items()
        ]

        def hook(_module, args, output):
            if output.shape[0] != self.rows:
                raise InputError(
                    f"per-row masks were given for {self.rows} rows but the batch at {site.name} has {output.shape[0]}"
                )
            output = output.clone()
            for rows, weight in weights:
                output[rows] = torch.nn.functional.linear(args[0][rows], weight, linear.bias)
            return output

        return linear.register_forward_hook(hook)

    def _same_in_every_row(self) -> bool:
        """Whether every row has the same neurons (a search's chunk under one mask): then flip in place."""
        return all(all(torch.equal(idx, rows[0]) for idx in rows[1:]) for rows in self._neurons.values())

    def _flip_weights(self) -> None:
        """One mask for every row: flip the weights in place, keeping the originals for the exit."""
        for name, neurons in self._neurons.items():
            site = self.registry.by_name[name]
            weight = self.registry.weight(site).weight
            positions = self.fault.positions(weight, site.weight_axis, neurons[0].to(weight.device) + site.offset)
            with torch.no_grad():
                original = weight[positions].clone()
                self._saved.append((weight, positions, original))
                weight[positions] = flip_bit(original, resolve_bit(self.fault.bit, weight.dtype))

    def __enter__(self) -> Ablation:
        if self._handles or self._saved:
            raise RuntimeError("this ablation is already active")
        try:
            self.fault.start(next(self.model.parameters()).device)
            if self.fault.acts_on == "weight":
                if self.rows is None or self._same_in_every_row():
                    self._flip_weights()
                else:
                    self._handles += [self._weight_hook(self.registry.by_name[n]) for n in self._neurons]
            hooked = self.masked_sites if self.fault.acts_on == "activation" else []
            if any(isinstance(state, PositionMeans) for state in self._state.values()):
                self._handles.append(self._positions.hook(self.registry))
            order = [s.name for s in self.registry.sites]
            for name in sorted(set(hooked) | set(self._bounds), key=order.index):
                site = self.registry.by_name[name]
                self._handles.append(self.registry.hook(site, lambda x, site=site: self._replace(x, site)))
        except BaseException:
            self._remove()
            raise
        log.debug("%s on neurons of %d sites (%s)", self.fault.spec(), len(self._masks), ", ".join(self.masked_sites))
        return self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        with torch.no_grad():
            for weight, positions, original in reversed(self._saved):
                weight[positions] = original
        self._saved.clear()

    def __exit__(self, *exc) -> None:
        self._remove()


class StandingMasks(Ablation):
    """Per-row masks on a fixed set of sites whose hooks stay installed while the masks change in place.

    A compiled decoding step (transformers compiles it for a static KV cache on GPUs) keeps the graph
    traced at its first call, hooks included, and by default does not check the hooks again: hooks
    added and removed per batch would leave it applying a stale mask. These hooks are installed once
    and read boolean masks that ``load`` rewrites in place, so a new mask needs no new graph. Outside
    a ``with standing.loaded(masks)`` block they pass activations through untouched.
    """

    def __init__(
        self,
        lm_or_model: LoadedModel | torch.nn.Module,
        sites: Sequence[str],
        rows: int,
        fault: str | Fault = default("fault"),
        stats: Mapping[str, ChannelStats] | None = None,
    ):
        registry = SiteRegistry.of(_model_of(lm_or_model))
        every = {name: torch.arange(registry.by_name[name].size) for name in sites if name in registry.by_name}
        if len(every) != len(set(sites)):
            raise InputError(f"this model has no site {next(n for n in sites if n not in registry.by_name)}")
        super().__init__(lm_or_model, [every] * rows, True, fault, stats)
        if self.fault.acts_on != "activation":
            raise InputError(f"{self.fault.name} acts on weights; it has no activation masks to keep installed")
        self.capacity, self.active = rows, False
        for mask in self._masks.values():
            mask.zero_()

    @contextlib.contextmanager
    def loaded(self, masks: Sequence[NeuronSpec]):
        """Row i of the batch inside the block gets ``masks[i]`` (at most ``capacity`` rows)."""
        if not 0 < len(masks) <= self.capacity:
            raise InputError(f"{len(masks)} masks for standing masks of {self.capacity} rows")
        grouped = self._grouped(masks)
        outside = sorted({name for g in grouped for name in g} - set(self._masks))
        if outside:
            raise InputError(f"{outside[0]} is not among the sites these standing masks hold")
        for name, mask in self._masks.items():
            rows = torch.zeros(mask.shape, dtype=torch.bool)
            for r, g in enumerate(grouped):
                if name in g:
                    rows[r, g[name]] = True
            mask.copy_(rows)
        self.rows, self.active = len(masks), True
        try:
            yield self
        finally:
            self.active = False

    def _replace(self, x: torch.Tensor, site: Site) -> torch.Tensor | None:
        return super()._replace(x, site) if self.active else None


def _without(grouped: dict[str, torch.Tensor], protected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A grouped mask less the protected neurons (sites left empty are dropped)."""
    out = {}
    for name, idx in grouped.items():
        if name in protected:
            idx = idx[~torch.isin(idx, protected[name])]
        if idx.numel():
            out[name] = idx
    return out


def ablate(
    lm_or_model: LoadedModel | torch.nn.Module,
    neurons: NeuronSpec,
    fault: str | Fault = default("fault"),
    stats: Mapping[str, ChannelStats] | None = None,
    protections: Sequence[ProtectedSet | RangeRestriction] = (),
) -> Ablation:
    """``with ablate(lm, ["language.layers.3.mlp.down_proj:17"]): ...`` masks those neurons in every row."""
    return Ablation(lm_or_model, [neurons], False, fault, stats, protections)


def ablate_rows(
    lm_or_model: LoadedModel | torch.nn.Module,
    rows: Sequence[NeuronSpec],
    fault: str | Fault = default("fault"),
    stats: Mapping[str, ChannelStats] | None = None,
    protections: Sequence[ProtectedSet | RangeRestriction] = (),
) -> Ablation:
    """A different neuron set per batch row; the batch inside the block must have ``len(rows)`` rows."""
    return Ablation(lm_or_model, list(rows), True, fault, stats, protections)


def mean_activations(lm: LoadedModel, inputs: Sequence[Image.Image | str], sites: Sequence[Site] | str, **options):
    """Mean activation of every neuron of ``sites`` over reference inputs (float32, per site name);
    ``options`` and everything else as for ``activation_stats``."""
    return {name: s.mean for name, s in activation_stats(lm, inputs, sites, **options).items()}


@torch.no_grad()
def activation_stats(
    lm: LoadedModel,
    inputs: Sequence[Image.Image | str],
    sites: Sequence[Site] | str,
    captions: list[str] | None = None,
    generation: Generation = Generation(),
    by_position: bool = False,
) -> dict[str, ChannelStats]:
    """Per-channel mean, std, min and max of every neuron of ``sites`` on clean inputs (float32).

    ``inputs``: images, or the texts a text-only model continues. The model reads prompt + caption,
    as during captioning (``generation``'s prompt, inputs per pass and caption settings); captions
    default to its own unmasked greedy captions. Language sites average over the attended token
    positions; vision, projector and Q-Former sites over all positions. When the captions are
    generated here, min and max also cover every activation of that generation (so a range
    restriction calibrated on these images leaves their captions alone). ``by_position`` also
    measures the mean at each token position (``ChannelStats.position_mean``, positions as
    ``TokenPositions`` numbers them; a position no image reaches gets the all-position mean). Under
    ``torch.distributed`` each process reads its shard of the images and the sums are all-reduced,
    so every process gets the statistics over all of them.
    """
    registry = SiteRegistry.of(lm.model)
    chosen = registry.select(sites) if isinstance(sites, str) else list(sites)
    if not inputs:
        raise InputError("clean statistics (mean ablation, faults, range restriction) need at least one image")
    if captions is not None and len(captions) != len(inputs):
        raise InputError(f"{len(captions)} captions for {len(inputs)} images; give one caption per image")
    world = distributed.world()
    inputs, captions = world.take(inputs), world.take(captions)
    moments = {s.name: torch.zeros(3, s.size, dtype=torch.float64) for s in chosen}  # count, sum, sum of squares
    lows = {s.name: torch.full((s.size,), math.inf, dtype=torch.float64) for s in chosen}
    highs = {s.name: torch.full((s.size,), -math.inf, dtype=torch.float64) for s in chosen}
    weights: dict[str, torch.Tensor] = {}
    moments_on = [False]
    positions = TokenPositions()
    by_place: dict[str, torch.Tensor] = {}  # site -> [positions, 1 + size]: weight, then weighted sums

    def make_hook(site: Site):
        def record(x: torch.Tensor) -> None:
            x = x.detach().to(torch.float64)
            flat = x.reshape(-1, site.size)
            w = weights.get("language") if site.component == "language" else None
            if w is not None and site.expert >= 0:  # a routed expert's rows: its tokens' weights
                w = w.reshape(-1)[registry.expert_rows(site)[0].to(w.device)].reshape(-1, 1)
            elif w is not None and (x.shape[:2] == w.shape or x.shape[:-1].numel() == w.numel()):
                w = w.reshape(-1, 1)
            else:
                w = torch.ones(flat.shape[0], 1, dtype=torch.float64, device=flat.device)
            keep = w[:, 0] > 0
            if keep.any():
                lows[site.name] = torch.minimum(lows[site.name], flat[keep].min(dim=0).values.cpu())
                highs[site.name] = torch.maximum(highs[site.name], flat[keep].max(dim=0).values.cpu())
            if moments_on[0]:
                moments[site.name] += torch.stack(
                    [w.sum().expand(site.size), (flat * w).sum(dim=0), (flat * flat * w).sum(dim=0)]
                ).cpu()
                if by_position:
                    place = positions.of(x, site).reshape(-1).cpu()
                    table = by_place.setdefault(site.name, torch.zeros(0, 1 + site.size, dtype=torch.float64))
                    if int(place.max()) >= table.shape[0]:
                        table = by_place[site.name] = _grown(table, int(place.max()) + 1)
                    table.index_add_(0, place, torch.cat([w, flat * w], dim=1).cpu())

        return record

    handles = []
    try:
        if by_position and any(s.component == "language" for s in chosen):
            handles.append(positions.hook(registry))
        for site in chosen:
            handles.append(registry.hook(site, make_hook(site)))
        if captions is None:
            captions = generate_captions(lm, inputs, generation)
        moments_on[0] = True
        pairs = list(zip(inputs, captions))
        for batch in batches(pairs, generation.batch_size):
            ims, caps = [p[0] for p in batch], [p[1] for p in batch]
            enc = teacher_forcing_inputs(lm.processor, lm.family, ims, caps, generation.prompt)
            enc.pop("labels")
            weights["language"] = enc["attention_mask"].to(lm.device, torch.float64)
            lm.model(**to_model_inputs(enc, lm.model))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, m in moments.items():
        count, total, squares = distributed.all_reduce_sum(m)
        low, high = -distributed.all_reduce_max(-lows[name]), distributed.all_reduce_max(highs[name])
        n = count.clamp(min=1.0)
        mean = total / n
        std = (squares / n - mean * mean).clamp(min=0.0).sqrt()
        out[name] = ChannelStats(*(t.to(torch.float32) for t in (mean, std, low, high)))
        if by_position:
            table = by_place.get(name, torch.zeros(0, len(mean) + 1, dtype=torch.float64))
            table = distributed.all_reduce_sum(_grown(table, int(distributed.all_reduce_max(torch.tensor(len(table))))))
            weight = table[:, :1]
            by_pos = torch.where(weight > 0, table[:, 1:] / weight.clamp(min=1e-12), mean)
            out[name] = replace(out[name], position_mean=by_pos.to(torch.float32))
    return out


def _grown(table: torch.Tensor, rows: int) -> torch.Tensor:
    """``table`` with zero rows appended up to ``rows`` rows."""
    return torch.cat([table, table.new_zeros(max(0, rows - table.shape[0]), table.shape[1])])


def fault_stats(
    lm: LoadedModel,
    inputs: Sequence[Image.Image | str],
    sites: Sequence[Site] | str,
    faults: Sequence[str],
    generation: Generation,
    calibrate: bool = False,
) -> dict[str, ChannelStats] | None:
    """The clean statistics that the fault specs ``faults`` need on ``sites`` (None when none needs any).

    ``calibrate``: measure them anyway, for a range restriction. The captions are generated with
    ``generation``, the settings of the captions the faults are then evaluated on.
    """
    needs = {need for spec in faults for need in parse_fault(spec).needs}
    if not needs and not calibrate:
        return None
    return activation_stats(lm, inputs, sites, generation=generation, by_position="position_mean" in needs)
