"""``--dry-run``: what a command would run and the memory it needs, from the model's config alone.

The model is built on the meta device (shapes, no weights), so a plan for a 7B checkpoint takes
seconds and no GPU. Memory figures are estimates per process: weights, plus the activations kept
for one scoring batch from the scope's first scored component on (``canprobe.inventory``; with
gradient checkpointing, each layer's input plus one layer's activations), or the key/value cache
of one generation batch, whichever is larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from canprobe.config import Generation, Model, default
from canprobe.inventory import (
    TEXT_TOKENS,
    Inventory,
    component_modules,
    inventory,
    meta_model,
)
from canprobe.sites import SiteRegistry

GIB = 1024**3


@dataclass(frozen=True)
class Plan:
    model: str
    dtype: str
    processes: int
    images: int
    scope: str
    neurons: int
    sites: int
    weight_bytes: int
    scoring_bytes: int  # activations of one scoring batch
    generation_bytes: int  # key/value cache of one generation batch
    lines: tuple[str, ...]

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + max(self.scoring_bytes, self.generation_bytes)


def _language_config(model: torch.nn.Module):
    cfg = model.config
    return getattr(cfg, "text_config", cfg)


# the order a forward pass runs the components in; the backward of a score starts at the first scored one
PIPELINE = ("vision", "projector", "qformer", "language")


def _scoring_activation_bytes(registry: SiteRegistry, inv: Inventory, sites, checkpointed: bool) -> int:
    """Per image: what the backward of a scope keeps, from its first scored component on.

    Components before it run without a graph (their weights are frozen and nothing upstream requires
    grad). With checkpointing, each layer keeps its input plus one layer's activations during its
    recompute.
    """
    first = min(PIPELINE.index(s.component) for s in sites)
    owners = component_modules(registry)
    itemsize = torch.empty((), dtype=getattr(torch, inv.dtype)).element_size()
    total = 8 * sum(s.size for s in sites)  # float32 score and signed accumulators
    for c in inv.components:
        if PIPELINE.index(c.component) < first:
            continue
        hidden = getattr(getattr(owners[c.component][0], "config", None), "hidden_size", None)
        if checkpointed and hidden and c.layers > 1:
            total += c.layers * c.tokens * hidden * itemsize + c.activation_bytes // c.layers
        else:
            total += c.activation_bytes
    return total


def _kv_bytes(model: torch.nn.Module, inv: Inventory, rows: int, new_tokens: int) -> int:
    cfg = _language_config(model)
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_width = getattr(cfg, "num_key_value_heads", heads) * (cfg.hidden_size // heads)
    tokens = next((c.tokens for c in inv.components if c.component == "language"), TEXT_TOKENS) + new_tokens
    itemsize = torch.empty((), dtype=getattr(torch, inv.dtype)).element_size()
    return 2 * cfg.num_hidden_layers * tokens * kv_width * itemsize * rows


def make_plan(
    machine: Model,
    n_images: int,
    scope: str,
    generation: Generation = Generation(),
    processes: int = 1,
    searches: int = 0,
    growth: float = default("growth"),
) -> Plan:
    """The plan of scoring ``scope`` over ``n_images`` (and ``searches`` k* searches over it, growing k by
    ``growth``): ``machine``'s model, dtype and gradient checkpointing; ``generation``'s batch size (images
    per scoring pass, rows per generate) and caption length."""
    model, dtype, gradient_checkpointing = machine.model, machine.dtype, machine.gradient_checkpointing
    batch_size, max_new_tokens = generation.batch_size, generation.max_new_tokens
    net = meta_model(model)
    inv = inventory(net, model, dtype)
    registry = SiteRegistry.of(net)
    sites = registry.select(scope)
    neurons = sum(s.size for s in sites)
    per_process = math.ceil(n_images / processes)
    batch = min(batch_size, max(per_process, 1))
    per_image = _scoring_activation_bytes(registry, inv, sites, gradient_checkpointing)
    scoring = per_image * batch
    kv_cache = _kv_bytes(net, inv, min(batch_size, max(per_process, 1)), max_new_tokens)
    lines = [
        f"model {model}: {inv.parameters:,} parameters, {inv.dtype}",
        f"scope {scope}: {len(sites)} sites, {neurons:,} neurons",
        f"images: {n_images} over {processes} process(es), {per_process} per process",
        f"scoring: {math.ceil(per_process / batch)} forward+backward pass(es) of batch {batch} per process"
        + (" with gradient checkpointing" if gradient_checkpointing else ""),
    ]
    if searches:
        # growth to the scope size, then bisection of the last interval, plus the baseline
        steps = 1 + math.ceil(math.log(max(neurons, 2), growth)) + math.ceil(math.log2(max(neurons, 2)))
        lines.append(f"search: {searches} k* search(es), at most about {steps} evaluations each (plus curve points)")
    plan = Plan(model, dtype, processes, n_images, scope, neurons, len(sites), inv.weight_bytes, scoring, kv_cache, ())
    lines += [
        f"memory per process: weights {plan.weight_bytes / GIB:.2f} GiB + scoring activations "
        f"{scoring / GIB:.2f} GiB (batch {batch}) or generation cache {kv_cache / GIB:.2f} GiB "
        f"-> about {plan.peak_bytes / GIB:.2f} GiB",
    ]
    return Plan(**{**plan.__dict__, "lines": tuple(lines)})
