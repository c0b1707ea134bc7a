"""Is a first-token sink growing? One measurement of a language model (alone or inside a VLM) on a fixed batch.

Per decoder layer: the largest |h| at the first token and at every other attended token, each over
the row's median |h| (the ratio ``canprobe.massive`` prints), and each head's mean attention from the
later tokens to the first (and to the image tokens, in a VLM). At the layer where the first-token
ratio peaks: the ``down_proj`` output channels writing that dimension there (``canprobe.massive``'s
writers), and the loss with those channels zeroed, set to their mean at their own position (Sun et
al.'s control, ``canprobe.faults.Mean``), and with as many random ``down_proj`` channels zeroed.
A sink that works as Sun et al. describe shows a first-token ratio far above the rest, most of the
attention on the first token, and a loss that zeroing ruins while the per-position mean keeps it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

from canprobe.ablation import ablate
from canprobe.faults import ChannelStats, Mean
from canprobe.massive import DEFAULT_MIN_SHARE, Writer, decoder_layers
from canprobe.sites import SiteRegistry


@dataclass(frozen=True)
class SinkLayer:
    """One layer's residual output: ratios are means over rows of max |h| / the row's median |h|."""

    layer: int
    first_ratio: float  # at the first token
    first_dim: int  # the dimension holding the first token's largest ratio (on average over rows)
    first_value: float  # mean signed value of the first token at first_dim
    rest_ratio: float  # at every other attended token
    median: float
    norm_ratio: float  # the first token's L2 norm over the other tokens' mean (Guo et al.'s measure)
    first_attention: tuple[float, ...]  # per head: mean attention of the later tokens to the first
    image_attention: tuple[float, ...] | None = None  # per head: to all image tokens together


@dataclass
class SinkMeasure:
    loss: float | None
    layers: list[SinkLayer]
    peak_layer: int  # the layer with the largest first-token ratio
    peak_dim: int
    writers: list[Writer] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)  # the down_proj channels ablated
    ablation: dict[str, float] = field(default_factory=dict)  # loss: zero, mean_position, random
    input_rms: dict[str, float] = field(default_factory=dict)  # the first layer's input: text, image tokens

    @property
    def peak(self) -> SinkLayer:
        return next(p for p in self.layers if p.layer == self.peak_layer)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module):
    """Attention weights need the eager implementation; the model's own comes back on exit."""
    before = model.config._attn_implementation
    if before == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _row_medians(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~mask[..., None], float("nan")).flatten(1).nanmedian(dim=1).values


@torch.no_grad()
def measure_sink(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    image_token: int | None = None,
    min_share: float = DEFAULT_MIN_SHARE,
    seed: int = 0,
) -> SinkMeasure:
    """Measure the first-token sink of ``model``'s language model on ``inputs`` (right-padded rows).

    With ``labels`` in ``inputs`` the writers' channels are also ablated (zero, per-position mean,
    random) and the loss under each recorded. ``image_token``: the id that marks image positions in
    ``input_ids``, for the attention to image tokens and their input scale.
    """
    registry = SiteRegistry.of(model)
    layers = decoder_layers(registry)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    image = (ids == image_token) & mask if image_token is not None else None
    residual: dict[int, torch.Tensor] = {}
    written: dict[int, torch.Tensor] = {}
    embedded: list[torch.Tensor] = []

    def keep(store: dict, layer: int):
        def record(out) -> None:
            store[layer] = (out[0] if isinstance(out, tuple) else out).detach().float()

        return record

    def first_input(_module, args, kwargs):
        embedded.append((args[0] if args else kwargs["hidden_states"]).detach().float())

    handles = [layers[0][1].register_forward_pre_hook(first_input, with_kwargs=True)]
    for site, block in layers:
        handles.append(block.register_forward_hook(lambda _m, _a, out, record=keep(residual, site.layer): record(out)))
        handles.append(registry.hook(site, keep(written, site.layer)))
    try:
        with eager_attention(model):
            out = model(**inputs, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    queries = mask[:, 1:] & (~image[:, 1:] if image is not None else True)
    n_queries = queries.sum().clamp(min=1)
    result = []
    for (site, _), attention in zip(layers, out.attentions):
        x = residual[site.layer].abs()
        median = _row_medians(x, mask)
        first = x[:, 0] / median[:, None]
        rest = x[:, 1:].masked_fill(~mask[:, 1:, None], 0).flatten(1).amax(dim=1) / median
        dim = int(first.mean(0).argmax())
        norms = residual[site.layer].norm(dim=-1)
        others = (norms[:, 1:] * mask[:, 1:]).sum(1) / mask[:, 1:].sum(1).clamp(min=1)
        weights = attention.float()[:, :, 1:]  # [rows, heads, later queries, keys]
        to_first = (weights[..., 0] * queries[:, None]).sum((0, 2)) / n_queries
        to_image = None
        if image is not None:
            to_image = ((weights * image[:, None, None]).sum(-1) * queries[:, None]).sum((0, 2)) / n_queries
        result.append(
            SinkLayer(
                site.layer,
                float(first.amax(dim=1).mean()),
                dim,
                float(residual[site.layer][:, 0, dim].mean()),
                float(rest.mean()),
                float(median.mean()),
                float((norms[:, 0] / others).mean()),
                tuple(to_first.tolist()),
                tuple(to_image.tolist()) if to_image is not None else None,
            )
        )
    peak = max(result, key=lambda p: p.first_ratio)
    measure = SinkMeasure(float(out.loss) if out.loss is not None else None, result, peak.layer, peak.first_dim)
    rms = embedded[0].pow(2).mean(-1).sqrt()
    text = mask & ~image if image is not None else mask
    measure.input_rms["text"] = float(rms[text].mean())
    if image is not None and image.any():
        measure.input_rms["image"] = float(rms[image].mean())
    sites = [s for s, _ in layers]
    upto = sites[: [s.layer for s in sites].index(peak.layer) + 1]
    contributions = [float(written[s.layer][:, 0, peak.first_dim].mean()) for s in upto]
    measure.writers = sorted(
        (
            Writer(s.address(peak.first_dim), c, c / peak.first_value)
            for s, c in zip(upto, contributions)
            if peak.first_value and c / peak.first_value >= min_share
        ),
        key=lambda w: -w.share,
    )
    largest = max(range(len(upto)), key=lambda i: abs(contributions[i]))
    measure.channels = [w.address for w in measure.writers] or [upto[largest].address(peak.first_dim)]
    if out.loss is not None:
        measure.ablation = _ablation_losses(model, registry, inputs, mask, written, measure.channels, seed)
    return measure


def _ablation_losses(model, registry, inputs, mask, written, channels, seed) -> dict[str, float]:
    """The loss with ``channels`` zeroed, at their per-position mean, and with as many random channels zeroed."""
    stats = {}
    weight = mask[..., None].float()
    for address in channels:
        site, _ = registry.resolve(address)
        x = written[site.layer] * weight
        position_mean = x.sum(0) / weight.sum(0).clamp(min=1)
        stats[site.name] = ChannelStats(x.sum((0, 1)) / weight.sum().clamp(min=1), None, None, None, position_mean)
    sites = registry.select("language.down_proj")
    generator = torch.Generator().manual_seed(seed)
    chosen = set(channels)
    random_channels: list[str] = []
    while len(random_channels) < len(channels):
        site = sites[int(torch.randint(len(sites), (1,), generator=generator))]
        address = site.address(int(torch.randint(site.size, (1,), generator=generator)))
        if address not in chosen:
            chosen.add(address)
            random_channels.append(address)
    losses = {}
    for name, neurons, fault in (
        ("zero", channels, "zero"),
        ("mean_position", channels, Mean("position")),
        ("random", random_channels, "zero"),
    ):
        with ablate(model, neurons, fault, stats):
            losses[name] = float(model(**inputs).loss)
    return losses
