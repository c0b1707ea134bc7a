"""Collapse metrics: what is measured of one caption, and the registry of how captions under one mask are summarized.

Per caption (``CaptionMetrics``, made by ``canprobe.evaluation``): perplexity (exp of the mean
token NLL of caption + end token) under a scoring model, CLIP score ``100 * max(cos(image,
caption), 0)``, length in words, distinct-word ratio, and exact match with the unmasked model's
caption. Per evaluated mask: one number per entry of ``METRICS``, the registry of named metrics
(its definition over a mask's captions, which way is worse, its label and format in tables, and
its axis in the report's figures). ``MetricSummary`` has one field per entry; the curve, the
report, the robustness tables and the command line read names, labels and formats from the
registry, so adding a metric is one entry here (earlier curves read it as missing, NaN).
Infinite or NaN perplexities are recorded as data and never raise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, make_dataclass

import torch

from canprobe.errors import InputError


def word_stats(caption: str) -> tuple[int, float]:
    """Length in words and distinct-word ratio (0 for an empty caption: nothing said, no variety)."""
    words = caption.lower().split()
    return len(words), (len(set(words)) / len(words) if words else 0.0)


@dataclass(frozen=True)
class CaptionMetrics:
    """Metrics of one generated caption."""

    caption: str
    ppl: float
    clip: float
    length: int
    distinct: float
    exact_match: bool


@dataclass(frozen=True)
class Metric:
    """One named summary of a mask's captions.

    ``of``: the number, from the captions' metrics. ``worse``: "higher" or "lower", the direction
    a collapsing model moves it. ``label`` and ``fmt`` (a format spec): how tables show it.
    ``axis``: "log" or "linear" when the report plots it against k, None when only tables show it.
    """

    name: str
    label: str
    of: Callable[[Sequence[CaptionMetrics]], float]
    worse: str
    fmt: str
    axis: str | None = None

    def format(self, value: float) -> str:
        return "nan" if isinstance(value, float) and math.isnan(value) else format(value, self.fmt)


def _median(values: torch.Tensor) -> float:
    """The midpoint median (mean of the two middle values), so it does not depend on ties' order."""
    if values.numel() == 0:
        return math.nan
    s = values.sort().values
    mid = s.numel() // 2
    return float(s[mid]) if s.numel() % 2 else float((s[mid - 1] + s[mid]) / 2)


def _nanmean(values: list[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else math.nan


def _ppl_median(metrics: Sequence[CaptionMetrics]) -> float:
    """Median over the non-NaN values (inf is an honest order statistic)."""
    ppl = torch.tensor([m.ppl for m in metrics], dtype=torch.float64)
    return _median(ppl[~ppl.isnan()])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("ppl_median", "median PPL", _ppl_median, "higher", ".4g", axis="log"),
        Metric("ppl_nonfinite", "non-finite PPL", lambda ms: sum(not math.isfinite(m.ppl) for m in ms), "higher", "d"),
        Metric("clip_mean", "mean CLIP score", lambda ms: _nanmean([m.clip for m in ms]), "lower", ".2f", "linear"),
        Metric("length_mean", "words", lambda ms: _mean([m.length for m in ms]), "lower", ".1f"),
        Metric("distinct_mean", "mean distinct-word ratio", lambda ms: _mean([m.distinct for m in ms]), "lower", ".2f"),
        Metric("exact_match", "same as unmasked", lambda ms: _mean([m.exact_match for m in ms]), "lower", ".0%"),
        # a collapsed model often ends the caption at once: the share of captions with no word at all
        Metric("empty_rate", "empty captions", lambda ms: _mean([m.length == 0 for m in ms]), "higher", ".0%"),
    )
}


def _of(cls, metrics: Sequence[CaptionMetrics]):
    """The summary of one mask's captions: every metric of the registry."""
    if not metrics:
        raise InputError("no captions to summarize")
    return cls(n_images=len(metrics), **{name: metric.of(metrics) for name, metric in METRICS.items()})


def _from_dict(cls, d: Mapping):
    """A summary as any release wrote it: a metric added since reads as missing (NaN), not as damage."""
    return cls(**{f.name: d["n_images"] if f.name == "n_images" else d.get(f.name, math.nan) for f in fields(cls)})


MetricSummary = make_dataclass(
    "MetricSummary",
    [("n_images", int), *((name, float) for name in METRICS)],
    frozen=True,
    namespace={"of": classmethod(_of), "from_dict": classmethod(_from_dict), "__module__": __name__},
)
MetricSummary.__doc__ = "Aggregate over the images of one evaluated mask: n_images and one field per entry of METRICS."
