"""Collapse metrics: what is measured of one caption, and how the captions under one mask are summarized.

Per caption: perplexity (exp of the mean token NLL of caption + end token) under a scoring model,
CLIP score ``100 * max(cos(image, caption), 0)``, length in words, distinct-word ratio, and exact
match with the unmasked model's caption. Per evaluated mask: median PPL with the count of
non-finite values, and means of the rest. Infinite or NaN perplexities are recorded as data and
never raise. The passes that compute PPL and CLIP under masks live in ``canprobe.evaluation``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

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
class MetricSummary:
    """Aggregate over the images of one evaluated mask; non-finite PPLs are counted, not averaged."""

    n_images: int
    ppl_median: float
    ppl_nonfinite: int
    clip_mean: float
    length_mean: float
    distinct_mean: float
    exact_match: float

    @classmethod
    def of(cls, metrics: Sequence[CaptionMetrics]) -> MetricSummary:
        """Median PPL over the non-NaN values (inf is an honest order statistic), means of the rest."""
        if not metrics:
            raise InputError("no captions to summarize")
        ppl = torch.tensor([m.ppl for m in metrics], dtype=torch.float64)
        ppl_ok = ppl[~ppl.isnan()]
        n = len(metrics)
        return cls(
            n_images=n,
            ppl_median=_median(ppl_ok),
            ppl_nonfinite=int((~ppl.isfinite()).sum()),
            clip_mean=_nanmean([m.clip for m in metrics]),
            length_mean=sum(m.length for m in metrics) / n,
            distinct_mean=sum(m.distinct for m in metrics) / n,
            exact_match=sum(m.exact_match for m in metrics) / n,
        )

    @classmethod
    def from_dict(cls, d: Mapping) -> MetricSummary:
        """A summary as any release wrote it: a metric added since reads as missing (NaN), not as damage."""
        return cls(**{f.name: d["n_images"] if f.name == "n_images" else d.get(f.name, math.nan) for f in fields(cls)})


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
