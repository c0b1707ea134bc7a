"""The recipes of ``canprobe organisms train``: captioning from scratch (``scenes``), or the sink recipe (``sink``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from canprobe.organisms import sink
from canprobe.organisms.train import DEFAULT_CONFIGS, train_organism


def train_recipe(name: str, out: Path, recipe: str = "scenes", device: str = "cpu", **changes) -> list[str]:
    """``canprobe organisms train``: train ``name`` into ``out`` and say how it went, in lines.

    ``recipe``: ``scenes`` (captioning from scratch; ``changes``: steps, batch_size, seed) or ``sink``
    (toy-llava: text pretraining, then alignment, ``canprobe.organisms.sink``; batch_size, seed, tokens).
    ``changes`` left None keep the recipe's defaults.
    """
    changes = {k: v for k, v in changes.items() if v is not None}
    if recipe == "sink":
        align = sink.AlignConfig() if "seed" not in changes else replace(sink.AlignConfig(), seed=changes["seed"])
        stage_a, stage_b = sink.train_sink_recipe(out, replace(sink.PretrainConfig(), **changes), align, device=device)
        last = stage_a.curve[-1]
        peak, rate = last["layers"][last["peak_layer"]], stage_a.tokens / stage_a.seconds
        return [
            f"Stage A: {stage_a.tokens:,} tokens in {stage_a.seconds:.0f} s ({rate:,.0f}/s); "
            f"first-token max|h|/median {peak['first_ratio']:.0f}x at layer {last['peak_layer']} "
            f"(other tokens {peak['rest_ratio']:.0f}x)",
            f"Stage B: {stage_b.steps} steps in {stage_b.seconds:.0f} s; saved to {out}, "
            f"curves in {out / sink.CURVE_FILE}",
        ]
    result = train_organism(name, out, replace(DEFAULT_CONFIGS[name], **changes), device=device)
    return [
        f"trained {name} ({result.parameters:,} parameters) in {result.seconds:.0f} s: "
        f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; saved to {out}"
    ]
