"""Massive activations: residual-stream entries orders of magnitude above the rest, and who writes them.

Sun et al. 2024 ("Massive activations in large language models") find a few residual dimensions
of pretrained LMs (dims 1415 and 2533 of LLaMA-2-7B) holding values about 1,000x the median on the
first token and on delimiters, created by one early layer's MLP and then carried unchanged. They act
as fixed biases: zeroing them collapses the model, setting them to their mean does not. On the
language model of a vision-language model this module measures, per image, the residual stream
after every decoder layer while the model reads prompt + caption:

* per layer: the largest |h|, the median |h| of that sequence, and where the largest sits
  (position, token, dim);
* every entry with |h| at least ``ratio`` times its sequence's median, grouped by (dim, position,
  token) over images and layers: the first and last layer it appears in, its value and ratio at the
  layer where it peaks, on how many images;
* the ``down_proj`` output channels that write it: the residual stream is the embedding plus every
  layer's attention and MLP outputs, so ``language.layers.j.mlp.down_proj:dim`` adds its output at
  (position, dim) to the entry; the channels adding at least ``min_share`` of the value are listed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from canprobe.captions import generate_captions
from canprobe.config import Generation
from canprobe.errors import InputError
from canprobe.inputs import forced_batches, to_model_inputs
from canprobe.models import LoadedModel
from canprobe.sites import Site, SiteRegistry

log = logging.getLogger(__name__)

DEFAULT_RATIO = 100.0  # Sun et al.'s rule of thumb is |h| > 100 and about 1,000x the median
DEFAULT_MIN_SHARE = 0.1
STUDY_IMAGES = 32  # a study measures its first this many images (Sun et al. read a few dozen sequences)


@dataclass(frozen=True)
class LayerPeak:
    """The largest |h| of one layer's residual output over all images (median: of its own sequence)."""

    layer: int
    value: float  # signed
    median: float
    ratio: float
    position: int
    token: str
    dim: int


@dataclass(frozen=True)
class Writer:
    """A down_proj output channel and the mean value it adds to a massive activation."""

    address: str
    contribution: float
    share: float  # contribution / value of the activation at its peak layer


@dataclass(frozen=True)
class MassiveActivation:
    dim: int
    position: int  # counted from the first attended token of the sequence
    token: str
    first_layer: int
    last_layer: int
    peak_layer: int
    value: float  # mean signed value at the peak layer over the images where it is massive there
    ratio: float  # mean |value| / sequence median at the peak layer over the same images
    images: int  # images on which it is massive at the peak layer
    writers: tuple[Writer, ...]

    @property
    def layers(self) -> str:
        return str(self.first_layer) if self.first_layer == self.last_layer else f"{self.first_layer}-{self.last_layer}"


@dataclass
class ActivationReport:
    """Per-layer peaks and the massive activations of a language model over a set of images."""

    n_images: int
    ratio_threshold: float
    layers: list[LayerPeak] = field(default_factory=list)
    massive: list[MassiveActivation] = field(default_factory=list)

    @property
    def peak(self) -> LayerPeak | None:
        """The layer peak with the highest ratio to its median."""
        return max(self.layers, key=lambda p: p.ratio, default=None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ActivationReport:
        massive = [
            MassiveActivation(**{**m, "writers": tuple(Writer(**w) for w in m["writers"])}) for m in data["massive"]
        ]
        return cls(data["n_images"], data["ratio_threshold"], [LayerPeak(**p) for p in data["layers"]], massive)


@dataclass
class _Entry:
    """Running sums for one (dim, position, token) over images and layers."""

    layers: dict[int, list] = field(default_factory=dict)  # layer -> [count, sum value, sum ratio, writer sums]


def decoder_layers(registry: SiteRegistry) -> list[tuple[Site, torch.nn.Module]]:
    """(down_proj site, the layer holding it) for every layer of the language model that reads the prompt
    and the caption together, in order (of an encoder-decoder, the encoder: its decoder reads the caption alone)."""
    family = registry.family
    sites = [
        s
        for s in registry.select("language.down_proj")
        if not family.encoder_decoder or family.encoder_site(s.module_path)
    ]
    inside = "." + family.kinds(registry.model, "language")["down_proj"].module  # the site's path inside its layer
    return [(s, registry.model.get_submodule(s.module_path.removesuffix(inside))) for s in sites]


@torch.no_grad()
def massive_activations(
    lm: LoadedModel,
    inputs: Sequence[Image.Image | str],
    captions: list[str] | None = None,
    generation: Generation = Generation(),
    ratio: float = DEFAULT_RATIO,
    min_share: float = DEFAULT_MIN_SHARE,
) -> ActivationReport:
    """Measure the residual stream of ``lm``'s language model on prompt + caption for every input.

    ``inputs``: images, or the texts a text-only model reads (and its continuations of them).
    ``captions`` default to the model's own greedy captions (what it reads while it captions, with
    ``generation``'s prompt and settings).
    """
    if not lm.family.generates:
        raise InputError(f"{lm.source} is a {lm.kind} model; activations are measured on language models")
    if not inputs:
        raise InputError("measuring activations needs at least one image")
    if ratio <= 1:
        raise InputError(f"ratio threshold must be above 1, got {ratio}")
    if captions is None:
        captions = generate_captions(lm, inputs, generation)
    if len(captions) != len(inputs):
        raise InputError(f"{len(captions)} captions for {len(inputs)} images; give one caption per image")
    registry = SiteRegistry.of(lm.model)
    layers = decoder_layers(registry)
    residual: dict[int, torch.Tensor] = {}
    written: dict[int, torch.Tensor] = {}

    def keep(store: dict, layer: int):
        def record(out) -> None:
            store[layer] = (out[0] if isinstance(out, tuple) else out).detach().float().cpu()

        return record

    handles = []
    for site, block in layers:  # the residual stream after each block is no neuron site: a plain hook
        handles.append(block.register_forward_hook(lambda _m, _a, out, record=keep(residual, site.layer): record(out)))
        handles.append(registry.hook(site, keep(written, site.layer)))
    fold = _Fold(ratio, lm.tokenizer)
    try:
        for _, enc, _ in forced_batches(lm, inputs, captions, generation.prompt, generation.batch_size):
            lm.model(**to_model_inputs(enc, lm.model))
            mask = enc["attention_mask"].bool()
            positions = mask.long().cumsum(1) - 1
            ids = enc["input_ids"]
            # (layers, batch, tokens, dims); OPT's MLP writes rows and positions flattened into one
            writes = torch.stack([written[s.layer].reshape(residual[s.layer].shape) for s, _ in layers])
            for site, _ in layers:
                fold.add(site.layer, residual[site.layer], mask, positions, ids, writes)
    finally:
        for h in handles:
            h.remove()
    sites = [s for s, _ in layers]
    massive = [_summarize(key, entry, sites, min_share) for key, entry in fold.entries.items()]
    massive.sort(key=lambda m: -abs(m.value))
    return ActivationReport(len(inputs), ratio, [fold.best[s.layer] for s in sites], massive)


@dataclass
class _Fold:
    """The per-layer peaks and the massive entries, folded in one batch of one layer's residual output at a time."""

    ratio: float
    tokenizer: object
    best: dict[int, LayerPeak] = field(default_factory=dict)
    entries: dict[tuple[int, int, str], _Entry] = field(default_factory=dict)

    def add(self, layer, h, mask, positions, ids, writes) -> None:
        x = h.abs()
        for b in range(x.shape[0]):
            row = x[b][mask[b]]  # (attended tokens, dims)
            median = float(row.median())
            flat = int(row.argmax())
            t, d = divmod(flat, row.shape[1])
            token_index = int(mask[b].nonzero()[t])
            value = float(h[b, token_index, d])
            peak_ratio = abs(value) / median if median > 0 else float("inf")
            if layer not in self.best or peak_ratio > self.best[layer].ratio:
                token = self.tokenizer.convert_ids_to_tokens(int(ids[b, token_index]))
                self.best[layer] = LayerPeak(layer, value, median, peak_ratio, t, token, d)
            hits = ((x[b] >= self.ratio * median) & mask[b].unsqueeze(-1)).nonzero().tolist()
            for ti, di in hits:
                key = (di, int(positions[b, ti]), self.tokenizer.convert_ids_to_tokens(int(ids[b, ti])))
                stats = self.entries.setdefault(key, _Entry()).layers.setdefault(layer, [0, 0.0, 0.0, 0.0])
                v = float(h[b, ti, di])
                stats[0] += 1
                stats[1] += v
                stats[2] += abs(v) / median
                stats[3] = stats[3] + writes[:, b, ti, di]


def _summarize(key, entry: _Entry, sites: list[Site], min_share: float) -> MassiveActivation:
    dim, position, token = key
    order = [s.layer for s in sites]
    seen = sorted(entry.layers, key=order.index)
    peak = max(seen, key=lambda layer: abs(entry.layers[layer][1] / entry.layers[layer][0]))
    count, total, ratio_sum, write_sum = entry.layers[peak]
    value = total / count
    contributions = write_sum / count
    writers = []
    for i, site in enumerate(sites[: order.index(peak) + 1]):
        c = float(contributions[i])
        share = c / value if value else 0.0
        if share >= min_share:
            writers.append(Writer(site.address(dim), c, share))
    writers.sort(key=lambda w: -w.share)
    return MassiveActivation(
        dim, position, token, seen[0], seen[-1], peak, value, ratio_sum / count, count, tuple(writers)
    )


def format_activations(report: ActivationReport, limit: int = 20) -> list[str]:
    """Printable lines: the per-layer peaks, then the massive activations and their writers."""
    lines = [f"residual stream of the language model over {report.n_images} image(s), |h| by layer output:"]
    lines.append(f"  {'layer':>5s} {'max |h|':>9s} {'median':>8s} {'ratio':>8s} {'pos':>4s} {'token':10s} {'dim':>5s}")
    for p in report.layers:
        lines.append(
            f"  {p.layer:>5d} {p.value:>9.2f} {p.median:>8.3f} {p.ratio:>7.0f}x {p.position:>4d} {p.token[:10]:10s} "
            f"{p.dim:>5d}"
        )
    if not report.massive:
        lines.append(f"no massive activations (no |h| at least {report.ratio_threshold:g}x its sequence median)")
        return lines
    lines.append(
        f"massive activations (|h| >= {report.ratio_threshold:g}x the sequence median), "
        f"{len(report.massive)} found, largest first:"
    )
    lines.append(
        f"  {'dim':>5s} {'pos':>4s} {'token':10s} {'layers':>7s} {'value':>9s} {'ratio':>8s} {'images':>6s}  written by"
    )
    for m in report.massive[:limit]:
        writers = ", ".join(f"{w.address} ({w.contribution:+.1f}, {w.share:.0%})" for w in m.writers) or "-"
        lines.append(
            f"  {m.dim:>5d} {m.position:>4d} {m.token[:10]:10s} {m.layers:>7s} {m.value:>9.2f} {m.ratio:>7.0f}x "
            f"{m.images:>6d}  {writers}"
        )
    if len(report.massive) > limit:
        lines.append(f"  ... {len(report.massive) - limit} more")
    return lines
