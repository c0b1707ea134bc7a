"""Robustness study: k* per fault model and ranking, and collapse under random faults with protections.

Two questions beyond zeroing (METHOD.md, "Fault models beyond zeroing"), asked on one image set:

- ``fault_kstars``: for each fault model, k* with the CAN ranking, the activation-only ranking and a
  random ranking of the scope, each by the ordinary k* search with the fault in place of zero masking.
  Searches live in ``faults/<fault>/<ranking>/`` and resume like any search.
- ``protection_study``: for each count n, ``trials`` random draws of n neurons of the scope under
  one fault, evaluated with no protection, with the top-k CAN set protected (faults cannot touch it)
  and with range restriction (every channel of the scope clamped to its clean bounds); the collapse
  rate is the fraction of draws whose captions collapse by the search's criterion. The draws are
  the same for every protection (a paired comparison). Each protection's cost on clean captions
  (no fault): the share of captions that stay identical, and its evaluation time relative to none.
  Written to ``protection.json``, reused when its settings match.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from canprobe.ablation import RankedNeurons
from canprobe.config import Faults, SearchConfig
from canprobe.evaluation import MaskEvaluator
from canprobe.faults import ChannelStats, ProtectedSet, RangeRestriction
from canprobe.metrics import MetricSummary
from canprobe.runfolder import FAULTS_DIR, PROTECTION_FILE, atomic_write_json, read_json, stamped
from canprobe.search import find_k_star


def fault_dir_name(spec: str) -> str:
    return spec.replace(":", "_").replace("=", "-").replace("/", "_")


def fault_kstars(
    lm,
    inputs: list,
    clip,
    rankings: dict[str, pd.DataFrame | Sequence[str]],
    faults: Sequence[str],
    config: SearchConfig,
    out: Path,
    **search,
) -> list[dict]:
    """One k* search per (fault, ranking) with ``config`` and the fault in place of its own; a row each
    with k* and the start of stage 1. ``search``: the rest of ``find_k_star``'s arguments
    (``image_names``, ``ppl_lm``, ``stats``: give the clean statistics once for all faults)."""
    rows = []
    for spec in faults:
        for name, ranking in rankings.items():
            search_config = dataclasses.replace(
                config,
                control=None,
                search=dataclasses.replace(config.search, grid_per_octave=0),
                evaluation=dataclasses.replace(config.evaluation, fault=spec),
            )
            folder = out / FAULTS_DIR / fault_dir_name(spec) / name
            found = find_k_star(lm, inputs, ranking, clip, search_config, folder, **search)
            rows.append(
                {
                    "fault": spec,
                    "ranking": name,
                    "k_star": found.k_star,
                    "stage1_k": found.stage1_k,
                    "scope_size": found.summary["scope_size"],
                    "evaluations": found.summary["evaluations"]["total"],
                    "path": folder.relative_to(out).as_posix(),
                }
            )
    return rows


def random_order(neurons: RankedNeurons, seed: int) -> list[str]:
    """The scope's neurons in a seeded random order (the random ranking)."""
    gen = torch.Generator().manual_seed(seed)
    return list(neurons.subset(torch.randperm(len(neurons), generator=gen)).addresses)


def _draws(neurons: RankedNeurons, counts: Sequence[int], trials: int, seed: int) -> list[tuple[int, int, dict]]:
    draws = []
    for n in counts:
        for t in range(trials):
            gen = torch.Generator().manual_seed((seed * 1_000_003 + n * 1_009 + t) % 2**63)  # seeds are int64
            draws.append((n, t, neurons.subset(torch.randperm(len(neurons), generator=gen)[:n]).prefix(n)))
    return draws


def protection_study(
    evaluator: MaskEvaluator,
    scope_neurons: RankedNeurons,
    top: RankedNeurons,
    k_protect: int,
    faults: Faults,
    config: SearchConfig,
    stats: dict[str, ChannelStats],
    out: Path,
) -> dict:
    """Collapse rates under random faults per protection, and each protection's clean cost (see module doc).

    ``evaluator`` applies ``faults.random_fault``; the draws come from ``scope_neurons`` with
    ``config.seed``, and a draw collapses by ``config.criterion``. ``stats``: the scope's clean
    statistics (the range restriction's bounds).
    """
    protections, counts, seed = faults.protections, faults.fault_counts, config.seed
    identity = {
        "scope": config.scope,
        "fault": faults.random_fault,
        "counts": counts,
        "trials": faults.fault_trials,
        "protections": protections,
        "k_protect": k_protect,
        "seed": seed,
    }
    path = out / PROTECTION_FILE
    cached = read_json(path)
    if isinstance(cached, dict) and cached.get("identity") == json.loads(json.dumps(identity)):
        return cached
    variants: dict[str, tuple] = {"none": ()}
    guard = ProtectedSet(top.prefix(min(k_protect, len(top))))
    ranger = RangeRestriction({name: stats[name] for name in scope_neurons.site_names})
    if "protect_top" in protections:
        variants["protect_top"] = (guard,)
    if "range" in protections:
        variants["range"] = (ranger,)
    if {"protect_top", "range"} <= set(protections):
        variants["protect_top+range"] = (guard, ranger)
    start = time.perf_counter()
    baseline = MetricSummary.of(evaluator.evaluate_baseline())
    counts = [n for n in counts if n <= len(scope_neurons)]
    draws = _draws(scope_neurons, counts, faults.fault_trials, seed)
    clean, rates, seconds = {}, [], {}
    for name, guards in variants.items():
        t = time.perf_counter()
        (metrics,) = evaluator.evaluate([{}], guards)
        seconds[name] = time.perf_counter() - t
        summary = MetricSummary.of(metrics)
        clean[name] = {
            **dataclasses.asdict(summary),
            "seconds": seconds[name],
            "time_ratio": seconds[name] / seconds["none"],
        }
        results = evaluator.evaluate([mask for _, _, mask in draws], guards)
        stages = [config.criterion.stage(MetricSummary.of(m), baseline) for m in results]
        for n in counts:
            mine = [s for (count, _, _), s in zip(draws, stages) if count == n]
            rates.append(
                {
                    "count": n,
                    "protection": name,
                    "collapse_rate": sum(s == "collapsed" for s in mine) / len(mine),
                    "degraded_rate": sum(s != "healthy" for s in mine) / len(mine),
                    "trials": len(mine),
                }
            )
    result = {
        "identity": identity,
        "fault": evaluator.evaluation.fault,
        "k_protect": k_protect,
        "protected": list(top.addresses[:k_protect]),
        "baseline": dataclasses.asdict(baseline),
        "clean_cost": clean,
        "rates": rates,
        "seconds": time.perf_counter() - start,
    }
    atomic_write_json(path, stamped(result))
    return result
