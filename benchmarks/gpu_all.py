"""The GPU measurement of issue 23 in one call: both benchmarks on both 7B architectures, then gpu.json.

    PYTHONUNBUFFERED=1 PYTHONPATH=src:benchmarks python3 benchmarks/gpu_all.py --out $OUT        # on the H200
    python benchmarks/gpu_all.py --out /tmp/rehearsal --device cpu --tiny --dtype float32 \\
        --images 2 --new-tokens 2 --repeats 1                                                    # a rehearsal

Steps, in this order, each in its own process (one model at a time on the card), each given what
is left of ``--budget`` seconds, so a slow compile leaves the figures already measured:

1. per architecture (LLaVA-1.5-7b, then InstructBLIP-vicuna-7b): ``bench_scale.py --device``, the
   bare forward+backward (the scoring floor) and ``score_inputs`` on ``language.down_proj`` at
   batch 1 and 8 (seconds, peak memory); then ``bench_evaluation.py``, one evaluated k of 24
   images and 16 new tokens with eager, static and compiled decoding, full and cached-prefix PPL,
   the CLIP text pass, its floor from the card's measured rates, and how many compiled captions
   equal the eager ones. Every figure is the median of ``--repeats`` runs after a warm-up.
2. ``profile_paths.py`` on LLaVA (scoring at batch 1 and 8, eager and static generation, both PPL
   passes, CLIP): one profile of each, for finding what is left above the floor.

``--out`` receives at most four files (what a device call brings back): ``gpu.json`` (the keys
issue 23 names, LLaVA's figures, both architectures side by side with their floors in seconds),
``raw.json`` (every step's figures), ``log.txt`` (every step's output) and ``profile.txt`` (the
profiler's tables). gpu.json belongs in ``benchmarks/results/`` only when it comes from a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_scale import ARCHS

HERE = Path(__file__).parent
KEYS = (
    "scoring_over_floor_b1",
    "scoring_over_floor_b8",
    "scoring_memory_over_floor",
    "evaluated_k_over_floor",
    "evaluated_k_over_floor_eager",
    "compiled_captions_identical",
)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def figures(scale: dict | None, evaluation: dict | None) -> dict:
    """One architecture's ratios to its floors (None where a step did not run or measure it)."""
    out: dict = dict.fromkeys(KEYS)
    if scale and "batch" in scale:
        memory = []
        for batch, modes in scale["batch"].items():
            score, bare = modes["score"], modes["bare"]
            out[f"scoring_over_floor_b{batch}"] = score["seconds"] / bare["seconds"]
            out.setdefault("scoring_floor_s", {})[f"b{batch}"] = bare["seconds"]
            memory.append(_finite(score["peak_gb"] / bare["peak_gb"]))
        out["scoring_memory_over_floor"] = max(memory) if None not in memory else None
    if evaluation and "floor_s" in evaluation:
        floor = evaluation["floor_s"]["total"]
        cached = {mode: k["cached"] / floor for mode, k in evaluation["evaluated_k_s"].items()}
        best = min(cached, key=cached.get)
        out.update(
            evaluated_k_over_floor=cached[best],
            best_decoding=best,
            evaluated_k_over_floor_eager=cached.get("eager"),
            evaluated_k_over_floor_by_decoding=cached,
            evaluated_k_over_floor_full_ppl={
                mode: k["full"] / floor for mode, k in evaluation["evaluated_k_s"].items()
            },
            compiled_captions_identical=evaluation["captions_as_eager"].get("compiled"),
            evaluated_k_floor_s=evaluation["floor_s"],
            evaluated_k_s=evaluation["evaluated_k_s"],
            graphs_after_warmup=evaluation["graphs_after_warmup"],
            features_reused=evaluation.get("features_reused"),
        )
    return out


def gpu_json(raw: dict, meta: dict) -> dict:
    """gpu.json: ``meta`` (device, torch, transformers, date), LLaVA's figures under the issue's keys,
    and every architecture's figures under its name."""
    per_arch = {arch: figures(raw.get(f"scale/{arch}"), raw.get(f"evaluation/{arch}")) for arch in ARCHS}
    return {**meta, **{key: per_arch[ARCHS[0]][key] for key in KEYS}, **per_arch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="1/16 widths and few layers (a CPU rehearsal).")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--budget", type=float, default=540, help="Seconds for all steps together.")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()

    import torch
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    meta = {
        "device": torch.cuda.get_device_name(0) if cuda else "CPU",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "repeats": args.repeats,
    }
    common = ["--device", args.device, "--dtype", args.dtype] + (["--tiny"] if args.tiny else [])
    common += ["--layers", str(args.layers)] if args.layers else []
    shape = ["--images", str(args.images), "--new-tokens", str(args.new_tokens)]
    steps = []
    for arch in args.archs.split(","):
        steps.append(
            (f"scale/{arch}", "bench_scale.py", ["--arch", arch, "--batch-sizes", "1,8", "--modes", "bare,score"])
        )
        steps.append((f"evaluation/{arch}", "bench_evaluation.py", ["--arch", arch, *shape]))
    deadline = time.monotonic() + args.budget
    raw: dict = {}
    with tempfile.TemporaryDirectory() as tmp, open(out / "log.txt", "w") as log:
        runs = [(name, [script, *extra, *common, "--repeats", str(args.repeats)]) for name, script, extra in steps]
        if not args.no_profile:
            runs.append(("profile", ["profile_paths.py", *common, *shape, "--modes", "eager,static", "--out", tmp]))
        for name, argv in runs:
            left = deadline - time.monotonic()
            if left < 20:
                raw[name] = {"skipped": f"{args.budget:.0f} s budget spent"}
                continue
            result = Path(tmp) / (name.replace("/", "-") + ".json")
            cmd = [sys.executable, str(HERE / argv[0]), *argv[1:]] + (
                ["--json", str(result)] if name != "profile" else []
            )
            print(f"== {name}: {' '.join(argv)}", file=log, flush=True)
            start = time.monotonic()
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=left)
                status = f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                status = f"stopped after {left:.0f} s (budget)"
            print(f"== {name}: {status} in {time.monotonic() - start:.0f} s", file=log, flush=True)
            print(f"{name}: {status} in {time.monotonic() - start:.0f} s", flush=True)
            summary = Path(tmp) / "summary.json"
            if name == "profile" and summary.exists():
                raw[name] = json.loads(summary.read_text())
                tables = sorted(Path(tmp).glob("*.txt"))
                (out / "profile.txt").write_text("".join(f"== {t.stem}\n{t.read_text()}\n" for t in tables))
            elif result.exists():
                raw[name] = json.loads(result.read_text())
            else:
                raw[name] = {"failed": status}
            (out / "raw.json").write_text(json.dumps(raw, indent=1))
            (out / "gpu.json").write_text(json.dumps(gpu_json(raw, meta), indent=1))
    print((out / "gpu.json").read_text())


if __name__ == "__main__":
    main()
