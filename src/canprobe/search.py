"""The k* search: how few top-ranked neurons, masked together, collapse the model.

k = 0 is the unmasked baseline. k grows geometrically (1, 2, 4, ... by default) until the collapse
criterion holds or the scope is exhausted, then bisection between the last non-collapsed k and the
first collapsed one gives k*. A geometric grid of k adds the rest of the curve for plots, and an
optional random control evaluates random neurons of the same scope at every k of the top curve.

Collapse is not always monotone in k, so every evaluated point is kept: each one is appended to
``curve.jsonl`` the moment it finishes, and a rerun with the same output folder reads them back and
evaluates only what is missing, so a killed search resumes where it stopped and ends with the same
curve. ``summary.json`` (k*, stage 1, baseline, criterion, config, versions) is written atomically.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from canprobe import distributed, runfolder
from canprobe.ablation import RankedNeurons, fault_stats
from canprobe.config import SETTINGS, SearchConfig
from canprobe.errors import InputError
from canprobe.evaluation import MaskEvaluator
from canprobe.identity import images_fingerprint, texts_fingerprint
from canprobe.metrics import CaptionMetrics, MetricSummary
from canprobe.runfolder import (
    CURVE_FILE,
    SUMMARY_FILE,
    RunLock,
    append_jsonl,
    atomic_write_json,
    check_finite_scores,
    read_jsonl,
)
from canprobe.sites import SiteRegistry

log = logging.getLogger(__name__)

RANKING_IDENTITY = ("method", "alpha", "reduction", "loss_text", "weights", "images")  # recorded by scoring


@dataclass
class CurvePoint:
    """One evaluated (control, k): aggregate metrics, stage, sample captions, timing.

    ``captions`` holds ``{image, caption}`` for ``n_samples`` images spread over the set; at k = 0 it holds
    every image, because a resumed search restores the exact-match reference from it.
    """

    k: int
    control: str
    scope: str
    phase: str
    metrics: MetricSummary
    stage: str
    captions: list[dict]
    seconds: float

    def to_json(self) -> dict:
        return {
            "k": self.k,
            "control": self.control,
            "scope": self.scope,
            "phase": self.phase,
            **asdict(self.metrics),
            "stage": self.stage,
            "captions": self.captions,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, d: dict) -> CurvePoint:
        metrics = MetricSummary.from_dict(d)
        return cls(d["k"], d["control"], d["scope"], d["phase"], metrics, d["stage"], d["captions"], d["seconds"])


@dataclass
class SearchResult:
    """Where the model collapses, and every point that told us so."""

    k_star: int | None
    stage1_k: int | None
    baseline: MetricSummary
    points: list[CurvePoint]
    summary: dict
    evaluated: int
    resumed: int

    def curve(self, control: str = "top") -> list[CurvePoint]:
        return sorted((p for p in self.points if p.control == control), key=lambda p: p.k)

    def point(self, k: int, control: str = "top") -> CurvePoint | None:
        return next((p for p in self.points if p.k == k and p.control == control), None)


def ranked_in_scope(registry: SiteRegistry, ranking: pd.DataFrame | Sequence[str], scope: str) -> RankedNeurons:
    """The ranking's neurons that fall in ``scope``, most important first, checked against the model."""
    sites = {s.name for s in registry.select(scope)}
    where = "the ranking"
    if isinstance(ranking, pd.DataFrame):
        if "address" not in ranking.columns:
            raise InputError("the ranking has no 'address' column; write it with `canprobe score`")
        where = ranking.attrs.get("path", where)
        check_finite_scores(ranking, where)
        frame = ranking.sort_values("rank", kind="stable") if "rank" in ranking.columns else ranking
        addresses = frame["address"].astype(str).tolist()
    else:
        addresses = [str(a) for a in ranking]
    foreign = [a for a in addresses if a.rsplit(":", 1)[0] not in registry.by_name]
    if foreign:
        raise InputError(
            f"{where}: {len(foreign)} ranked neuron(s) are not in this model, e.g. {foreign[0]}; "
            "it was scored on another model: score this one"
        )
    kept = [a for a in addresses if a.rsplit(":", 1)[0] in sites]
    if not kept:
        raise InputError(f"{where} holds no neuron of scope {scope}; score that scope with --scope {scope}")
    if len(kept) < len(addresses):
        log.info("ranking: %d of %d neurons are in scope %s", len(kept), len(addresses), scope)
    try:
        return RankedNeurons.from_addresses(registry, kept)
    except InputError as exc:
        raise InputError(f"{where}: {exc}; it was scored on another model: score this one") from None


def growth_ks(max_k: int, growth: float) -> list[int]:
    """1, growth, growth^2, ... (rounded, strictly increasing), ending with max_k."""
    ks, k = [], 1.0
    while round(k) < max_k:
        if not ks or round(k) > ks[-1]:
            ks.append(round(k))
        k *= growth
    return ks + [max_k]


def grid_ks(grid_max: int, per_octave: int) -> list[int]:
    """A geometric grid from 1 to grid_max with ``per_octave`` points per doubling."""
    if per_octave == 0:
        return []
    n = math.ceil(math.log2(grid_max) * per_octave) if grid_max > 1 else 0
    return sorted({min(grid_max, round(2 ** (j / per_octave))) for j in range(n + 1)} | {grid_max})


class CollapseSearch:
    """Progressive masking of a ranking's top neurons over one image set; resumable through ``out_dir``."""

    def __init__(
        self,
        evaluator: MaskEvaluator,
        ranking: RankedNeurons,
        scope_neurons: RankedNeurons,
        config: SearchConfig,
        image_names: Sequence[str],
        out_dir: str | Path | None = None,
        model_name: str = "",
        ranking_info: dict | None = None,
        identity: dict | None = None,
    ):
        if len(image_names) != evaluator.n_images:
            raise InputError(f"{len(image_names)} image names for {evaluator.n_images} images")
        evaluator.reserve(scope_neurons.site_names)  # every mask of the search and its control lies in the scope
        self.evaluator, self.config = evaluator, config
        self.top = ranking
        self.max_k = len(ranking) if config.search.max_k is None else config.search.max_k
        if self.max_k > len(ranking):
            raise InputError(f"max k {self.max_k} is larger than the {len(ranking)} ranked neurons in {config.scope}")
        gen = torch.Generator().manual_seed(config.seed)
        self.random = scope_neurons.subset(torch.randperm(len(scope_neurons), generator=gen))
        self.image_names = list(image_names)
        self.out = Path(out_dir) if out_dir is not None else None
        self.world = distributed.world()
        self.writes = self.out is not None and self.world.main  # under torch.distributed, rank 0 writes
        self.model_name = model_name
        self.identity = identity or {}
        self.ranking_info = {**(ranking_info or {}), "fingerprint": texts_fingerprint(ranking.addresses)}
        self.points: dict[tuple[str, int], CurvePoint] = {}
        self.evaluated = 0
        self.resumed = 0
        self.baseline: MetricSummary | None = None

    # -- persistence -------------------------------------------------------------------------
    def _run_identity(self) -> dict:
        """What decides the folder's points (``canprobe.identity``): the model's name is not, its weights are."""
        return {
            **self.identity,
            "config": self.config.to_dict(),
            "ranking": self.ranking_info,
            "images": texts_fingerprint(self.image_names),
            "n_images": len(self.image_names),
        }

    def _stored(self) -> tuple[str | None, list[dict]]:
        """(why the folder cannot be resumed, or None; the points it holds), read by the writing process."""
        try:
            runfolder.claim(self.out, self._run_identity(), results=(CURVE_FILE,), settings=SETTINGS)
        except InputError as exc:
            return str(exc), []
        return None, read_jsonl(self.out / CURVE_FILE, repair=True)

    def _resume(self) -> None:
        if self.out is None:
            return
        error, stored = distributed.broadcast(self._stored() if self.writes else None)
        if error:
            raise InputError(error)
        for n, record in enumerate(stored, 1):
            if isinstance(record, dict):
                runfolder.check_format(record.get(runfolder.FORMAT_KEY), f"{self.out / CURVE_FILE}:{n}")
            try:
                point = CurvePoint.from_json(record)
            except (KeyError, TypeError, AttributeError):
                where = self.out / CURVE_FILE
                raise InputError(f"{where}: point {n} is not a curve point (damaged); use a new --out folder") from None
            self.points[(point.control, point.k)] = point
        self.resumed = len(self.points)
        if self.resumed:
            log.info("resuming %s: %d points already evaluated", self.out, self.resumed)

    def _record(self, point: CurvePoint) -> None:
        self.points[(point.control, point.k)] = point
        self.evaluated += 1
        if self.writes:
            append_jsonl(self.out / CURVE_FILE, runfolder.stamped(point.to_json()))
        log.info(
            "k=%d %s (%s): PPL %.4g, CLIP %.3g -> %s",
            point.k,
            point.control,
            point.phase,
            point.metrics.ppl_median,
            point.metrics.clip_mean,
            point.stage,
        )

    # -- evaluation --------------------------------------------------------------------------
    def _samples(self, metrics: Sequence[CaptionMetrics], n: int) -> list[dict]:
        """The captions of ``n`` images spread evenly over the set (image sets list their categories in turn)."""
        m = min(n, len(metrics))
        picked = [round(i * (len(metrics) - 1) / max(m - 1, 1)) for i in range(m)]
        return [{"image": self.image_names[i], "caption": metrics[i].caption} for i in picked]

    def _baseline(self) -> MetricSummary:
        stored = self.points.get(("top", 0))
        if stored is not None:
            self.evaluator.set_baseline([c["caption"] for c in stored.captions])  # all images, in order
            return stored.metrics
        start = time.perf_counter()
        metrics = self.evaluator.evaluate_baseline()
        summary = MetricSummary.of(metrics)
        point = CurvePoint(
            0,
            "top",
            self.config.scope,
            "baseline",
            summary,
            "healthy",
            self._samples(metrics, len(metrics)),
            time.perf_counter() - start,
        )
        self._record(point)
        return summary

    def _neurons(self, control: str) -> RankedNeurons:
        return self.top if control == "top" else self.random

    def evaluate(self, ks: Sequence[int], control: str, phase: str) -> list[CurvePoint]:
        """Evaluate the k values not already known, in one batched pass; return all of them."""
        todo = [k for k in dict.fromkeys(ks) if (control, k) not in self.points]
        if todo:
            start = time.perf_counter()
            neurons = self._neurons(control)
            results = self.evaluator.evaluate([neurons.prefix(k) for k in todo])
            seconds = (time.perf_counter() - start) / len(todo)
            for k, metrics in zip(todo, results):
                summary = MetricSummary.of(metrics)
                stage = self.config.criterion.stage(summary, self.baseline)
                samples = self._samples(metrics, self.config.search.n_samples)
                self._record(CurvePoint(k, control, self.config.scope, phase, summary, stage, samples, seconds))
        return [self.points[(control, k)] for k in ks]

    def _independent(self, ks: Sequence[int], control: str, phase: str) -> None:
        """Points that do not depend on each other: batch as many as fill a generate batch."""
        per_round = max(self.config.search.k_per_round, self.config.generation.batch_size // len(self.image_names))
        todo = [k for k in ks if (control, k) not in self.points]
        for i in range(0, len(todo), per_round):
            self.evaluate(todo[i : i + per_round], control, phase)

    def _grow(self) -> tuple[int, int | None]:
        """Last non-collapsed k and first collapsed k of the geometric growth (None: no collapse)."""
        ks = growth_ks(self.max_k, self.config.search.growth)
        lo = 0
        for i in range(0, len(ks), self.config.search.k_per_round):
            for point in self.evaluate(ks[i : i + self.config.search.k_per_round], "top", "grow"):
                if point.stage == "collapsed":
                    return lo, point.k
                lo = point.k
        return lo, None

    def _bisect(self, lo: int, hi: int) -> tuple[int, int]:
        """Narrow (lo non-collapsed, hi collapsed) until adjacent; m points per round split it m+1 ways."""
        m = self.config.search.k_per_round
        while hi - lo > 1:
            width = hi - lo
            ks = sorted({lo + max(1, min(width - 1, round(width * j / (m + 1)))) for j in range(1, m + 1)})
            for point in self.evaluate(ks, "top", "bisect"):
                if point.stage == "collapsed":
                    hi = point.k
                    break
                lo = point.k
        return lo, hi

    def run(self) -> SearchResult:
        """Resume from and append to ``out_dir``, which this process holds (RunLock) until the search ends."""
        with RunLock(self.out) if self.writes else nullcontext():
            return self._run()

    def _run(self) -> SearchResult:
        start = time.perf_counter()
        self._resume()
        self.baseline = self._baseline()
        lo, hi = self._grow()
        k_star = None
        if hi is not None:
            lo, hi = self._bisect(lo, hi)
            k_star = hi
        grid_max = min(self.config.search.grid_max or self.max_k, self.max_k)
        self._independent(grid_ks(grid_max, self.config.search.grid_per_octave), "top", "grid")
        if self.config.control == "random":
            if self.config.control_at == "curve":
                ks = sorted(k for c, k in self.points if c == "top" and k > 0)
            else:
                ks = sorted({k for k in (k_star, self._stage1()) if k})
            self._independent(ks, "random", "control")
        points = list(self.points.values())
        summary = self._summary(k_star, (lo, hi), time.perf_counter() - start)
        if self.writes:
            atomic_write_json(self.out / SUMMARY_FILE, runfolder.stamped(summary))
        return SearchResult(k_star, summary["stage1_k"], self.baseline, points, summary, self.evaluated, self.resumed)

    def _top_curve(self) -> list[CurvePoint]:
        return sorted((p for p in self.points.values() if p.control == "top"), key=lambda p: p.k)

    def _stage1(self) -> int | None:
        """Smallest evaluated k that left the unmasked band (degraded or collapsed)."""
        return next((p.k for p in self._top_curve() if p.stage != "healthy"), None)

    def _summary(self, k_star: int | None, bracket: tuple[int, int | None], seconds: float) -> dict:
        top = self._top_curve()
        stage1 = self._stage1()
        collapsed = [p.k for p in top if p.stage == "collapsed"]
        monotone = k_star is None or all((p.stage == "collapsed") == (p.k >= k_star) for p in top)
        random_pts = sorted((p for p in self.points.values() if p.control == "random"), key=lambda p: p.k)
        at_k_star = self.points.get(("random", k_star)) if k_star is not None else None
        quality = self.config.criterion.quality(self.baseline.clip_mean)  # what stands beside PPL
        return {
            "k_star": k_star,
            "stage1_k": stage1,
            "scope": self.config.scope,
            "max_k": self.max_k,
            "scope_size": len(self.random),
            "bracket": list(bracket),
            "first_collapsed_evaluated": collapsed[0] if collapsed else None,
            "monotone": monotone,
            "baseline": asdict(self.baseline),
            "criterion": {
                **asdict(self.config.criterion),
                "quality": quality,
                "text": self.config.criterion.describe(quality),
            },
            "evaluations": {
                "total": len(self.points),
                "this_run": self.evaluated,
                "resumed": self.resumed,
                "search": sum(p.phase in ("baseline", "grow", "bisect") for p in top),
            },
            "random": None
            if self.config.control != "random"
            else {
                "seed": self.config.seed,
                "at_k_star": None if at_k_star is None else at_k_star.to_json(),
                "first_collapsed": next((p.k for p in random_pts if p.stage == "collapsed"), None),
            },
            "model": self.model_name,
            "dtype": self.identity.get("dtype"),
            "ranking": self.ranking_info,
            "n_images": len(self.image_names),
            "config": self.config.to_dict(),
            "seed": self.config.seed,
            "versions": runfolder.versions(),
            "seconds": seconds,
        }


def find_k_star(
    lm,
    inputs: Sequence[Image.Image | str],
    ranking: pd.DataFrame | Sequence[str],
    clip,
    config: SearchConfig = SearchConfig(),
    out_dir: str | Path | None = None,
    image_names: Sequence[str] | None = None,
    *,
    ppl_lm=None,
    stats: dict | None = None,
) -> SearchResult:
    """Run (or resume, when ``out_dir`` holds a previous run with the same settings) a k* search.

    ``lm``: the LoadedModel to probe; ``inputs``: its images, or the texts a text-only model
    continues under each mask; ``clip``: a CLIP LoadedModel (None for a text-only model);
    ``ranking``: a ranking DataFrame (``canprobe score``) or addresses, most important first;
    ``config``: every setting of the search, its generation (``reuse_features`` included) and its
    evaluation (``config.evaluation.fault``: the fault, a ``canprobe.faults`` spec); ``ppl_lm``:
    the separate PPL model ``config.evaluation.ppl_scorer`` names, when already loaded; ``stats``
    (``fault_stats``) for faults that need clean statistics, computed on ``inputs`` when not given.
    Under ``torch.distributed`` pass all inputs to every process; rank 0 writes ``out_dir``.
    """
    if clip is not None and config.evaluation.clip_model not in (None, clip.source):
        raise InputError(
            f"the search config names CLIP {config.evaluation.clip_model} but the CLIP given is {clip.source}"
        )
    # the summary records the CLIP that scored the captions (none for a text-only model)
    clip_model = None if clip is None else clip.source
    config = replace(config, evaluation=replace(config.evaluation, clip_model=clip_model))
    registry = SiteRegistry.of(lm.model)
    top = ranked_in_scope(registry, ranking, config.scope)
    everything = RankedNeurons.from_sites(registry.select(config.scope))
    if stats is None:
        stats = fault_stats(lm, inputs, config.scope, [config.evaluation.fault], config.generation)
    evaluator = MaskEvaluator(lm, inputs, clip, config.generation, config.evaluation, ppl_lm=ppl_lm, stats=stats)
    names = list(image_names) if image_names is not None else [str(i) for i in range(len(inputs))]
    scored = ranking.attrs.get("config", {}) if isinstance(ranking, pd.DataFrame) else {}
    info = {k: scored.get(k) for k in RANKING_IDENTITY}
    identity = {
        "weights": lm.fingerprint,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "clip_weights": None if clip is None else clip.fingerprint,  # None: a text-only model
        "ppl_weights": None if ppl_lm is None else ppl_lm.fingerprint,
        # a text-only model continues texts: their fingerprint stands for the pixels
        "pixels": images_fingerprint(inputs) if lm.family.takes_images else texts_fingerprint(inputs),
    }
    search = CollapseSearch(
        evaluator, top, everything, config, names, out_dir, getattr(lm, "source", ""), info, identity
    )
    return search.run()
