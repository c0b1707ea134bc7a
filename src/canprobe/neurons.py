"""Where each critical neuron fires: over token positions, over image patches, and on which images.

One teacher-forced pass over a few images (prompt + the model's own greedy caption, as the scores
were taken) records, through ``SiteRegistry.hook``, the activation of each chosen neuron at every
row its site reads, per image:

* language sites: every token position, labelled ``first token``, ``prompt``, ``image`` (the image
  tokens) or ``caption``; an image token's row is mapped back to the patch it stands for by the family
  (``Family.patch_grid``: LLaVA's and PaliGemma's one token per patch, Qwen-VL's one per merged group of
  patches, Gemma 3's one per pooled block, Idefics3's whole image one per pixel-shuffled block);
* vision sites: the rows of the image's patches (``class token`` and ``patch``), mapped to the patch
  grid; projector rows (``image token``) and Q-Former rows (``query``, ``prompt``) likewise where they
  are patches;
* per image, the mean |activation| of every neuron of each hooked site over the image's rows: a neuron
  is *consistent* on an image when it is among the ``most_active`` neurons of its site there (the
  paper's "consistently activated"); its consistency is the share of images where it is.

The result is a plain table (``neurons.parquet``: neuron, image, position, kind, value, and the patch
cell of the row) plus per-neuron statistics (``neurons.json``), which the report draws from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from canprobe.captions import generate_captions
from canprobe.config import Generation, compose
from canprobe.config import names as setting_names
from canprobe.data import ImageSet
from canprobe.errors import InputError
from canprobe.inputs import forced_batches, to_model_inputs
from canprobe.models import LoadedModel
from canprobe.runfolder import (
    FORMAT_KEY,
    NEURON_STATS_FILE,
    NEURONS_FILE,
    RANKING_FILE,
    SUMMARY_FILE,
    atomic_write_files,
    check_format,
    parquet_bytes,
    parquet_format,
    read_json,
    stamped,
)
from canprobe.sites import Site, SiteRegistry

VIEW_IMAGES = 8  # images of one pass: a few, spread over the categories
MAX_NEURONS = 16  # the k* set of a scope, at most this many
UNCOLLAPSED = 4  # the top neurons shown of a scope that does not collapse
MOST_ACTIVE = 10  # "among the most active neurons of its site": among this many, by mean |activation|
WRITES = 3  # the residual channels a unit writes most, listed per neuron
TABLE_COLUMNS = ("neuron", "image", "position", "kind", "value", "cell", "grid_rows", "grid_cols")


@dataclass
class NeuronView:
    """The activations of some neurons on a few images, and a statistics row per neuron.

    ``table``: one row per (neuron, image, position): ``value``, the position's ``kind``, and the patch
    ``cell`` it covers in a ``grid_rows`` x ``grid_cols`` grid of the image (-1: none).
    """

    table: pd.DataFrame
    stats: list[dict]
    images: list[str]
    most_active: int = MOST_ACTIVE
    scopes: dict[str, dict] = field(default_factory=dict)  # scope -> {"k_star", "shown", "size"}
    image_root: str | None = None  # the folder the image names are relative to

    def save(self, folder: Path | str) -> None:
        """``neurons.parquet`` and ``neurons.json`` in ``folder``, written together, each stamped with its format."""
        folder = Path(folder)
        meta = {
            "images": self.images,
            "image_root": self.image_root,
            "most_active": self.most_active,
            "scopes": self.scopes,
            "neurons": self.stats,
        }
        text = json.dumps(stamped(meta), indent=2) + "\n"
        atomic_write_files(
            {folder / NEURONS_FILE: parquet_bytes(self.table), folder / NEURON_STATS_FILE: text.encode()}
        )

    @classmethod
    def load(cls, folder: Path | str) -> NeuronView | None:
        """The view saved in ``folder``; None when it holds none. Files of a newer format are refused."""
        folder = Path(folder)
        meta = read_json(folder / NEURON_STATS_FILE)
        if meta is None or not (folder / NEURONS_FILE).is_file():
            return None
        check_format(meta.get(FORMAT_KEY) if isinstance(meta, dict) else None, folder / NEURON_STATS_FILE)
        try:
            table = pq.read_table(folder / NEURONS_FILE)
            parquet_format(table.schema.metadata, folder / NEURONS_FILE)
            table = table.to_pandas()
            if list(table.columns) != list(TABLE_COLUMNS):
                raise ValueError("columns")
            stats, images, scopes = list(meta["neurons"]), list(meta["images"]), dict(meta["scopes"])
            return cls(table, stats, images, int(meta["most_active"]), scopes, meta.get("image_root"))
        except (KeyError, TypeError, ValueError, OSError, pa.ArrowException):
            raise InputError(f"{folder / NEURONS_FILE} is not a canprobe neuron table (damaged); rerun it") from None


def spread_images(categories: Sequence[str], n: int = VIEW_IMAGES) -> list[int]:
    """Indices of ``n`` images taken in turn from each category (given per image), in order."""
    by_category: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        by_category.setdefault(category, []).append(i)
    queues = list(by_category.values())
    chosen: list[int] = []
    while len(chosen) < min(n, len(categories)):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


def top_neurons(ranking: pd.DataFrame, k_star: int | None, top: int | None = None) -> pd.DataFrame:
    """The neurons a view shows: the first ``top`` of the ranking; by default its k* set (at most MAX_NEURONS),
    or, where nothing collapsed, its first UNCOLLAPSED (what the best-ranked neurons do all the same)."""
    n = top if top is not None else min(k_star, MAX_NEURONS) if k_star is not None else UNCOLLAPSED
    return ranking.sort_values("rank").head(n)


class _Batch:
    """One processor batch: which rows of a site's activation are each image's, and what they are."""

    def __init__(self, lm: LoadedModel, enc: dict, labels: torch.Tensor | None):
        self.lm, self.enc, self.labels = lm, enc, labels
        self.n = enc["input_ids"].shape[0]
        self.family = lm.family

    def _decoder(self, site: Site) -> bool:
        return self.family.encoder_decoder and not self.family.encoder_site(site.module_path)

    def _mask(self, site: Site) -> torch.Tensor:
        return self.enc["decoder_attention_mask" if self._decoder(site) else "attention_mask"].bool()

    def split(self, site: Site, x: torch.Tensor) -> list[torch.Tensor]:
        """Per image, its rows of ``x`` [rows, size]: the attended tokens of a language site, in order; the
        image's rows of a vision, projector or Q-Former site (its first crop's when it has several)."""
        if site.component == "language":
            mask = self._mask(site)
            x = x.reshape(*mask.shape, x.shape[-1])  # OPT's MLP sees rows and positions flattened
            return [x[i][mask[i].to(x.device)] for i in range(self.n)]
        if x.dim() == 3 and x.shape[0] == self.n:
            return list(x)
        weights = self.family.vision_rows(self.lm.model, self.enc).tolist()  # per row: 1 / its image's rows
        sizes, i = [], 0
        while i < len(weights):
            sizes.append(round(1 / weights[i]))
            i += sizes[-1]
        if x.dim() == 3:  # crops: the first of each image
            starts = np.cumsum([0, *sizes[:-1]])
            return [x[int(s)] for s in starts]
        total = sum(sizes)  # one sequence of every image's rows; a merger folds them by a common factor
        return list(x.split([s * x.shape[0] // total for s in sizes]))

    def describe(self, site: Site, image: int, rows: int) -> tuple[list[str], np.ndarray, tuple[int, int]]:
        """The kind of each of the image's ``rows`` rows, the patch cell each covers (-1: none), the grid."""
        cells = np.full(rows, -1)
        grid = (0, 0)
        if site.component == "language":
            mask = self._mask(site)[image]
            if self._decoder(site):
                return ["caption"] * rows, cells, grid
            ids = self.enc["input_ids"][image][mask]
            token = getattr(self.lm.model.config, "image_token_id", None)
            is_image = (ids == token).numpy() if token is not None else np.zeros(rows, dtype=bool)
            kinds = np.array(["prompt"] * rows, dtype=object)
            kinds[0] = "first token"
            if self.labels is not None and not self.family.encoder_decoder:
                kinds[(self.labels[image][mask] != -100).numpy()] = "caption"
            kinds[is_image] = "image"
            if is_image.any():
                patches = self.family.patch_grid(self.lm.model, self.enc, "language", image, int(is_image.sum()))
                if patches is not None:
                    cells[is_image], grid = patches.cells.numpy(), patches.shape
            return kinds.tolist(), cells, grid
        patches = self.family.patch_grid(self.lm.model, self.enc, site.component, image, rows)
        if patches is not None:
            cells, grid = patches.cells.numpy(), patches.shape
        if site.component == "vision":
            kinds = ["patch" if c >= 0 or patches is None else "class token" for c in cells]
        elif site.component == "projector":
            kinds = ["image token"] * rows
        else:
            kinds = ["query" if site.kind.endswith("_query") else "prompt"] * rows
        return kinds, cells, grid


def _writes(registry: SiteRegistry, site: Site, index: int) -> list[dict]:
    """The residual channels a unit writes most: the largest |weights| of its column in the linear that reads
    it (its own linear for an input reading; for gate and up units, the layer's down_proj). Output channels
    of a residual writer (down_proj, fc2) are residual channels themselves: none."""
    reader = site if site.weight_axis == "in" else None
    if reader is None:
        reader = next(
            (
                s
                for s in registry.sites
                if (s.component, s.layer, s.weight_axis, s.size) == (site.component, site.layer, "in", site.size)
            ),
            None,
        )
    if reader is None:
        return []
    writer = next(
        (s for s in registry.sites if s.weight_path == reader.weight_path and s.weight_axis == "out" and s.part == 0),
        None,
    )
    column = registry.weights(reader)[:, index].detach().float().cpu()
    order = column.abs().argsort(descending=True)[:WRITES]
    return [
        {"channel": writer.address(int(j)) if writer is not None else int(j), "weight": float(column[j])} for j in order
    ]


@torch.no_grad()
def record_neurons(
    lm: LoadedModel,
    inputs: list,
    names: list[str],
    neurons: Sequence[str],
    captions: list[str] | None = None,
    generation: Generation = Generation(),
    most_active: int = MOST_ACTIVE,
) -> NeuronView:
    """Record ``neurons`` (addresses) over ``inputs`` (images, or a text-only model's texts) in one
    teacher-forced pass (see the module doc), with ``generation``'s prompt and batch size.

    ``captions`` default to the model's own greedy captions. Statistics per neuron: mean, spread, the
    largest |value| and where it sits, the mean per kind of position, consistency and the channels
    written; a caller adds score and rank.
    """
    if not inputs or len(names) != len(inputs):
        raise InputError("a neuron view needs at least one image, and one name per image")
    if not neurons:
        raise InputError("no neuron to show")
    registry = SiteRegistry.of(lm.model)
    resolved = [registry.resolve(a) for a in neurons]
    routed = next((site for site, _ in resolved if site.expert >= 0), None)
    if routed is not None:
        raise InputError(
            f"{routed.name}: a routed expert's units exist only at the tokens routed to it; they have no view "
            "over every position"
        )
    chosen: dict[str, list[int]] = {}
    for site, index in resolved:
        chosen.setdefault(site.name, []).append(index)
    if captions is None:
        captions = generate_captions(lm, inputs, generation)
    values: dict[tuple[str, int], list] = {}  # (site, image) -> [values rows x chosen, kinds, cells, grid]
    activity: dict[tuple[str, int], torch.Tensor] = {}  # (site, image) -> mean |a| of every neuron of the site
    state: dict = {}

    def recorder(site: Site):
        idx = torch.tensor(chosen[site.name])

        def record(x: torch.Tensor) -> None:
            batch, offset = state["batch"], state["offset"]
            for i, rows in enumerate(batch.split(site, x.detach())):
                rows = rows.float()
                kinds, cells, grid = batch.describe(site, i, rows.shape[0])
                values[(site.name, offset + i)] = [rows[:, idx.to(rows.device)].cpu(), kinds, cells, grid]
                activity[(site.name, offset + i)] = rows.abs().mean(0).cpu()

        return record

    sites = {site.name: site for site, _ in resolved}
    handles = [registry.hook(site, recorder(site)) for site in sites.values()]
    try:
        for start, enc, labels in forced_batches(lm, inputs, captions, generation.prompt, generation.batch_size):
            state.update(batch=_Batch(lm, enc, labels), offset=start)
            lm.model(**to_model_inputs(enc, lm.model))
    finally:
        for h in handles:
            h.remove()
    missing = sorted({s for s in sites if (s, 0) not in values})
    if missing:
        raise InputError(f"{', '.join(missing)}: not reached while the model read the images; no view of them")
    frames, stats = [], []
    for address, (site, index) in zip(neurons, resolved):
        column = chosen[site.name].index(index)
        per_image = []
        for image in range(len(inputs)):
            rows, kinds, cells, grid = values[(site.name, image)]
            v = rows[:, column].numpy()
            per_image.append(
                pd.DataFrame(
                    {
                        "neuron": address,
                        "image": names[image],
                        "position": np.arange(len(v)),
                        "kind": kinds,
                        "value": v,
                        "cell": cells,
                        "grid_rows": grid[0],
                        "grid_cols": grid[1],
                    }
                )
            )
        table = pd.concat(per_image, ignore_index=True)
        frames.append(table)
        ranks = [
            int((activity[(site.name, image)] > activity[(site.name, image)][index]).sum())
            for image in range(len(inputs))
        ]
        stats.append(_statistics(address, site, table, ranks, most_active, _writes(registry, site, index)))
    table = pd.concat(frames, ignore_index=True).astype({"cell": "int64", "grid_rows": "int64", "grid_cols": "int64"})
    return NeuronView(table, stats, list(names), most_active)


def _statistics(address: str, site: Site, table: pd.DataFrame, ranks: list[int], most_active: int, writes) -> dict:
    """One neuron's numbers: mean, spread and largest |value| over every row of every image, and where."""
    peak = table.loc[table["value"].abs().idxmax()]
    return {
        "neuron": address,
        "site": site.name,
        "scope": site.scope,
        "layer": site.layer,
        "mean": float(table["value"].mean()),
        "std": float(table["value"].std(ddof=0)),
        "max": float(peak["value"]),
        "max_image": str(peak["image"]),
        "max_position": int(peak["position"]),
        "max_kind": str(peak["kind"]),
        "by_kind": {k: float(v) for k, v in table.groupby("kind", sort=False)["value"].mean().items()},
        "activity_rank": ranks,  # per image: neurons of the site more active than it (0: the most active)
        "consistency": float(np.mean([r < most_active for r in ranks])),
        "writes": writes,
    }


def position_profile(table: pd.DataFrame) -> pd.DataFrame:
    """Per position of one neuron's rows: mean, std, min and max over the images that have it, its kind
    (the most frequent), and how many images have it."""
    grouped = table.groupby("position")
    profile = grouped["value"].agg(["mean", "min", "max", "count"])
    profile["std"] = grouped["value"].std(ddof=0)
    profile["kind"] = grouped["kind"].agg(lambda k: k.mode().iloc[0])
    return profile.reset_index()


def patch_map(rows: pd.DataFrame, side: int | None = None) -> np.ndarray | None:
    """One neuron's values on one image's patch grid (mean of the rows covering a cell; NaN: no row), average-
    pooled to at most ``side`` cells a side; None when its rows cover no patch."""
    patches = rows[rows["cell"] >= 0]
    if patches.empty:
        return None
    h, w = int(patches["grid_rows"].iloc[0]), int(patches["grid_cols"].iloc[0])
    sums = np.bincount(patches["cell"], weights=patches["value"], minlength=h * w)[: h * w]
    counts = np.bincount(patches["cell"], minlength=h * w)[: h * w]
    with np.errstate(invalid="ignore"):
        grid = (sums / counts).reshape(h, w)
    if side is None or max(h, w) <= side:
        return grid
    size = (max(1, round(h * side / max(h, w))), max(1, round(w * side / max(h, w))))
    pooled = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(np.nan_to_num(grid))[None], size)
    weight = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy((~np.isnan(grid)).astype(float))[None], size)
    with np.errstate(invalid="ignore"):
        return (pooled / weight)[0].numpy()


@dataclass(frozen=True)
class Search:
    """One scope's ranking and k*, whose top neurons a view shows."""

    scope: str
    ranking: pd.DataFrame
    k_star: int | None
    size: int


def study_view(
    lm: LoadedModel,
    image_set: ImageSet,
    searches: Sequence[Search],
    top: int | None = None,
    texts: list[str] | None = None,
    generation: Generation = Generation(),
) -> NeuronView | None:
    """The view of each search's top neurons (``top_neurons``) on a few images spread over the categories;
    None when no search has any. ``texts``: a text-only model's inputs, one per image."""
    picks = {s.scope: top_neurons(s.ranking, s.k_star, top).assign(scope=s.scope) for s in searches}
    registry = SiteRegistry.of(lm.model)
    # a routed expert's units have no view over every position (``record_neurons``)
    chosen = [
        row for table in picks.values() for row in table.itertuples() if registry.resolve(row.address)[0].expert < 0
    ]
    if not chosen:
        return None
    idx = spread_images([r.category for r in image_set.records])
    inputs = [(texts or image_set.images)[i] for i in idx]
    names = [image_set.records[i].name for i in idx]
    view = record_neurons(lm, inputs, names, [r.address for r in chosen], generation=generation)
    for stats, row in zip(view.stats, chosen):
        stats.update(scope=row.scope, score=float(row.score), rank=int(row.rank))
    view.scopes = {
        s.scope: {"k_star": s.k_star, "shown": sum(r.scope == s.scope for r in chosen), "size": s.size}
        for s in searches
    }
    view.image_root = str(image_set.root)
    return view


def folder_view(folder: Path | str, top: int | None = None, images: Path | str | None = None, device=None):
    """Recompute and save the view of a run folder (``canprobe run``: its scopes' headline searches) or a
    search folder (``canprobe search``: needs ``images``, which it does not record); returns (view, kind)."""
    from canprobe.data import load_image_set
    from canprobe.models import load_model
    from canprobe.scoring import load_folder_ranking

    folder = Path(folder)
    summary = read_json(folder / SUMMARY_FILE) if folder.is_dir() else None
    if not isinstance(summary, dict) or not isinstance(summary.get("model"), str):
        raise InputError(f"{folder} is not a canprobe run or search folder (no canprobe {SUMMARY_FILE})")
    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    if isinstance(summary.get("results"), list):
        kind, found = "run", headline_results(summary["results"])
        image_set = load_image_set(
            images or config["images"],
            categories=None if images else config.get("categories"),
            limit=config.get("images_per_category"),
            annotations=None if images else config.get("annotations"),
        )
    elif "k_star" in summary and isinstance(summary.get("scope"), str):
        if images is None:
            raise InputError(f"{folder} is a search folder, which does not record its images: give --images DIR")
        kind, found = "search", [{**summary, "path": ".", "n_neurons": summary.get("scope_size")}]
        image_set = load_image_set(images)
    else:
        raise InputError(f"{folder / SUMMARY_FILE} is neither a run's nor a search's summary (damaged or foreign)")
    searches = []
    for r in found:
        if not (folder / r["path"] / RANKING_FILE).is_file():
            raise InputError(f"{folder / r['path']} holds no {RANKING_FILE}: its neurons are unknown")
        searches.append(Search(r["scope"], load_folder_ranking(folder / r["path"]), r["k_star"], r["n_neurons"]))
    lm = load_model(summary["model"], dtype=config.get("dtype") or "float32", device=device or config.get("device"))
    texts = None if lm.family.takes_images else [r.caption for r in image_set.records]
    generation = compose(Generation, {k: config[k] for k in setting_names(Generation) if config.get(k) is not None})
    view = study_view(lm, image_set, searches, top, texts, generation)
    if view is None:
        raise InputError(
            f"no top neuron of {', '.join(s.scope for s in searches)} has a view: a routed expert's units exist "
            "only at the tokens routed to it"
        )
    view.save(folder)
    return view, kind


def headline_results(results: list[dict]) -> list[dict]:
    """Per scope of a run, the result whose neurons a view shows: its pooled search, else the category whose
    k* is smallest."""

    def order(r: dict) -> tuple:
        return r["category"] != "pooled", r["k_star"] is None, r["k_star"] or 0

    by_scope: dict[str, dict] = {}
    for r in results:
        if r["scope"] not in by_scope or order(r) < order(by_scope[r["scope"]]):
            by_scope[r["scope"]] = r
    return list(by_scope.values())
