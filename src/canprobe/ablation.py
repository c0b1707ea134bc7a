"""Masking neurons: zero or mean ablation as ``with`` blocks, with a different mask per batch row.

A mask hooks the module of each site it touches and replaces the chosen neurons at every position,
so it applies to prompt encoding and to every generated token (with or without the KV cache: each
new token's activations pass through the same hooks). Per-row masks let one batched ``generate``
evaluate several neuron sets at once (rows = images x masks), which is how the k* search evaluates
several k values in one pass. Hooks are removed on exit, normal or by exception; the model's
parameters are never written, so it is bit-identical afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from canprobe import distributed
from canprobe.captions import generate_captions
from canprobe.config import ABLATION_KINDS, default
from canprobe.errors import InputError
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


class Ablation:
    """Hooks that replace chosen neurons by zero or by a reference mean; use as a ``with`` block.

    ``rows=None`` applies one mask to every batch row; otherwise ``masks[i]`` applies to batch row i
    and the batch must have exactly ``len(masks)`` rows. Masks are precomputed once as boolean
    tensors per site on the model's device, so the forward pass costs one ``torch.where`` per site.
    """

    def __init__(
        self,
        lm_or_model: LoadedModel | torch.nn.Module,
        masks: Sequence[NeuronSpec],
        per_row: bool,
        kind: str = "zero",
        means: Mapping[str, torch.Tensor] | None = None,
    ):
        if kind not in ABLATION_KINDS:
            raise InputError(f"unknown ablation kind {kind!r}; choose from {', '.join(ABLATION_KINDS)}")
        if not masks:
            raise InputError("per-row ablation needs at least one row")
        self.model = _model_of(lm_or_model)
        self.registry = SiteRegistry.of(self.model)
        self.kind = kind
        self.rows = len(masks) if per_row else None
        grouped = [group_by_site(self.registry, m) for m in masks]
        names = sorted({name for g in grouped for name in g}, key=[s.name for s in self.registry.sites].index)
        if kind == "mean":
            missing = [n for n in names if means is None or n not in means]
            if missing:
                raise InputError(f"mean ablation needs reference means for {', '.join(missing[:3])}")
        self._plan: list[tuple[Site, torch.Tensor, torch.Tensor | float]] = []
        for name in names:
            site = self.registry.by_name[name]
            weight = self.registry.weight(site).weight
            mask = torch.zeros(len(grouped), site.size, dtype=torch.bool)
            for r, g in enumerate(grouped):
                if name in g:
                    mask[r, g[name]] = True
            mask = mask.to(weight.device)
            if not per_row:
                mask = mask[0]
            if kind == "mean":
                mean = torch.as_tensor(means[name])
                if mean.shape != (site.size,):
                    raise InputError(f"reference mean for {name} has shape {tuple(mean.shape)}, not ({site.size},)")
                fill: torch.Tensor | float = mean.to(device=weight.device, dtype=weight.dtype)
            else:
                fill = 0.0
            self._plan.append((site, mask, fill))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def masked_sites(self) -> list[str]:
        return [site.name for site, _, _ in self._plan]

    def _replace(self, x: torch.Tensor, mask: torch.Tensor, fill, site: Site) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.shape[-1] != site.size:
            raise RuntimeError(f"{site.name}: expected a tensor with {site.size} features at the hook")
        if self.rows is not None:
            if x.shape[0] != self.rows:
                raise InputError(
                    f"per-row masks were given for {self.rows} rows but the batch at {site.name} has {x.shape[0]}"
                )
            mask = mask.view(self.rows, *([1] * (x.dim() - 2)), site.size)
        return torch.where(mask, fill, x)

    def __enter__(self) -> Ablation:
        if self._handles:
            raise RuntimeError("this ablation is already active")
        try:
            for site, mask, fill in self._plan:

                def replace(x, site=site, mask=mask, fill=fill):
                    return self._replace(x, mask, fill, site)

                self._handles.append(self.registry.hook(site, replace))
        except BaseException:
            self._remove()
            raise
        log.debug("ablating %s neurons in %d sites (%s)", self.kind, len(self._plan), ", ".join(self.masked_sites))
        return self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self._remove()


def ablate(
    lm_or_model: LoadedModel | torch.nn.Module,
    neurons: NeuronSpec,
    kind: str = "zero",
    means: Mapping[str, torch.Tensor] | None = None,
) -> Ablation:
    """``with ablate(lm, ["language.layers.3.mlp.down_proj:17"]): ...`` masks those neurons in every row."""
    return Ablation(lm_or_model, [neurons], per_row=False, kind=kind, means=means)


def ablate_rows(
    lm_or_model: LoadedModel | torch.nn.Module,
    rows: Sequence[NeuronSpec],
    kind: str = "zero",
    means: Mapping[str, torch.Tensor] | None = None,
) -> Ablation:
    """A different neuron set per batch row; the batch inside the block must have ``len(rows)`` rows."""
    return Ablation(lm_or_model, list(rows), per_row=True, kind=kind, means=means)


@torch.no_grad()
def mean_activations(
    lm: LoadedModel,
    images: list[Image.Image],
    sites: Sequence[Site] | str,
    captions: list[str] | None = None,
    prompt: str | None = None,
    batch_size: int = default("batch_size"),
    max_new_tokens: int = default("max_new_tokens"),
) -> dict[str, torch.Tensor]:
    """Mean activation of every neuron of ``sites`` over reference images (float32, per site name).

    The model reads prompt + caption, as during captioning; captions default to its own unmasked
    greedy captions. Language sites average over the attended token positions; vision, projector and
    Q-Former sites over all positions. Under ``torch.distributed`` each process reads its shard of
    the images and the sums are all-reduced, so every process gets the means over all of them.
    """
    registry = SiteRegistry.of(lm.model)
    chosen = registry.select(sites) if isinstance(sites, str) else list(sites)
    if not images:
        raise InputError("mean ablation needs at least one reference image")
    if captions is not None and len(captions) != len(images):
        raise InputError(f"{len(captions)} captions for {len(images)} images; give one caption per image")
    world = distributed.world()
    images, captions = world.take(images), world.take(captions)
    if captions is None:
        captions = generate_captions(lm, images, prompt, max_new_tokens, batch_size)
    sums = {s.name: torch.zeros(s.size, dtype=torch.float64) for s in chosen}
    counts = dict.fromkeys(sums, 0.0)
    weights: dict[str, torch.Tensor] = {}

    def make_hook(site: Site):
        def record(x: torch.Tensor) -> None:
            x = x.detach().to(torch.float64)
            w = weights.get("language") if site.component == "language" else None
            if w is not None and x.shape[:2] == w.shape:
                sums[site.name] += (x * w.unsqueeze(-1)).sum(dim=tuple(range(x.dim() - 1))).cpu()
                counts[site.name] += float(w.sum())
            else:
                sums[site.name] += x.sum(dim=tuple(range(x.dim() - 1))).cpu()
                counts[site.name] += float(x[..., 0].numel())

        return record

    handles = []
    try:
        for site in chosen:
            handles.append(registry.hook(site, make_hook(site)))
        pairs = list(zip(images, captions))
        for batch in batches(pairs, batch_size):
            enc = teacher_forcing_inputs(lm.processor, lm.kind, [p[0] for p in batch], [p[1] for p in batch], prompt)
            enc.pop("labels")
            weights["language"] = enc["attention_mask"].to(lm.device, torch.float64)
            lm.model(**to_model_inputs(enc, lm.model))
    finally:
        for h in handles:
            h.remove()
    means = {}
    for name in sums:
        total = distributed.all_reduce_sum(torch.cat([sums[name], torch.tensor([counts[name]], dtype=torch.float64)]))
        means[name] = (total[:-1] / max(float(total[-1]), 1.0)).to(torch.float32)
    return means
