"""Data-parallel scoring: 2 processes (torchrun, gloo, CPU) against 1 process on the same images.

    python benchmarks/bench_distributed.py [--model toy-llava] [--per-category 8] [--scope language]

Both runs are the real command (``canprobe score``) on the same drawn scenes; the single process
gets all the cores (torch's default threads), each of the two processes half of them, so the
comparison is at equal hardware. Prints wall time of each, the speed-up, and the largest relative
difference between the two score files (they must agree to float tolerance).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def _run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-llava")
    parser.add_argument("--per-category", type=int, default=8)
    parser.add_argument("--scope", default="language")
    args = parser.parse_args()
    from canprobe.organisms.scenes import write_scenes

    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = write_scenes(root / "scenes", per_category=args.per_category, seed=9)
        score = ["-m", "canprobe.cli", "score", "--model", args.model, "--images", str(images), "--scope", args.scope]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        one = _run([sys.executable, *score, "--out", str(root / "one")], {**os.environ, "OMP_NUM_THREADS": str(cores)})
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // 2))}
        two = _run([*launcher, *score, "--out", str(root / "two")], env)
        a, b = load_file(root / "one" / "scores.safetensors"), load_file(root / "two" / "scores.safetensors")
        worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-30)) for k in a)
    n = 6 * args.per_category
    print(f"{args.model}, scope {args.scope}, {n} images, {cores} cores, torch {torch.__version__}")
    print(f"  1 process  ({cores} threads)      {one:7.1f} s (process start and model load included)")
    print(f"  2 processes ({max(1, cores // 2)} thread(s) each) {two:7.1f} s")
    print(f"  speed-up 2 processes / 1          {one / two:.2f}x")
    print(f"  largest relative score difference {worst:.2e}  (float tolerance: < 1e-5)")


if __name__ == "__main__":
    main()
