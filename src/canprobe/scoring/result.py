"""Scores as results: per-site tensors, the ranking they give, and their files (through ``canprobe.runfolder``)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from canprobe import runfolder
from canprobe.errors import InputError
from canprobe.identity import check_same
from canprobe.models import LoadedModel
from canprobe.sites import Site

log = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    """Per-site neuron scores, the signed ablation estimate, and how they were computed."""

    scores: dict[str, torch.Tensor]
    signed: dict[str, torch.Tensor]
    sites: list[Site]
    config: dict = field(default_factory=dict)
    pair: str | None = None  # the id shared with the ranking.parquet of the same write (set by save and load)

    def _order(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores in model order, descending stable order, site number of each neuron in model order)."""
        sizes = [s.size for s in self.sites]
        score = torch.cat([self.scores[s.name].float() for s in self.sites]).numpy()
        return score, np.argsort(-score, kind="stable"), np.repeat(np.arange(len(self.sites)), sizes)

    def ranking(self) -> pd.DataFrame:
        """All neurons, most important first; ties keep model order (a stable sort)."""
        score, order, site_of = self._order()
        starts = np.cumsum([0] + [s.size for s in self.sites])
        site_idx = site_of[order]
        index = order - starts[site_idx]
        names = np.array([s.name for s in self.sites], dtype=object)[site_idx]
        df = pd.DataFrame(
            {
                "address": [f"{n}:{i}" for n, i in zip(names, index)],
                "component": np.array([s.component for s in self.sites], dtype=object)[site_idx],
                "site": names,
                "layer": np.array([s.layer for s in self.sites], dtype=np.int64)[site_idx],
                "index": index.astype(np.int64),
                "score": score[order],
                "rank": np.arange(1, len(order) + 1, dtype=np.int64),
            }
        )
        df.attrs["config"] = self.config
        return df

    def top(self, k: int) -> list[str]:
        """Addresses of the k most important neurons (same order as ``ranking``)."""
        if k < 0:
            raise InputError(f"k must be non-negative, got {k}")
        _, order, site_of = self._order()
        starts = np.cumsum([0] + [s.size for s in self.sites])
        chosen = order[:k]
        return [self.sites[j].address(int(i - starts[j])) for i, j in zip(chosen, site_of[chosen])]

    def save(self, out_dir: str | Path) -> None:
        """Write scores.safetensors and ranking.parquet, both marked with one pair id.

        Both files are on disk before either replaces its old version, so a ranking that cannot be
        written leaves the old scores too; a crash between the two renames leaves the new scores
        beside the old ranking, whose pair ids then differ, and readers rebuild the ranking from the
        scores (``load_folder_ranking``) or refuse.
        """
        tensors = {}
        for s in self.sites:
            tensors[s.name] = self.scores[s.name].float().contiguous()
            tensors[f"{s.name}/signed"] = self.signed[s.name].float().contiguous()
        meta = {"config": self.config, "sites": [asdict(s) for s in self.sites]}
        self.pair = runfolder.write_scores(out_dir, tensors, meta, self.ranking())


def load_ranking(path: str | Path, check_pair: bool = True) -> pd.DataFrame:
    """Read ranking.parquet (a file or the folder holding it), checked (``canprobe.runfolder.read_ranking``)."""
    return runfolder.read_ranking(path, check_pair)


def load_folder_ranking(folder: str | Path) -> pd.DataFrame:
    """A run folder's own ranking, consistent with its scores.

    When the two files come from different writes (a crash between them), the scores are the
    newer: the ranking is rebuilt from them and rewritten, with a warning.
    """
    folder = Path(folder)
    ranking = load_ranking(folder / runfolder.RANKING_FILE, check_pair=False)
    scores_file = folder / runfolder.SCORES_FILE
    if scores_file.exists() and runfolder.scores_pair(scores_file) != ranking.attrs["pair"]:
        log.warning("%s: ranking.parquet was older than scores.safetensors (an interrupted write); rebuilt", folder)
        result = load_scores(scores_file)
        runfolder.write_ranking(folder, result.ranking(), result.config, result.pair)
        ranking = load_ranking(folder / runfolder.RANKING_FILE)
    return ranking


def load_scores(path: str | Path) -> ScoreResult:
    """Read scores.safetensors (a file or the folder holding it) back into a ScoreResult."""
    tensors, meta = runfolder.read_scores(path)
    try:
        sites = [Site(**d) for d in meta["sites"]]
        scores = {s.name: tensors[s.name] for s in sites}
        signed = {s.name: tensors[f"{s.name}/signed"] for s in sites}
    except (KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a readable canprobe scores file (no tensor {exc})") from None
    return ScoreResult(scores, signed, sites, meta.get("config", {}), meta.get(runfolder.PAIR_KEY))


def check_ranking_identity(ranking: pd.DataFrame, expected: dict, remedy: str) -> None:
    """A ranking about to be reused was scored the way ``expected`` says (``score_identity``)."""
    stored = ranking.attrs.get("config", {})
    where = ranking.attrs.get("path", "the ranking")
    check_same(f"{where} was scored differently: it", {k: stored.get(k) for k in expected}, expected, remedy)


def check_ranking_model(ranking: pd.DataFrame, lm: LoadedModel) -> None:
    """A ranking given to probe ``lm`` was scored on ``lm``'s weights, not on another model."""
    stored = ranking.attrs.get("config", {})
    where = ranking.attrs.get("path", "the ranking")
    if stored.get("weights") != lm.fingerprint:
        dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
        if stored.get("dtype") not in (None, dtype):  # the same checkpoint in another precision
            raise InputError(
                f"{where} was scored in {stored['dtype']} and this model runs in {dtype}: its weights differ in "
                f"that precision; give --dtype {stored['dtype']}, or score again with --dtype {dtype}"
            )
        was = f"{stored.get('model')} (weights {stored.get('weights')})" if stored.get("weights") else "no model"
        raise InputError(
            f"{where} was scored on another model: it records {was}, this is {lm.source} (weights "
            f"{lm.fingerprint}); score this model with `canprobe score --model {lm.source}`"
        )
