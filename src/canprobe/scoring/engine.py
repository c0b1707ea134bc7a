"""The scoring engine: one forward and one backward pass per batch, with a tap on every scored site.

The batch loss is the *sum* of per-sample losses, so the gradient that reaches sample i's
activations is exactly dL_i/da (samples never interact in these models). Weights stay frozen: the
first hooked activation is made to require grad so that the graph starts there; each hooked
activation passes through an identity autograd function (``_Tap``) whose backward reduces the
activation and its gradient to float32 per-neuron sums, so no copies are kept, and under gradient
checkpointing the activation is recomputed with its layer rather than held through the forward.
Sites whose output never reaches the loss (e.g. LLaVA's last vision layer, which
``vision_feature_layer=-2`` skips) get a zero gradient. What is summed per position is the score
method's (``canprobe.scoring.methods``); the engine only knows where and over which positions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from canprobe import distributed, features
from canprobe.errors import InputError
from canprobe.inputs import to_model_inputs
from canprobe.models import LoadedModel
from canprobe.sites import Site, SiteRegistry

if TYPE_CHECKING:
    from canprobe.scoring.methods import Method

log = logging.getLogger(__name__)

FEATURES_KEY = "image_features"  # a batch entry: cached image encodings in place of pixels
QFORMER_TEXT_KINDS = ("intermediate", "output")


@dataclass
class _Batch:
    """Per-batch position weights: ``weights`` reduce a score over T_i, ``masks`` select non-pad positions."""

    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    vision_rows: torch.Tensor  # per vision row (crop): 1 / number of crops of its sample


def _row_weights(mask: torch.Tensor) -> torch.Tensor:
    """Turn a 0/1 position mask [rows, T] into per-row means (each row sums to 1, empty rows to 0)."""
    mask = mask.float()
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)


def _weighted_sum(w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum over positions of w[...] * value[..., n], on value's device: one vector-matrix product
    (cheaper to dispatch than the equivalent einsum, which matters at batch 1 with one call per site)."""
    return (w.reshape(1, -1) @ value.reshape(w.numel(), -1)).view(-1)


def _on(total: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``total`` on ``value``'s device: sums stay where the site runs, so no site waits on a copy to
    the host (one per site and pass would stall a GPU); ``run`` brings them back once at the end."""
    return total if total.device == value.device else total.to(value.device)


class _Tap(torch.autograd.Function):
    """Identity whose backward hands (activation, gradient) to an accumulator.

    Autograd checks that the saved activation was not modified in place before the backward.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, acc: _Accumulator, positions) -> torch.Tensor:
        ctx.save_for_backward(a)
        ctx.acc, ctx.positions = acc, positions
        return a.view_as(a)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (a,) = ctx.saved_tensors
        ctx.acc.backward(a, g, ctx.positions)
        return g, None, None


class _Accumulator:
    """Float32 per-neuron sums for one site, filled by its hooks during forward and backward.

    ``score`` sums what the method reads at each position (``Method.forward_value`` or
    ``backward_value``), weighted over the positions T_i; ``signed`` sums -a * dL/da over non-pad
    positions; ``input_sq`` (methods that read weights) the weighted mean square of the input
    features of the site's linear layer.

    A routed expert's site (``routed``: the tokens of the rows its hook hands over, ``SiteRegistry.
    expert_rows``) sees only the tokens routed to it: ``score`` sums over those of them in T_i, each
    counted once, and ``count`` counts them, so that ``mean`` is the average over the tokens routed to
    the expert rather than over samples.
    """

    def __init__(
        self,
        site: Site,
        method: Method,
        batch: Callable[[], _Batch],
        encoder: bool = False,
        routed: Callable[[], torch.Tensor] | None = None,
    ):
        self.site, self.method, self.batch = site, method, batch
        self.encoder = encoder  # a language site in an encoder (T5's): it reads the prompt, not the caption
        self.routed = routed
        self.score = torch.zeros(site.size, dtype=torch.float32)
        self.signed = torch.zeros(site.size, dtype=torch.float32)
        self.count = torch.zeros(1, dtype=torch.float32) if routed is not None else None
        self.input_sq = None
        # the batch whose forward was hooked: gradient checkpointing recomputes it and must not count twice
        self._last: _Batch | None = None
        self._last_input: _Batch | None = None

    def mean(self, n: int) -> torch.Tensor:
        """The scores: the sums over ``n`` samples, or (a routed expert) over the tokens routed to it."""
        return self.score / (n if self.count is None else self.count.clamp(min=1))

    def _positions(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score weights, non-pad mask), each [rows, T], for an activation of shape [rows, T, N]; a routed
        expert's rows [rows, N]: 1 for a routed token in T_i (0 elsewhere), and the non-pad mask, per row."""
        b = self.batch()
        comp = self.site.component
        if self.routed is not None:
            tokens = self.routed().to(a.device)
            key = "language_encoder" if self.encoder else comp
            w, m = b.weights[key].to(a.device).reshape(-1), b.masks[key].to(a.device).reshape(-1)
            return (w[tokens] > 0).float(), m[tokens]
        if comp in ("vision", "projector") and a.dim() == 2:
            # one sequence of every image's patches (Qwen-VL): per-patch weights, summed over each
            # group of patches that the merger folds into one position
            w = b.vision_rows.to(a.device)
            if w.numel() % a.shape[0]:
                raise InputError(f"{self.site.name}: {a.shape[0]} positions for {w.numel()} image patches")
            w = w.view(a.shape[0], -1).sum(dim=1)
            return w, torch.ones_like(w)
        if comp in ("vision", "projector"):
            rows, t = a.shape[:2]
            if rows != b.vision_rows.numel():
                raise InputError(f"{self.site.name}: {rows} image rows for a batch of {b.vision_rows.numel()} crops")
            mask = torch.ones(rows, t, device=a.device)
            return b.vision_rows.to(a.device)[:, None] / t * mask, mask
        key = "language_encoder" if self.encoder else comp
        if comp == "qformer":
            key = "qformer_text" if self.site.kind in QFORMER_TEXT_KINDS else "qformer_query"
            if key == "qformer_query":
                mask = torch.ones(a.shape[:2], device=a.device)
                return _row_weights(mask), mask
        w, m = b.weights[key].to(a.device), b.masks[key].to(a.device)
        if a.dim() == 2 and a.shape[0] == w.numel():  # rows and positions flattened into one (OPT's MLP)
            return w.reshape(-1), m.reshape(-1)
        if w.shape != a.shape[:2]:
            raise InputError(f"{self.site.name}: activation positions {tuple(a.shape[:2])} != inputs {tuple(w.shape)}")
        return w, m

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """Called with the site's activation [rows, T, N]; returns it tapped for the backward pass.

        The tap saves ``a`` as an autograd tensor, so under gradient checkpointing it is dropped
        after the forward and recomputed with its layer, instead of being held until the backward.
        """
        if not a.requires_grad:
            a.requires_grad_(True)
        batch = self.batch()
        # a routed expert's rows change with every call: their positions travel with the tap
        positions = self._positions(a) if self.routed is not None else None
        if batch is not self._last:  # a recomputed forward (checkpointing) is counted once
            self._last = batch
            with torch.no_grad():
                if positions is not None:
                    count = positions[0].sum().reshape(1)
                    self.count = _on(self.count, count) + count
                value = self.method.forward_value(a.detach())
                if value is not None:
                    w, _ = positions or self._positions(a)
                    value = _weighted_sum(w, value)
                    self.score = _on(self.score, value) + value
        return _Tap.apply(a, self, positions)

    def backward(self, a: torch.Tensor, g: torch.Tensor, positions=None) -> None:
        """Accumulate the gradient-dependent sums from the activation and its gradient."""
        w, m = positions or self._positions(a)
        with torch.no_grad():
            af, gf = a.float(), g.float()
            prod = af * gf
            signed = _weighted_sum(m, prod)
            self.signed = _on(self.signed, signed) - signed
            value = self.method.backward_value(af, gf, prod)
            if value is not None:
                value = _weighted_sum(w, value)
                self.score = _on(self.score, value) + value

    def weight_input(self, x: torch.Tensor) -> None:
        """Accumulate the mean square of each input feature of the site's linear layer."""
        batch = self.batch()
        if batch is self._last_input:
            return
        self._last_input = batch
        w, _ = self._positions(x)
        with torch.no_grad():
            sq = _weighted_sum(w, x.detach().float().square())
        self.input_sq = sq if self.input_sq is None else _on(self.input_sq, sq) + sq


def _batch_positions(lm: LoadedModel, enc: dict, reduction: str) -> _Batch:
    labels, attn = enc["labels"], enc["attention_mask"]
    if "decoder_input_ids" in enc:  # T5: the decoder predicts labels in place; the encoder reads the prompt
        dec = enc["decoder_attention_mask"]
        lang = (labels != -100).long() if reduction == "loss" else dec
        weights = {"language": _row_weights(lang), "language_encoder": _row_weights(attn)}
        masks = {"language": dec.float(), "language_encoder": attn.float()}
    else:
        loss_pos = torch.zeros_like(attn)
        loss_pos[:, :-1] = (labels[:, 1:] != -100).long()
        lang = loss_pos if reduction == "loss" else attn
        weights = {"language": _row_weights(lang)}
        masks = {"language": attn.float()}
    if "qformer_attention_mask" in enc:
        qmask = enc["qformer_attention_mask"]
        weights["qformer_text"], masks["qformer_text"] = _row_weights(qmask), qmask.float()
    # on the inputs' device once per batch, not copied there by every vision site's hook
    return _Batch(weights, masks, lm.family.vision_rows(lm.model, enc).to(attn.device))


@contextmanager
def checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """Gradient checkpointing of every transformer layer for the duration of the block.

    transformers checkpoints a layer only while the layer is in training mode; only the layers'
    own flags are set, so dropout and every other submodule stay in eval mode.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers or not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(f"{type(model).__name__} does not support gradient checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also makes every input embedding require grad (for adapter training), which would
    # run the backward pass through encoders that hold no scored site; the scores need gradients
    # only from the first hooked activation on, so drop that
    model.disable_input_require_grads()
    modes = [m.training for m in layers]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()


def per_sample_loss(model: torch.nn.Module, enc: dict) -> torch.Tensor:
    """Mean caption-token NLL of each row of a teacher-forcing batch (float32, shape [rows]).

    Only the logits from the first loss position on are computed (``logits_to_keep``), which
    saves the vocabulary projection of the image and prompt tokens.
    """
    labels = enc["labels"]
    inputs = {k: v for k, v in enc.items() if k != "labels"}
    if "decoder_input_ids" in inputs:  # an encoder-decoder predicts the labels in place
        logits = model(**inputs, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        mask = (labels != -100).to(nll.dtype)
        return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    valid = labels[:, 1:] != -100
    first = int(valid.any(dim=0).nonzero()[0])
    keep = labels.shape[1] - first
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits[:, :-1].float()
    targets = labels[:, first + 1 :]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    mask = valid[:, first:].to(nll.dtype)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def run(
    lm: LoadedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    sites: list[Site],
    method: Method,
    reduction: str,
    gradient_checkpointing: bool = False,
) -> tuple[list[_Accumulator], int]:
    """Hook ``sites``, run every batch forward and backward, and return their all-reduced sums and the sample count."""
    registry = SiteRegistry.of(lm.model)
    current: list[_Batch] = []
    accs = [
        _Accumulator(
            s,
            method,
            lambda: current[0],
            lm.family.encoder_site(s.module_path),
            (lambda s=s: registry.expert_rows(s)[0]) if s.expert >= 0 else None,
        )
        for s in sites
    ]
    handles = []
    n = 0
    try:
        for acc in accs:
            handles.append(registry.hook(acc.site, acc.forward))
            if method.reads_weight_inputs:
                handles.append(registry.hook(acc.site, acc.weight_input, "weight_input"))
        with checkpointing(lm.model) if gradient_checkpointing else nullcontext():
            for enc in batches:
                cached = enc.pop(FEATURES_KEY, None)
                enc = to_model_inputs(enc, lm.model)
                current[:] = [_batch_positions(lm, enc, reduction)]
                inputs = enc if cached is None else features.model_inputs(lm, enc, cached)
                with torch.enable_grad():
                    loss = per_sample_loss(lm.model, inputs).sum()
                    if loss.requires_grad:
                        loss.backward()
                n += enc["input_ids"].shape[0]
                log.info("scored %d samples", n)
    finally:
        for h in handles:
            h.remove()
    n = int(distributed.all_reduce_sum(torch.tensor(n, dtype=torch.float64)))
    if n == 0:
        raise InputError("no samples to score")
    fields = [
        (acc, field)
        for acc in accs
        for field in ("score", "signed", "input_sq", "count")
        if getattr(acc, field) is not None
    ]
    for (acc, field), total in zip(fields, _on_host([getattr(acc, field) for acc, field in fields])):
        setattr(acc, field, distributed.all_reduce_sum(total))
    return accs, n


def _on_host(sums: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 1-D ``sums`` on the CPU, in one copy per device rather than one per sum (each copy waits for its device)."""
    out = list(sums)
    by_device: dict[torch.device, list[int]] = {}
    for i, total in enumerate(sums):
        by_device.setdefault(total.device, []).append(i)
    for ids in by_device.values():
        parts = torch.cat([sums[i] for i in ids]).cpu().split([sums[i].numel() for i in ids])
        for i, part in zip(ids, parts):
            out[i] = part
    return out
