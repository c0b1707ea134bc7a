"""The HTML report of a run folder: figures and tables drawn only from the run's artifacts.

Everything shown is read back from ``summary.json``, each search's ``curve.jsonl`` and each
``ranking.parquet``, so the page can be rebuilt at any time and never disagrees with the files.
Figures are static matplotlib PNGs embedded as base64: one self-contained file, readable offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from canprobe.config import CollapseCriterion  # noqa: E402
from canprobe.errors import InputError  # noqa: E402
from canprobe.metrics import METRICS  # noqa: E402
from canprobe.neurons import NeuronView, patch_map, position_profile, spread_images  # noqa: E402
from canprobe.runfolder import (  # noqa: E402
    ACTIVATIONS_FILE,
    CURVE_FILE,
    FORMAT_KEY,
    LOCK_FILE,
    RANKING_FILE,
    REPORT_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    atomic_write_text,
    check_format,
    read_json,
    read_jsonl,
)

CURVE_COLUMNS = ["control", "k", "phase", *METRICS, "stage"]
RENAMED = {"identical_captions": "exact_match"}  # metric names of earlier formats
POINT_KEYS = ("control", "k", "phase", "stage")  # what every curve point of every format holds; metrics may be missing
SECTIONS = (
    "headline",
    "kstar",
    "examples",
    "curves",
    "locations",
    "neurons",
    "activations",
    "faults",
    "stability",
    "config",
)
OPTIONAL_SECTIONS = ("faults",)  # only in reports of runs that measured them
CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td.l,th.l{text-align:left}img.fig{max-width:100%}
.ex{display:inline-block;width:180px;vertical-align:top;margin:4px;font-size:12px}
.ex img{width:96px;image-rendering:pixelated}section{margin-bottom:2.5em}
.neuron{border-top:1px solid #ddd;padding-top:.4em}.answer{font-size:1.1em}nav li{margin:2px 0}
.maps{display:flex;align-items:flex-end;gap:8px;flex-wrap:wrap}.map{margin:0;font-size:11px;text-align:center}
.map img{width:128px;image-rendering:pixelated}.scale{font-size:11px;color:#555;margin:2px 0}
"""
MAP_IMAGES = 3  # images whose patch maps a neuron's block draws
PATCH_SIDE = 24  # patch maps are average-pooled to at most this many cells a side
KIND_COLORS = {
    "first token": "#d62728",
    "prompt": "#bbbbbb",
    "image": "#1f77b4",
    "caption": "#2ca02c",
    "class token": "#d62728",
    "patch": "#1f77b4",
    "image token": "#1f77b4",
    "query": "#9467bd",
}
COMPONENT_NAMES = {
    "language": "the language model",
    "vision": "the vision encoder",
    "projector": "the projector",
    "qformer": "the Q-Former",
}


class Markup(str):
    """A table cell that is already HTML (a link): written as it is."""


def _anchor(*parts) -> str:
    return "n-" + re.sub(r"[^A-Za-z0-9]+", "-", "-".join(map(str, parts))).strip("-")


def _link(anchor: str, text: str) -> Markup:
    return Markup(f'<a href="#{anchor}">{html.escape(text)}</a>')


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((96, 96))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except (OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(value, digits: int = 4) -> str:
    if isinstance(value, Markup):
        return value
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if not np.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{_fmt(v)}</td>' for i, v in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def load_curve(search_dir: Path) -> pd.DataFrame:
    """Every evaluated point of one search, as a table (empty when nothing was evaluated)."""
    path = search_dir / CURVE_FILE
    rows = read_jsonl(path)
    if any(not isinstance(r, dict) or any(c not in r for c in POINT_KEYS) for r in rows):
        raise InputError(f"{path} holds lines that are not curve points (damaged or foreign); rerun the study")
    for n, row in enumerate(rows, 1):
        check_format(row.get(FORMAT_KEY), f"{path}:{n}")
    frame = pd.DataFrame(rows)  # a metric that a point of an earlier format lacks reads as NaN
    return frame.reindex(columns=list(dict.fromkeys([*frame.columns, *CURVE_COLUMNS])))


def _headline_results(summary: dict) -> list[dict]:
    """The searches a figure shows: pooled ones when the run pooled categories, else all."""
    pooled = [r for r in summary["results"] if r["category"] == "pooled"]
    return pooled or summary["results"]


def _examples_section(run_dir: Path, summary: dict, shown: int = 4) -> str:
    """Captions unmasked, at stage 1 and at k*, on images from as many categories as the samples hold."""
    parts = []
    image_root = Path(summary["config"]["images"])
    for res in _headline_results(summary):
        curve = load_curve(run_dir / res["path"])
        if curve.empty:
            continue
        top = curve[curve["control"] == "top"]
        points = [("unmasked (k=0)", 0), ("stage 1 start", res.get("stage1_k")), ("k*", res.get("k_star"))]
        columns = []  # (label, image -> caption)
        for label, k in points:
            row = top[top["k"] == k] if k is not None else top.iloc[0:0]
            if not row.empty:
                columns.append((f"{label}, k={k}", {c["image"]: c["caption"] for c in row.iloc[0]["captions"]}))
        if not columns:
            continue
        names = [n for n in columns[-1][1] if all(n in c for _, c in columns)]
        names = [names[i] for i in spread_images([str(Path(n).parent) for n in names], shown)]
        cells = []
        for name in names:
            thumb = _thumb(image_root / name)
            img = f'<img src="{thumb}" alt="{html.escape(name)}">' if thumb else ""
            caps = "".join(
                f"<div><b>{html.escape(label)}</b>: {html.escape(col[name])}</div>" for label, col in columns
            )
            cells.append(f'<div class="ex">{img}<div>{html.escape(name)}</div>{caps}</div>')
        title = f"{summary['model']}: {res['scope']} ({res['category']})"
        parts.append(f"<h3>{html.escape(title)}</h3>" + "".join(cells))
    return "".join(parts)


def _curves_section(run_dir: Path, summary: dict) -> str:
    figs = []
    for res in _headline_results(summary):
        curve = load_curve(run_dir / res["path"])
        if curve.empty:
            continue
        base = curve[curve["k"] == 0].iloc[0]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        quality = CollapseCriterion.quality(float(base["clip_mean"]))  # a text-only model: distinct words
        for ax, metric in ((axes[0], "ppl_median"), (axes[1], quality)):
            label = METRICS[metric].label
            for control, style in (("top", "o-"), ("random", "s--")):
                pts = curve[(curve["control"] == control) & (curve["k"] > 0)].sort_values("k")
                if not pts.empty:
                    values = pts[metric].astype(float).replace([np.inf, -np.inf], np.nan)
                    ax.plot(pts["k"], values, style, label=f"{control} neurons", ms=4)
            ax.axhline(float(base[metric]), color="gray", lw=0.8, label="unmasked")
            ax.set_xscale("log")
            ax.set_yscale(METRICS[metric].axis or "linear")
            if res.get("stage1_k"):
                end = res.get("k_star") or curve["k"].max()
                ax.axvspan(res["stage1_k"], end, color="orange", alpha=0.15, label="stage 1")
            if res.get("k_star"):
                ax.axvspan(res["k_star"], curve["k"].max() * 1.5, color="red", alpha=0.12, label="stage 2 (collapse)")
            ax.set_xlabel("k (masked neurons)")
            ax.set_ylabel(label)
            ax.set_title(f"{summary['model']} {res['scope']}: {label}", fontsize=9)
        axes[1].legend(fontsize=7)
        figs.append(f'<img class="fig" src="{_png(fig)}" alt="curves {html.escape(res["scope"])}">')
        rows = curve.sort_values(["control", "k"])[CURVE_COLUMNS].values.tolist()
        figs.append(f"<details><summary>evaluated points</summary>{_table(CURVE_COLUMNS, rows, left=1)}</details>")
    return "".join(figs)


def _locations_section(run_dir: Path, summary: dict, run: int, view: NeuronView | None, top_n: int = 50) -> str:
    frames = []
    for res in _headline_results(summary):
        ranking = pd.read_parquet(run_dir / res["path"] / RANKING_FILE)
        n = int(res.get("k_star") or top_n)
        frames.append(ranking.head(max(n, 1)).assign(scope=res["scope"]))
    if not frames:
        return ""
    top = pd.concat(frames)
    top["row"] = top["site"].str.replace(r"\.layers\.\d+", "", regex=True)  # e.g. language.mlp.down_proj
    table = top.groupby(["row", "layer"]).size().unstack(fill_value=0)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * table.shape[1], 0.8 + 0.45 * table.shape[0]))
    im = ax.imshow(table.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns)
    ax.set_yticks(range(table.shape[0]), table.index)
    ax.set_xlabel("layer")
    for (i, j), v in np.ndenumerate(table.values):
        ax.text(j, i, str(v), ha="center", va="center", color="w" if v < table.values.max() / 2 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="critical neurons")
    ax.set_title(f"{summary['model']}: where the critical neurons (top k* of each scope) live", fontsize=9)
    return f'<img class="fig" src="{_png(fig)}" alt="layer map">' + _layer_table(run, view)


def _layer_table(run: int, view: NeuronView | None) -> str:
    """The neurons the view shows, by scope and layer, each linked to its block."""
    if view is None:
        return ""
    rows = [
        [s["scope"], s["layer"], _link(_anchor(run, s["neuron"]), s["neuron"]), s["rank"], s["score"], s["consistency"]]
        for s in sorted(view.stats, key=lambda s: (s["scope"], s["layer"], s["rank"]))
    ]
    header = ["scope", "layer", "neuron", "rank", "score", "consistency"]
    return "<h4>the critical neurons shown below, by layer</h4>" + _table(header, rows, left=3)


def _kstar_rows(summary: dict, run: int = 0, view: NeuronView | None = None) -> list[list]:
    shown = _shown_results(summary, view)
    return [
        [
            summary["model"],
            r["scope"],
            r["category"],
            r.get("k_star"),
            r["n_neurons"],
            None if r.get("k_star") is None else r["k_star"] / r["n_neurons"],
            r.get("stage1_k"),
            r.get("random_collapsed"),
            r.get("activation_collapsed"),
            r.get("mean_ablation_collapsed"),
            _link(_anchor(run, r["scope"]), f"{view.scopes[r['scope']]['shown']} neurons")
            if r is shown.get(r["scope"])
            else "-",
        ]
        for r in summary["results"]
    ]


def _shown_results(summary: dict, view: NeuronView | None) -> dict[str, dict]:
    """Per scope, the result whose neurons the run's view shows (none when it shows none of the scope)."""
    from canprobe.neurons import headline_results

    if view is None:
        return {}
    return {
        r["scope"]: r
        for r in headline_results(summary["results"])
        if view.scopes.get(r["scope"], {}).get("shown") and r.get("k_star") == view.scopes[r["scope"]]["k_star"]
    }


KSTAR_HEADER = [
    "model",
    "scope",
    "category",
    "k*",
    "scope size",
    "fraction of scope",
    "stage 1 starts at k",
    "random k* neurons collapse",
    "activation-only top k* collapse",
    "mean ablation of top k* collapses",
    "where they fire",
]


def control_word(value: bool | None) -> str:
    """A control's outcome at k*, in words."""
    return {None: "not run", True: "collapsed", False: "healthy"}[value]


def fewest_neurons(results: list[dict]) -> dict | None:
    """The collapsed result with the fewest neurons as a share of its scope (None: nothing collapsed)."""
    collapsed = [r for r in results if r.get("k_star") is not None]
    return min(collapsed, key=lambda r: r["k_star"] / r["n_neurons"]) if collapsed else None


def _headline_section(runs: list[tuple[Path, dict]]) -> str:
    """k* per model and scope as a share of the scope, stage 1, the controls at k*, and where it breaks."""
    by_model: dict[str, list[dict]] = {}
    for _, summary in runs:
        by_model.setdefault(summary["model"], []).extend(_headline_results(summary))
    rows, answers = [], []
    for model, results in by_model.items():
        for r in results:
            k = r.get("k_star")
            rows.append(
                [
                    model,
                    r["scope"],
                    f"none of {r['n_neurons']}" if k is None else f"{k} of {r['n_neurons']} ({k / r['n_neurons']:.2%})",
                    r.get("stage1_k"),
                    *(
                        "-" if k is None else control_word(r.get(key))
                        for key in ("random_collapsed", "activation_collapsed", "mean_ablation_collapsed")
                    ),
                ]
            )
        fewest = fewest_neurons(results)
        if fewest is None:
            answer = "no scope collapses within its neurons"
        else:
            component = fewest["scope"].split(".")[0]
            answer = (
                f"{COMPONENT_NAMES.get(component, component)}: {fewest['scope']} collapses with the fewest neurons "
                f"as a share of its scope ({fewest['k_star']} of {fewest['n_neurons']}, "
                f"{fewest['k_star'] / fewest['n_neurons']:.2%})"
            )
        answers.append(f'<p class="answer"><b>{html.escape(model)}</b> breaks in {html.escape(answer)}.</p>')
    header = [
        "model",
        "scope",
        "k* (share of scope)",
        "stage 1 from k",
        "random k*",
        "activation-only",
        "mean ablation",
    ]
    note = (
        "<p>k*: the fewest top-ranked neurons whose masking collapses the captions; the controls mask as many "
        "random neurons, the activation-only ranking's top k*, and the top k* set to its mean.</p>"
    )
    return "".join(answers) + _table(header, rows, left=2) + note


RANKING_LABELS = {"can": "CAN", "activation": "activation-only", "random": "random"}


def _kstar_cell(row: dict | None):
    if row is None:
        return None
    return row["k_star"] if row["k_star"] is not None else f"none (> {row['scope_size']})"


def fault_headline(entry: dict) -> str:
    """One sentence per question: the fault that needs the fewest CAN neurons, and what protection buys."""
    found = [r for r in entry["faults"] if r["ranking"] == "can" and r["k_star"] is not None]
    parts = []
    if found:
        best = min(found, key=lambda r: r["k_star"])
        parts.append(f"fewest neurons: {best['fault']} collapses the model at k* = {best['k_star']} (CAN ranking)")
    elif entry["faults"]:
        parts.append("no fault collapses the model within the scope with the CAN ranking")
    protection = entry.get("protection")
    if protection:
        rates = pd.DataFrame(protection["rates"])
        worst = rates[rates["count"] == rates["count"].max()].set_index("protection")["collapse_rate"]
        n = int(rates["count"].max())
        text = ", ".join(f"{name} {rate:.0%}" for name, rate in worst.items())
        parts.append(
            f"under {n} random {protection['fault']} faults the collapse rate is {text} "
            f"(protected set: top {protection['k_protect']} CAN neurons)"
        )
    return "; ".join(parts)


def _faults_section(summary: dict) -> str:
    parts = []
    for entry in summary.get("robustness", []):
        title = f"{summary['model']}: {entry['scope']} ({entry['category']})"
        parts.append(f"<h3>{html.escape(title)}</h3><p>{html.escape(fault_headline(entry))}</p>")
        faults = list(dict.fromkeys(r["fault"] for r in entry["faults"]))
        if faults:
            by = {(r["fault"], r["ranking"]): r for r in entry["faults"]}
            rows = [[f, *(_kstar_cell(by.get((f, r))) for r in RANKING_LABELS)] for f in faults]
            header = ["fault", *(f"k* {label}" for label in RANKING_LABELS.values())]
            parts.append("<h4>k* per fault model and ranking</h4>" + _table(header, rows))
            parts.append(_fault_kstar_figure(entry, faults))
        protection = entry.get("protection")
        if protection:
            rates = pd.DataFrame(protection["rates"])
            table = rates.pivot(index="count", columns="protection", values="collapse_rate")
            names = list(dict.fromkeys(rates["protection"]))
            parts.append(
                f"<h4>collapse rate under random {html.escape(protection['fault'])} faults "
                f"({int(rates['trials'].iloc[0])} draws per count; protected set: top {protection['k_protect']} "
                f"CAN neurons, {html.escape(protection.get('k_protect_from', ''))})</h4>"
                + _table(["faulted neurons", *names], [[int(n), *table.loc[n, names].tolist()] for n in table.index])
            )
            # canprobe 0.1 wrote exact_match as identical_captions, and only three metrics
            cost = {k: {RENAMED.get(n, n): x for n, x in v.items()} for k, v in protection["clean_cost"].items()}
            shown = [n for n in METRICS if any(n in v for v in cost.values())]
            parts.append(
                "<h4>cost of each protection on clean captions</h4>"
                + _table(
                    ["protection", *(METRICS[n].label for n in shown), "time vs none"],
                    [[k, *(v.get(n, float("nan")) for n in shown), v["time_ratio"]] for k, v in cost.items()],
                )
            )
            fig, ax = plt.subplots(figsize=(5, 3.2))
            # equal rates overlap: each curve its own line style and a smaller marker than the one before
            for i, name in enumerate(names):
                style = ("o-", "s--", "^:", "d-.")[i % 4]
                ax.plot(table.index, table[name], style, label=name, markersize=10 - 2 * (i % 4), alpha=0.8)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("randomly faulted neurons")
            ax.set_ylabel("collapse rate")
            ax.legend(fontsize=8)
            ax.set_title(f"{summary['model']}: random {protection['fault']} faults", fontsize=9)
            parts.append(f'<img class="fig" src="{_png(fig)}" alt="protection curves">')
    return "".join(parts)


def _fault_kstar_figure(entry: dict, faults: list[str]) -> str:
    by = {(r["fault"], r["ranking"]): r for r in entry["faults"]}
    size = entry["faults"][0]["scope_size"]
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(faults), 3.2))
    width = 0.8 / len(RANKING_LABELS)
    for j, (key, label) in enumerate(RANKING_LABELS.items()):
        values = [by[(f, key)]["k_star"] if (f, key) in by else None for f in faults]
        heights = [v if v is not None else size for v in values]
        bars = ax.bar(np.arange(len(faults)) + j * width, heights, width, label=label)
        for bar, v in zip(bars, values):
            if v is None:
                bar.set_hatch("//")
                bar.set_alpha(0.4)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)  # k* = 1 is a visible bar
    ax.axhline(size, color="gray", lw=0.8, ls=":")
    ax.set_xticks(np.arange(len(faults)) + width, faults, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("k* (hatched: no collapse in scope)")
    ax.legend(fontsize=8)
    return f'<img class="fig" src="{_png(fig)}" alt="k* per fault">'


def _stability_section(summary: dict) -> str:
    parts = [f"<h3>{html.escape(summary['model'])}</h3>"]
    for scope, overlap in summary.get("overlap", {}).items():
        cats = overlap["categories"]
        matrix = np.array(overlap["jaccard"], dtype=float)
        fig, ax = plt.subplots(figsize=(1.5 + 0.55 * len(cats), 1.2 + 0.5 * len(cats)))
        im = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(len(cats)), cats, rotation=45, ha="right")
        ax.set_yticks(range(len(cats)), cats)
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
        fig.colorbar(im, ax=ax, label="Jaccard")
        ax.set_title(f"{scope}: overlap of top-{overlap['k']} sets across categories")
        parts.append(f'<img class="fig" src="{_png(fig)}" alt="overlap {html.escape(scope)}">')
    halves = summary.get("split_half", {})
    if halves:
        rows = [[scope, h["k"], h["jaccard"], h["spearman"]] for scope, h in halves.items()]
        parts.append(
            "<h3>split-half stability</h3>" + _table(["scope", "top k", "Jaccard", "Spearman of scores"], rows)
        )
    return "".join(parts)


def _config_section(summary: dict) -> str:
    """Config, versions, seed and timings of one run."""
    config_rows = [[k, json.dumps(v)] for k, v in summary["config"].items()]
    version_rows = [[k, v] for k, v in summary.get("versions", {}).items()]
    timing_rows = [[k, v] for k, v in summary.get("timings", {}).items()]
    return (
        "<h3>config</h3>"
        + _table(["field", "value"], config_rows, left=2)
        + "<h3>versions</h3>"
        + _table(["package", "version"], version_rows, left=2)
        + f"<p>seed {summary['config'].get('seed')}</p>"
        + "<h3>timings (s)</h3>"
        + _table(["stage", "seconds"], timing_rows)
    )


def _neurons_section(model: str, run: int, view: NeuronView | None, image_root: Path) -> str:
    """Per scope, a block per neuron: its positions figure and patch maps, its statistics."""
    if view is None:
        return ""
    parts = []
    for scope, info in view.scopes.items():
        k = info["k_star"]
        outcome = f"k* = {k}" if k is not None else f"no collapse within its {info['size']} neurons"
        text = f"the top {info['shown']} of the ranking; {outcome}"
        parts.append(
            f'<h3 id="{_anchor(run, scope)}">{html.escape(f"{model}: {scope}")}</h3><p>{html.escape(text)}</p>'
        )
        for stats in (s for s in view.stats if s["scope"] == scope):
            rows = view.table[view.table["neuron"] == stats["neuron"]]
            parts.append(
                f'<div class="neuron" id="{_anchor(run, stats["neuron"])}"><h4>{html.escape(stats["neuron"])}</h4>'
                f"{_neuron_figure(rows, view.images, image_root)}{_neuron_stats(stats, view)}</div>"
            )
    intro = (
        f"<p>Each neuron's activation on {len(view.images)} images (prompt and the model's own caption): by position, "
        f"mean over the images with one standard deviation shaded; on the patches of {MAP_IMAGES} images (image tokens "
        f"mapped back to their patches, pooled to at most {PATCH_SIDE} cells a side). Consistency: the share of images "
        f"where it is among the {view.most_active} most active neurons of its site (mean |activation|). "
        "The numbers are in neurons.parquet (neuron, image, position, kind, value, patch cell).</p>"
    )
    return intro + "".join(parts)


def _neuron_figure(rows: pd.DataFrame, images: list[str], image_root: Path) -> str:
    """The positions figure (mean over the images, one standard deviation shaded, position kinds coloured)
    and the patch maps of the first MAP_IMAGES images whose rows cover patches, drawn over the images."""
    profile = position_profile(rows)
    fig, ax = plt.subplots(figsize=(5.2, 2.1))
    runs = (profile["kind"] != profile["kind"].shift()).cumsum()
    for _, span in profile.groupby(runs):
        kind = span["kind"].iloc[0]
        start, end = span["position"].iloc[0] - 0.5, span["position"].iloc[-1] + 0.5
        ax.axvspan(start, end, color=KIND_COLORS.get(kind, "#eeeeee"), alpha=0.18, lw=0, label=kind)
    mean, std = profile["mean"].to_numpy(), profile["std"].to_numpy()
    ax.fill_between(profile["position"], mean - std, mean + std, color="k", alpha=0.2, lw=0)
    ax.plot(profile["position"], mean, color="k", lw=0.9)
    ax.set_xlabel("position", fontsize=8)
    ax.set_ylabel("activation", fontsize=8)
    ax.tick_params(labelsize=7)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=6, framealpha=0.6)
    figure = f'<img class="fig" src="{_png(fig)}" alt="activation by position">'
    maps = [(name, patch_map(rows[rows["image"] == name], side=PATCH_SIDE)) for name in images]
    maps = [(name, grid) for name, grid in maps if grid is not None][:MAP_IMAGES]
    if not maps:
        return figure + "<p>its rows are no image patches (learned queries or text): no patch map</p>"
    vmax = max(float(np.nanmax(np.abs(grid))) for _, grid in maps) or 1.0
    cells = "".join(
        f'<figure class="map"><img src="{_patch_png(grid, vmax, image_root / name)}" alt="patches of '
        f'{html.escape(name)}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, grid in maps
    )
    scale = f'<p class="scale">patch maps: blue {-vmax:.3g} .. white 0 .. red {vmax:+.3g}</p>'
    return f'<div class="maps">{figure}{cells}</div>{scale}'


def _patch_png(grid: np.ndarray, vmax: float, background: Path, side: int = 128) -> str:
    """A patch map in a diverging colour scale over its image (cells no row covers: the image alone)."""
    colours = matplotlib.colormaps["coolwarm"]((np.nan_to_num(grid) / vmax + 1) / 2)
    colours[..., 3] = np.where(np.isnan(grid), 0.0, 0.6)
    try:
        with Image.open(background) as im:
            base = im.convert("RGBA")
    except (OSError, ValueError):
        base = Image.new("RGBA", (grid.shape[1], grid.shape[0]), "white")
    base.thumbnail((side, side))
    heat = Image.fromarray((colours * 255).astype(np.uint8), "RGBA").resize(base.size, Image.NEAREST)
    buf = io.BytesIO()
    Image.alpha_composite(base, heat).convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _neuron_stats(stats: dict, view: NeuronView) -> str:
    by_kind = ", ".join(f"{kind} {_fmt(value, 3)}" for kind, value in stats["by_kind"].items())
    writes = ", ".join(f"{w['channel']} ({w['weight']:+.3g})" for w in stats["writes"]) or "-"
    consistent = round(stats["consistency"] * len(view.images))
    rows = [
        ["rank, score", f"{stats.get('rank', '-')}, {_fmt(stats.get('score'))}"],
        ["mean, spread (std)", f"{_fmt(stats['mean'])}, {_fmt(stats['std'])}"],
        [
            "largest |value|",
            f"{_fmt(stats['max'])} on {stats['max_image']}, position {stats['max_position']} ({stats['max_kind']})",
        ],
        ["mean by position kind", by_kind],
        [
            "consistency",
            f"{stats['consistency']:.0%}: among the {view.most_active} most active of its site on {consistent} of "
            f"{len(view.images)} images",
        ],
        ["writes most (down_proj weight)", writes],
    ]
    return _table(["statistic", "value"], rows, left=2)


def _activations_section(run_dir: Path, summary: dict, top_n: int = 12) -> str:
    """Per-layer peaks of the residual stream and the massive activations with their down_proj writers."""
    path = run_dir / ACTIVATIONS_FILE
    data = read_json(path)
    if data is None:
        return ""
    try:
        return _activations_tables(summary, data, top_n)
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path} is not a canprobe activations file (damaged); rerun the study") from None


def _activations_tables(summary: dict, data: dict, top_n: int) -> str:
    peaks = [
        [p["layer"], p["value"], p["median"], p["ratio"], p["position"], p["token"], p["dim"]] for p in data["layers"]
    ]
    parts = [
        f"<h3>{html.escape(summary['model'])}</h3><p>language model residual stream after each layer, "
        f"{data['n_images']} image(s); ratio = |h| / median |h| of the same sequence</p>",
        _table(["layer", "max |h|", "median", "ratio", "position", "token", "dim"], peaks, left=0),
    ]
    massive = data["massive"]
    threshold = f"{data['ratio_threshold']:g}x"
    if not massive:
        parts.append(f"<p>no massive activation: no |h| reaches {threshold} its sequence median</p>")
        return "".join(parts)
    rows = []
    for m in massive[:top_n]:
        layers = (
            str(m["first_layer"]) if m["first_layer"] == m["last_layer"] else f"{m['first_layer']}-{m['last_layer']}"
        )
        writers = ", ".join(f"{w['address']} ({w['share']:.0%})" for w in m["writers"]) or "-"
        rows.append([m["dim"], m["position"], m["token"], layers, m["value"], m["ratio"], m["images"], writers])
    header = ["dim", "position", "token", "layers", "value", "ratio", "images", "written by (share)"]
    parts.append(f"<p>{len(massive)} massive activation(s) (at least {threshold} the median), largest first</p>")
    parts.append(_table(header, rows, left=0))
    return "".join(parts)


RUN_KEYS = {"model": str, "config": dict, "results": list}
RESULT_KEYS = {"scope": str, "category": str, "path": str, "k_star": (int, type(None)), "n_neurons": int}


def _is_run_summary(summary) -> bool:
    if not isinstance(summary, dict) or any(not isinstance(summary.get(k), t) for k, t in RUN_KEYS.items()):
        return False
    if not isinstance(summary["config"].get("images"), str):
        return False
    return all(
        isinstance(r, dict) and all(isinstance(r.get(k), t) for k, t in RESULT_KEYS.items()) for r in summary["results"]
    )


def read_run(run_dir: Path | str) -> dict:
    """A run folder's summary.json, checked to be the summary of a whole study (``canprobe run``)."""
    path = Path(run_dir) / SUMMARY_FILE
    summary = read_json(path)
    if summary is None and any((Path(run_dir) / name).exists() for name in (RUN_FILE, LOCK_FILE)):
        raise InputError(
            f"{run_dir} holds a run that has not finished (no {SUMMARY_FILE} yet): wait for it, or rerun "
            "its `canprobe run` to resume it, then report"
        )
    if summary is None:
        raise InputError(f"{run_dir} is not a canprobe run folder (no {SUMMARY_FILE})")
    if isinstance(summary, dict):
        check_format(summary.get(FORMAT_KEY), path)
    if isinstance(summary, dict) and "k_star" in summary and "results" not in summary:
        raise InputError(
            f"{run_dir} is a search folder (canprobe search), not a run folder; report and compare read the "
            "folders of canprobe run"
        )
    if not _is_run_summary(summary):
        raise InputError(f"{path} is not the summary of a canprobe run (damaged or foreign); rerun the study")
    return summary


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def build_report(run_dirs: list[Path | str], out: Path | str | None = None) -> Path:
    """Write one report over one or more run folders (default: ``report.html`` in the first)."""
    runs = [(Path(d), read_run(d)) for d in run_dirs]
    views = [NeuronView.load(d) for d, _ in runs]
    rows = [row for i, ((_, s), v) in enumerate(zip(runs, views)) for row in _kstar_rows(s, i, v)]
    kstar = _table(KSTAR_HEADER, rows, left=3)
    if len(runs) > 1:
        kstar += _kstar_figure(pd.DataFrame(_headline_rows(runs)))
    numbered = list(enumerate(zip(runs, views)))
    bodies = {
        "headline": ("The answer", _headline_section(runs)),
        "kstar": ("k* per model, scope and category", kstar),
        "examples": ("Collapse examples (paper Fig. 1)", "".join(_examples_section(d, s) for d, s in runs)),
        "curves": ("PPL and CLIP score against k (paper Figs. 4-5)", "".join(_curves_section(d, s) for d, s in runs)),
        "locations": (
            "Where the critical neurons live",
            "".join(_locations_section(d, s, i, v) for i, ((d, s), v) in numbered),
        ),
        "neurons": (
            "Where each critical neuron fires: positions, patches, images",
            "".join(_neurons_section(s["model"], i, v, _view_root(v, s)) for i, ((_, s), v) in numbered),
        ),
        "activations": (
            "Massive activations in the language model (Sun et al. 2024)",
            "".join(_activations_section(d, s) for d, s in runs),
        ),
        "faults": ("Fault models and protections", "".join(_faults_section(s) for _, s in runs)),
        "stability": ("Stability: category overlap and split halves", "".join(_stability_section(s) for _, s in runs)),
        "config": ("Runs: config, versions, seed, timings", "".join(_config_section(s) for _, s in runs)),
    }
    shown = {key: value for key, value in bodies.items() if value[1] or key not in OPTIONAL_SECTIONS}
    contents = "".join(
        f'<li><a href="#{key}">{html.escape(title)}</a></li>' for key, (title, _) in shown.items() if key != "headline"
    )
    sections = "".join(
        f'<section id="{key}"><h2>{html.escape(title)}</h2>{body or "<p>(nothing measured)</p>"}</section>'
        + (f'<nav id="contents"><h2>Contents</h2><ol>{contents}</ol></nav>' if key == "headline" else "")
        for key, (title, body) in shown.items()
    )
    models = ", ".join(dict.fromkeys(s["model"] for _, s in runs))
    path = Path(out) if out is not None else runs[0][0] / REPORT_FILE
    atomic_write_text(path, _page(f"canprobe report: {models}", sections))
    return path


def _view_root(view: NeuronView | None, summary: dict) -> Path:
    return Path(view.image_root if view is not None and view.image_root else summary["config"]["images"])


def neurons_page(folder: Path | str, out: Path | str) -> Path:
    """The neuron view of a search folder (``canprobe neurons``) as a page of its own."""
    folder = Path(folder)
    view = NeuronView.load(folder)
    if view is None:
        raise InputError(f"{folder} holds no neuron view; run canprobe neurons on it")
    model = read_json(folder / SUMMARY_FILE)["model"]
    body = _layer_table(0, view) + _neurons_section(model, 0, view, Path(view.image_root or "."))
    atomic_write_text(Path(out), _page(f"canprobe neurons: {model}", body))
    return Path(out)


def _run_labels(runs: list[tuple[Path, dict]]) -> list[str]:
    """One label per run: its model; with its folder when models repeat, and a number when folders do too."""
    models = [s["model"] for _, s in runs]
    labels = [m if models.count(m) == 1 else f"{m} ({d.name})" for m, (d, _) in zip(models, runs)]
    return [label if labels.count(label) == 1 else f"{label} #{i + 1}" for i, label in enumerate(labels)]


def _headline_rows(runs: list[tuple[Path, dict]]) -> list[dict]:
    return [
        {
            "run": label,
            "model": s["model"],
            "scope": r["scope"],
            "category": r["category"],
            "k_star": r.get("k_star"),
            "n_neurons": r["n_neurons"],
            "fraction": None if r.get("k_star") is None else r["k_star"] / r["n_neurons"],
        }
        for label, (_, s) in zip(_run_labels(runs), runs)
        for r in _headline_results(s)
    ]


def _kstar_figure(table: pd.DataFrame) -> str:
    pivot = table.groupby(["scope", "run"], sort=False)["k_star"].first().unstack("run")
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(pivot), 3.2))
    width = 0.8 / max(1, pivot.shape[1])
    for j, run in enumerate(pivot.columns):
        values = pivot[run].astype(float).to_numpy()
        ax.bar(np.arange(len(pivot)) + j * width, np.nan_to_num(values), width, label=run)
    ax.set_xticks(np.arange(len(pivot)) + width * (pivot.shape[1] - 1) / 2, pivot.index)
    if (pivot.astype(float) > 0).any().any():  # no model collapsed: nothing to put on a log axis
        ax.set_yscale("log")
    ax.set_ylabel("k* (neurons masked at collapse)")
    ax.legend(fontsize=8)
    ax.set_title("k* across models and scopes")
    return f'<img class="fig" src="{_png(fig)}" alt="k* across models">'


def compare_runs(run_dirs: list[Path | str], out: Path | str) -> tuple[pd.DataFrame, Path]:
    """k* across runs (models) side by side: one table and one grouped bar figure, as an HTML page."""
    table = pd.DataFrame(
        _headline_rows([(Path(d), read_run(d)) for d in run_dirs]),
        columns=["run", "model", "scope", "category", "k_star", "n_neurons", "fraction"],
    )
    body = _table(list(table.columns), table.values.tolist(), left=3) + _kstar_figure(table)
    out = Path(out)
    atomic_write_text(out, _page("canprobe: k* across runs", body))
    return table, out
