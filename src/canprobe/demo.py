"""The paper's study on the shipped organisms, as ``canprobe demo`` runs it.

Per organism, on drawn scenes:

* a study of ``language.down_proj`` per category and pooled (the paper's most vulnerable site);
* a pooled study of ``language.gate_proj``, the vision encoder's MLP (``vision.fc1``, ``vision.fc2``)
  and the bridge to the language model (the projector, or the Q-Former), so the report answers
  "language or vision?" (pooled only: the question is where, not which category, and it keeps the
  demo within minutes);
* each with the random-neuron control and mean ablation at k* (each neuron's mean at the token's own
  position; the searches record stage 1 and k*);
* the language model's massive activations (``canprobe.massive``), which every study measures.

The two organisms run at once, one process each with its share of the cores (``in_processes``): their
models are so small that a second torch thread in one process gains little, and loses much when the
cores are shared (each tiny matrix product then waits for a descheduled thread).

``story_line`` condenses one organism's results to the sentence the demo ends with.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from canprobe.config import make_config
from canprobe.experiment import POOLED, Experiment
from canprobe.massive import ActivationReport
from canprobe.report import control_word, fewest_neurons
from canprobe.runfolder import ACTIVATIONS_FILE, REPORT_FILE, read_json

ORGANISMS = ("toy-llava", "toy-instructblip")
CATEGORY_SCOPES = ["language.down_proj"]
POOLED_SCOPES = {
    "toy-llava": ["language.gate_proj", "vision.fc1", "vision.fc2", "projector"],
    "toy-instructblip": ["language.gate_proj", "vision.fc1", "vision.fc2", "qformer"],
}
# toy-clip still rates word salad made of scene words at 50-57% of the unmasked CLIP score,
# so the organisms need a collapse threshold of 60% where the paper's CLIP uses 50%; the mean
# control sets each neuron to its mean at the token's own position, as Sun et al. do
DEMO_SETTINGS = {"batch_size": 48, "max_new_tokens": 16, "collapse_clip_ratio": 0.6, "mean_control": "position"}


@dataclass
class ModelStory:
    """One organism's demo: its two studies' summaries and its massive activations."""

    name: str
    by_category: dict
    pooled: dict
    activations: ActivationReport

    @property
    def summaries(self) -> list[dict]:
        return [self.by_category, self.pooled]

    @property
    def run_dirs(self) -> list[Path]:
        return [Path(s["config"]["out"]) for s in self.summaries]


def study_configs(name: str, images: Path, out: Path) -> tuple[dict, dict]:
    """The per-category and the pooled study of organism ``name`` (config mappings)."""
    common = {"model": name, "images": str(images), **DEMO_SETTINGS}
    by_category = {**common, "out": str(out / name), "scopes": CATEGORY_SCOPES}
    pooled = {
        **common,
        "out": str(out / f"{name}-scopes"),
        "scopes": POOLED_SCOPES[name],
        "per_category": False,
        "split_half": False,
        "controls": ["random", "mean"],  # the controls the paper's story needs; activation-only runs above
    }
    return by_category, pooled


def run_story(name: str, images: Path, out: Path, progress: bool = True) -> ModelStory:
    """Run (or resume) both studies of ``name``; the first one's massive activations tell the mechanism."""
    by_category, pooled = (
        Experiment(make_config(c), progress=progress).run() for c in study_configs(name, images, out)
    )
    activations = read_json(Path(by_category["config"]["out"]) / ACTIVATIONS_FILE)
    return ModelStory(name, by_category, pooled, ActivationReport.from_dict(activations))


def cores() -> int:
    """The CPU cores this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _join_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def in_processes(func: Callable, items: list) -> Iterator:
    """``func(item)`` for each item, each in a process of its own; the results as they come.

    Each process gets ``cores // processes`` torch threads (at least one). A failing call raises here
    once the others have ended, so that what they computed is kept (the studies resume from it).
    """
    workers = max(1, min(len(items), cores()))
    with ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_join_worker,
        initargs=(max(1, cores() // workers),),
    ) as pool:
        for future in as_completed([pool.submit(func, item) for item in items]):
            yield future.result()


def _pooled(summary: dict) -> list[dict]:
    return [r for r in summary["results"] if r["category"] == POOLED]


def _kstar(r: dict) -> str:
    if r["k_star"] is None:
        return f"{r['scope']} does not collapse ({r['n_neurons']} neurons)"
    return f"{r['scope']} k* {r['k_star']} of {r['n_neurons']} ({r['k_star'] / r['n_neurons']:.1%})"


def story_line(story: ModelStory) -> str:
    """One sentence: where it collapses, with how few neurons, the controls, and its largest activation."""
    results = [r for s in story.summaries for r in _pooled(s)]
    head = next((r for r in results if r["scope"] == "language.down_proj"), results[0])
    parts = [f"{story.name}: {_kstar(head)}"]
    if head["k_star"] is not None:
        parts.append(f"stage 1 from k {head['stage1_k'] if head['stage1_k'] is not None else '-'}")
        parts.append(f"random {head['k_star']}: {control_word(head['random_collapsed'])}")
        parts.append(f"mean ablation: {control_word(head['mean_ablation_collapsed'])}")
    parts += [_kstar(r) for r in results if r is not head]
    fewest = fewest_neurons(results)
    if fewest is not None:
        component = fewest["scope"].split(".")[0]
        parts.append(f"fewest neurons (as a share of the scope) in {fewest['scope']}: {component}")
    peak = story.activations.peak
    if peak is not None:
        found = len(story.activations.massive)
        threshold = f"{story.activations.ratio_threshold:g}x"
        massive = f"{found} massive (>= {threshold})" if found else f"no massive activation (>= {threshold})"
        parts.append(
            f"largest residual |h| {abs(peak.value):.1f} = {peak.ratio:.0f}x its median "
            f"(layer {peak.layer}, {peak.token}, dim {peak.dim}): {massive}"
        )
    return "; ".join(parts)


def demo(out: Path, per_category: int) -> Iterator[str]:
    """``canprobe demo``: draw the scenes, run both organisms' studies and the report; its lines, as they come."""
    from canprobe import console
    from canprobe.massive import format_activations
    from canprobe.organisms.scenes import write_scenes
    from canprobe.report import build_report

    images = write_scenes(out / "scenes", per_category, seed=11)
    start, done = time.perf_counter(), {}
    yield f"== {' and '.join(ORGANISMS)}: both studies of each, one process per model"
    for story in in_processes(partial(run_story, images=images, out=out, progress=False), list(ORGANISMS)):
        done[story.name] = story
        yield f"== {story.name}: done in {time.perf_counter() - start:.0f} s"
    stories = [done[name] for name in ORGANISMS]
    path = build_report([d for s in stories for d in s.run_dirs], out / REPORT_FILE)
    yield from console.study([summary for s in stories for summary in s.summaries])
    for story in stories:
        yield f"== {story.name}: massive activations on the demo scenes"
        yield from format_activations(story.activations, limit=5)
    yield f"report: {path}"
    yield from (story_line(story) for story in stories)
