"""Do massive activations emerge in an organism under a training recipe? Train, then measure.

    python benchmarks/bench_massive.py                                  # toy-llava, three recipes
    python benchmarks/bench_massive.py --steps 800 --recipe lr=3e-3,wd=0,heads=8 --recipe lr=3e-3,wd=0.1

Each ``--recipe`` is comma-separated ``key=value`` pairs over TrainConfig fields (lr, weight_decay
as ``wd``, steps, batch_size, warmup) and OrganismShape fields (``layers`` = text_layers, heads,
text_hidden, text_ffn). For each recipe: train from scratch (``canprobe.organisms.train``), then
on held-out scenes print the exact-caption rate and the language model's residual stream
(``canprobe.massive``): per layer the largest |h| / median, where it sits, how many entries reach
``--ratio`` x the median, and the down_proj channels writing the largest one. The acceptance of
issue 14 is a ratio of at least 100 in an early layer written by down_proj channels whose
zero-ablation collapses the model (``canprobe run`` measures that k*). Training time is wall time
on whatever CPU runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from canprobe.massive import format_activations, massive_activations
from canprobe.models import load_model
from canprobe.organisms.build import OrganismShape
from canprobe.organisms.evaluate import caption_exact_match
from canprobe.organisms.scenes import make_scenes
from canprobe.organisms.train import DEFAULT_CONFIGS, train_organism

SHAPE_KEYS = {"layers": "text_layers", "heads": "heads", "text_hidden": "text_hidden", "text_ffn": "text_ffn"}
CONFIG_KEYS = {"lr": "lr", "wd": "weight_decay", "steps": "steps", "batch_size": "batch_size", "warmup": "warmup"}


def parse_recipe(text: str, steps: int) -> tuple[dict, dict]:
    config, shape = {"steps": steps}, {}
    for pair in filter(None, text.split(",")):
        key, value = pair.split("=")
        if key in SHAPE_KEYS:
            shape[SHAPE_KEYS[key]] = int(value)
        elif key in CONFIG_KEYS:
            config[CONFIG_KEYS[key]] = int(value) if key in ("steps", "batch_size", "warmup") else float(value)
        else:
            raise SystemExit(f"unknown recipe key {key!r}; use {', '.join([*CONFIG_KEYS, *SHAPE_KEYS])}")
    return config, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-llava", choices=["toy-llava", "toy-instructblip"])
    parser.add_argument("--recipe", action="append", help="key=value,...; repeatable")
    parser.add_argument("--steps", type=int, default=400, help="Steps of every recipe that sets none.")
    parser.add_argument("--images", type=int, default=24, help="Held-out scenes measured.")
    parser.add_argument("--ratio", type=float, default=100.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipes = args.recipe or ["wd=0.01", "wd=0", "lr=3e-3,wd=0,heads=8"]
    scenes = make_scenes(args.images, seed=11)
    images = [im for im, _ in scenes]
    for text in recipes:
        config, shape = parse_recipe(text, args.steps)
        train_config = dataclasses.replace(DEFAULT_CONFIGS[args.model], log_every=0, **config)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            train_organism(args.model, Path(tmp), train_config, shape=dataclasses.replace(OrganismShape(), **shape))
            seconds = time.perf_counter() - start
            lm = load_model(tmp)
            exact = caption_exact_match(lm, n=args.images)
            report = massive_activations(lm, images, ratio=args.ratio)
        print(f"== recipe {text}: trained {train_config.steps} steps in {seconds:.0f} s; held-out exact {exact:.0%}")
        for line in format_activations(report, limit=3):
            print(line)


if __name__ == "__main__":
    main()
