"""Does a first-token sink grow in toy-llava's language model with tokens seen? The sink recipe, measured.

    # CPU, Stage A only, a small-scale growth curve (one thread, 12 minutes)
    OMP_NUM_THREADS=1 python benchmarks/bench_sink.py --out /tmp/sink-a --seconds 720 --batch-size 16 \\
        --measure-every 25 --text-only
    # the GPU call (one H200, about 6 minutes of work: Stage A for 200 s, Stage B, evaluation); as one
    # device `run` with timeout_s 540, it writes five files under $OUT
    set -o pipefail; PYTHONPATH=src PYTHONUNBUFFERED=1 python3 benchmarks/bench_sink.py --device cuda \
        --out "$OUT" --seconds 200 --tokens 3e9 --measure-every 500 --pack --threads 8 2>&1 | tee "$OUT/log.txt"

Stage A (``canprobe.organisms.sink.pretrain_text``) trains on packed text until ``--tokens`` or
``--seconds``; Stage B (``align_llava``) aligns toy-llava around it. Every measurement is one line of
``curve.jsonl`` (``canprobe.organisms.probe.measure_sink``: per layer the first token's max|h| /
median and the rest's, each head's attention to the first token, the down_proj channels writing the
peak and the loss with them zeroed, at their per-position mean, and with random channels zeroed).
``summary.json`` holds the throughput (tokens per second of Stage A, measurements included), the
last measurement of each stage, the aligned organism's held-out exact captions and its massive
activations as ``canprobe inspect --activations`` prints them. ``--pack`` also writes the two
checkpoints as ``toy-llava.tar.gz`` and ``text-lm.tar.gz`` (so $OUT holds four files). ``--table
curve.jsonl`` prints a curve as a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from canprobe.massive import format_activations, massive_activations
from canprobe.models import LoadedModel
from canprobe.organisms.evaluate import caption_exact_match
from canprobe.organisms.scenes import make_scenes
from canprobe.organisms.sink import (
    CURVE_FILE,
    TEXT_LM_DIR,
    AlignConfig,
    PretrainConfig,
    align_llava,
    pretrain_text,
)


def print_table(curve: Path) -> None:
    """One line per measurement: tokens, loss, then per layer the first token's max|h|/median / the rest's,
    n: the first token's L2 norm over the others', a: the largest head's attention to the first token;
    then the losses with the peak's writers zeroed, at their per-position mean, and random channels zeroed."""
    for line in curve.read_text().splitlines():
        row = json.loads(line)
        layers = " | ".join(
            f"{p['first_ratio']:5.1f}/{p['rest_ratio']:5.1f} n{p.get('norm_ratio', float('nan')):4.1f} "
            f"a{max(p['first_attention']):.2f}"
            for p in row["layers"]
        )
        cut = row["ablation"]
        print(
            f"{row['stage']} {row['tokens']:>11,} loss {row['loss']:.3f} | {layers} | peak L{row['peak_layer']} "
            f"d{row['peak_dim']} zero {cut['zero']:.3f} mean {cut['mean_position']:.3f} random {cut['random']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, help="Print the table of a curve.jsonl and stop.")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=float, default=PretrainConfig.tokens, help="Stage A token budget.")
    parser.add_argument("--seconds", type=float, default=None, help="Stage A wall-clock limit.")
    parser.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=PretrainConfig.lr)
    parser.add_argument("--weight-decay", type=float, default=PretrainConfig.weight_decay)
    parser.add_argument("--measure-every", type=int, default=PretrainConfig.measure_every)
    parser.add_argument("--text-only", action="store_true", help="Stage A alone.")
    parser.add_argument("--frozen-steps", type=int, default=AlignConfig.frozen_steps)
    parser.add_argument("--joint-steps", type=int, default=AlignConfig.joint_steps)
    parser.add_argument("--pack", action="store_true", help="Also write both checkpoints as .tar.gz.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the GPU run's data is on the GPU).")
    args = parser.parse_args()
    if args.table:
        print_table(args.table)
        return
    if args.out is None:
        parser.error("--out is required")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    curve = args.out / CURVE_FILE
    curve.unlink(missing_ok=True)
    pretrain = PretrainConfig(
        tokens=int(args.tokens),
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        measure_every=args.measure_every,
        max_seconds=args.seconds,
    )
    summary: dict = {"pretrain": dataclasses.asdict(pretrain), "device": args.device}
    if args.device.startswith("cuda"):
        summary["gpu"] = torch.cuda.get_device_name()
    text_lm, stage_a = pretrain_text(pretrain, device=args.device, curve_path=curve)
    summary["stage_a"] = {
        "steps": stage_a.steps,
        "tokens": stage_a.tokens,
        "seconds": stage_a.seconds,
        "tokens_per_second": stage_a.tokens / stage_a.seconds,
        "tokens_per_cpu_second": stage_a.tokens / stage_a.curve[-1]["cpu_seconds"],
        "last": stage_a.curve[-1],
    }
    print(json.dumps(summary["stage_a"] | {"last": None}))
    # what Stage A made is written before Stage B starts: a lease that ends early still brings it back
    save(text_lm, None, TEXT_LM_DIR, args, summary)
    if args.text_only:
        return
    align = AlignConfig(frozen_steps=args.frozen_steps, joint_steps=args.joint_steps)
    summary["align"] = dataclasses.asdict(align)
    start = time.perf_counter()
    model, processor, stage_b = align_llava(
        text_lm.to(args.device), align, stream=pretrain.stream, device=args.device, curve_path=curve
    )
    summary["stage_b"] = {"steps": stage_b.steps, "seconds": time.perf_counter() - start, "last": stage_b.curve[-1]}
    lm = LoadedModel(model, processor, "llava", "toy-llava (sink recipe)")
    summary["held_out_exact"] = caption_exact_match(lm)
    summary["activations"] = format_activations(massive_activations(lm, [im for im, _ in make_scenes(24, seed=11)]))
    save(model, processor, "toy-llava", args, summary)
    print("\n".join(summary["activations"]))
    print(f"held-out exact captions {summary['held_out_exact']:.1%}")


def save(model, processor, name: str, args, summary: dict) -> None:
    """summary.json, and with --pack the checkpoint as NAME.tar.gz."""
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if not args.pack:
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        model.to("cpu").save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        with tarfile.open(args.out / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname=name)


if __name__ == "__main__":
    main()
