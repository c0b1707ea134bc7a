"""Scores as results: per-site tensors, the ranking they give, and their files (through ``canprobe.runfolder``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from canprobe import runfolder
from canprobe.errors import InputError
from canprobe.sites import Site

RANKING_COLUMNS = ("address", "component", "site", "layer", "index", "score", "rank")


@dataclass
class ScoreResult:
    """Per-site neuron scores, the signed ablation estimate, and how they were computed."""

    scores: dict[str, torch.Tensor]
    signed: dict[str, torch.Tensor]
    sites: list[Site]
    config: dict = field(default_factory=dict)

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
        """Write scores.safetensors and ranking.parquet into ``out_dir`` (each atomically)."""
        tensors = {}
        for s in self.sites:
            tensors[s.name] = self.scores[s.name].float().contiguous()
            tensors[f"{s.name}/signed"] = self.signed[s.name].float().contiguous()
        runfolder.write_scores(out_dir, tensors, {"config": self.config, "sites": [asdict(s) for s in self.sites]})
        runfolder.write_ranking(out_dir, self.ranking(), self.config)


def load_ranking(path: str | Path) -> pd.DataFrame:
    """Read ranking.parquet (a file or the folder holding it); the scoring config is in ``df.attrs``."""
    return runfolder.read_ranking(path)


def load_scores(path: str | Path) -> ScoreResult:
    """Read scores.safetensors (a file or the folder holding it) back into a ScoreResult."""
    tensors, meta = runfolder.read_scores(path)
    sites = [Site(**d) for d in meta["sites"]]
    scores = {s.name: tensors[s.name] for s in sites}
    signed = {s.name: tensors[f"{s.name}/signed"] for s in sites}
    return ScoreResult(scores, signed, sites, meta.get("config", {}))
