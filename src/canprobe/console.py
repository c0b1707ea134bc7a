"""What the commands print: each result as plain-text lines (``canprobe.cli`` echoes them; scripts may too)."""

from __future__ import annotations

from pathlib import Path

from canprobe.checks import printable
from canprobe.metrics import METRICS, MetricSummary
from canprobe.runfolder import CAPTIONS_FILE


def fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def versions() -> list[str]:
    """canprobe, torch and transformers versions, and the devices torch sees."""
    import torch
    import transformers

    from canprobe import __version__

    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return [
        f"canprobe {__version__}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
        f"devices: {', '.join(devices)}",
    ]


def skipped(image_set) -> list[str]:
    """The files of an image set that were left out, and captions that name no image (warnings)."""
    lines = []
    if image_set.skipped:
        lines.append(f"skipped {len(image_set.skipped)} unreadable image(s) or nested folder(s):")
        lines += [f"  {printable(path)}: {why}" for path, why in image_set.skipped]
    if image_set.unmatched_captions:
        names = image_set.unmatched_captions
        lines.append(
            f"ignored {len(names)} caption(s) of {CAPTIONS_FILE} naming no image file of the set, e.g. {names[0]}"
        )
    return lines


def captions(records, out: Path) -> list[str]:
    from canprobe.captions import exact_match_rate

    rate = exact_match_rate(records)
    tail = f"; exact match with reference captions {rate:.1%}" if rate is not None else ""
    return [f"{r.image}: {r.caption}" for r in records[:5]] + [f"wrote {len(records)} captions to {out}{tail}"]


def scores(result, top: int, out: Path) -> list[str]:
    """The top of a ranking and what was scored."""
    ranking, c = result.ranking(), result.config
    lines = [f"{row.rank:6d}  {row.score:12.6g}  {row.address}" for row in ranking.head(top).itertuples()]
    lines.append(
        f"scored {len(ranking):,} neurons in {len(result.sites)} sites over {c['n_samples']} images "
        f"({c['method']}, reduction {c['reduction']}, {c['loss_text']} captions, {c['processes']} process(es)); "
        f"wrote {out}"
    )
    return lines


def nan_scores(result) -> list[str]:
    """A warning when scores are NaN: kept on disk as computed; search, ablate and run refuse to use them."""
    nan = int(result.ranking()["score"].isna().sum())
    if not nan:
        return []
    return [
        f"warning: {nan} neuron(s) have NaN scores (an overflow, or NaN from the model): search, ablate and "
        "run refuse this ranking; try --dtype float32"
    ]


def search(result, out: Path) -> list[str]:
    """The baseline, the criterion, every point of the curve, and k*."""
    s, base = result.summary, result.baseline
    lines = [
        f"unmasked: median PPL {fmt(base.ppl_median)}, mean CLIP {fmt(base.clip_mean)} over {base.n_images} images",
        f"criterion: {s['criterion']['text']}",
    ]
    widths = {name: max(len(metric.label), 7) for name, metric in METRICS.items()}
    labels = " ".join(f"{metric.label:>{widths[name]}}" for name, metric in METRICS.items())
    lines.append(f"{'k':>7} {'control':>7} {'phase':>8} {'stage':>9} {labels}  sample caption")
    for control in ("top", "random"):
        for p in result.curve(control):
            values = " ".join(f"{m.format(getattr(p.metrics, n)):>{widths[n]}}" for n, m in METRICS.items())
            sample = p.captions[0]["caption"] if p.captions else ""
            lines.append(f"{p.k:7d} {p.control:>7} {p.phase:>8} {p.stage:>9} {values}  {sample[:40]}")
    ev = s["evaluations"]
    lines.append(
        f"evaluated {ev['this_run']} point(s) now, {ev['resumed']} resumed from {out}; "
        f"the search itself took {ev['search']} (baseline, growth, bisection)"
    )
    lines.append(f"stage 1 (degraded) from k = {s['stage1_k']}")
    if result.k_star is None:
        lines.append(f"k* = none: no collapse up to k = {s['max_k']} of {s['scope']}")
    else:
        lines.append(f"k* = {result.k_star} ({s['scope']}, {s['scope_size']} neurons in scope)")
        if not s["monotone"]:
            lines.append("note: collapse is not monotone in k here; see every point in curve.jsonl")
    if s["random"] is not None and s["random"]["at_k_star"] is not None:
        r = s["random"]["at_k_star"]
        lines.append(
            f"random control at k* = {result.k_star}: {r['stage']} "
            f"(median PPL {fmt(r['ppl_median'])}, mean CLIP {fmt(r['clip_mean'])})"
        )
    return lines


def ablation(result) -> list[str]:
    """Each image's captions and metrics unmasked and masked, then the summaries of both."""
    lines = []
    for name, u, m in zip(result.images, result.unmasked, result.masked):
        lines.append(name)
        lines.append(f"  unmasked  PPL {fmt(u.ppl):>8}  CLIP {u.clip:6.2f}  {u.caption}")
        lines.append(f"  masked    PPL {fmt(m.ppl):>8}  CLIP {m.clip:6.2f}  {m.caption}")
    for name, metrics in (("unmasked", result.unmasked), (f"masked ({result.label}, {result.fault})", result.masked)):
        s = MetricSummary.of(metrics)
        lines.append(f"{name}: " + ", ".join(f"{m.label} {m.format(getattr(s, n))}" for n, m in METRICS.items()))
    return lines


def study(summaries: list[dict]) -> list[str]:
    """One row per search of each study, then each robustness headline."""
    from canprobe.report import fault_headline

    lines = [
        f"{'model':18s} {'scope':22s} {'category':10s} {'k*':>6s} {'of':>7s} {'stage 1':>8s} {'random':>8s} "
        f"{'mean abl':>8s}"
    ]
    control = {None: "-", True: "collapse", False: "healthy"}
    for summary in summaries:
        for r in summary["results"]:
            k_star = "none" if r["k_star"] is None else str(r["k_star"])
            stage1 = "-" if r["stage1_k"] is None else str(r["stage1_k"])
            lines.append(
                f"{summary['model']:18s} {r['scope']:22s} {r['category']:10s} {k_star:>6s} {r['n_neurons']:>7d} "
                f"{stage1:>8s} {control[r['random_collapsed']]:>8s} {control[r['mean_ablation_collapsed']]:>8s}"
            )
        for entry in summary.get("robustness", []):
            lines.append(f"{summary['model']} {entry['scope']} ({entry['category']}): {fault_headline(entry)}")
    return lines


def neurons(view) -> list[str]:
    return [
        f"{s['neuron']}: rank {s['rank']}, mean {fmt(s['mean'])} +- {fmt(s['std'])}, largest {fmt(s['max'])} "
        f"({s['max_kind']}, position {s['max_position']}), among the {view.most_active} most active of its site "
        f"on {s['consistency']:.0%} of {len(view.images)} images"
        for s in view.stats
    ]
