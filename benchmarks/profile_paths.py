"""One profile of each hot path on a 7B architecture: where the time above the floor goes.

    python benchmarks/profile_paths.py --tiny --dtype float32 --images 4 --out prof   # CPU proxy
    python benchmarks/profile_paths.py --device cuda --out $OUT/profile                # the real thing

Paths (each run once to warm up, then once under ``torch.profiler`` and once under ``cProfile``):
scoring (``score_inputs`` on ``--scope``) and the bare forward+backward at batch 1 and 8; masked
generation of one evaluated k with each decoding; the full and the cached-prefix PPL pass; the
CLIP text pass. Per path ``--out`` gets ``<path>.txt``, the profiler's table of operators (by self
device time on CUDA, self CPU time elsewhere), and ``summary.json``: wall seconds, operator calls,
host-synchronizing operators (``aten::item`` and the like, and on CUDA the device-to-host copies
and stream synchronizations), and the seconds spent in canprobe's own Python code (cProfile's
total time of functions under ``canprobe/``), with its five largest functions.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from functools import partial
from pathlib import Path

import torch
from bench_evaluation import clip_model, loaded
from bench_scale import ARCHS, _bare, inputs

from canprobe.config import Generation

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal")
CUDA_SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "Memcpy DtoH")


def own_python(profile: cProfile.Profile) -> tuple[float, list[tuple[str, float, int]]]:
    """Total seconds in functions defined under canprobe/, and the five largest (name, seconds, calls)."""
    stats = pstats.Stats(profile).stats
    mine = [
        (f"{Path(file).name}:{line}:{fn}", tottime, calls)
        for (file, line, fn), (_cc, calls, tottime, _ct, _callers) in stats.items()
        if "/canprobe/" in file
    ]
    mine.sort(key=lambda r: -r[1])
    return sum(r[1] for r in mine), mine[:5]


def profile(name: str, fn, out: Path, cuda: bool, rows: int) -> dict:
    fn()  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    (out / f"{name}.txt").write_text(events.table(sort_by=sort, row_limit=rows))
    calls = {e.key: e.count for e in events}
    syncs = {k: v for k, v in calls.items() if k in SYNC_OPS or any(k.startswith(c) for c in CUDA_SYNC)}
    python = cProfile.Profile()
    python.enable()
    fn()
    python.disable()
    own, top = own_python(python)
    summary = {
        "wall_s": wall,
        "operator_calls": sum(calls.values()),
        "syncs": syncs,
        "canprobe_python_s": own,
        "canprobe_python_top": top,
    }
    print(f"  {name:22s} {wall:8.3f} s  {summary['operator_calls']:7d} ops  canprobe Python {own:.3f} s  {syncs}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, default=ARCHS[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="1/16 widths and few layers (bench_scale.build).")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--scope", default="language.down_proj")
    parser.add_argument("--modes", default="eager,static,compiled")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rows", type=int, default=25, help="Operators per table.")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from PIL import Image

    from canprobe.evaluation import ClipScorer, MaskEvaluator, PrefixCache, caption_ppl
    from canprobe.scoring import score_inputs
    from canprobe.sites import SiteRegistry

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.device(args.device).type == "cuda"
    lm = loaded(args)
    registry = SiteRegistry.of(lm.model)
    summary = {}
    print(f"{args.arch}{' (tiny)' if args.tiny else ''}, {args.dtype}, on {args.device}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        enc = inputs(lm.model, batch)
        summary[f"bare_b{batch}"] = profile(f"bare_b{batch}", partial(_bare, lm.model, enc), out, cuda, args.rows)
        summary[f"score_b{batch}"] = profile(
            f"score_b{batch}", lambda enc=enc: score_inputs(lm, [dict(enc)], scope=args.scope), out, cuda, args.rows
        )

    g = torch.Generator().manual_seed(0)
    size = lm.model.config.vision_config.image_size
    images = [
        Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
        for _ in range(args.images)
    ]
    n = len(images)
    pool = [s.address(i) for s in registry.select(args.scope) for i in range(s.size)]
    clip = clip_model(args, 49408)
    texts = None
    for mode in args.modes.split(","):
        ev = MaskEvaluator(lm, images, clip, Generation(max_new_tokens=args.new_tokens, batch_size=n, decoding=mode))
        ev.reserve(s.name for s in registry.select(args.scope))
        masks = iter([[pool[i] for i in torch.randperm(len(pool), generator=g)[:5]] for _ in range(3)])
        captions = []

        def generate(ev=ev, masks=masks, captions=captions):  # a new mask each call
            captions.append(ev.masked_captions([next(masks)])[0])

        summary[f"generate_{mode}"] = profile(f"generate_{mode}", generate, out, cuda, args.rows)
        ev.close()
        texts = captions[-1]
    generation = Generation(batch_size=n)
    prefix = PrefixCache(lm, images, generation)
    prefix.fill()
    summary["ppl_full"] = profile("ppl_full", lambda: caption_ppl(lm, images, texts, generation), out, cuda, args.rows)
    summary["ppl_cached"] = profile("ppl_cached", lambda: prefix.nll(range(n), texts), out, cuda, args.rows)
    scorer = ClipScorer(clip, n)
    image_features = scorer.image_features(images)
    summary["clip"] = profile("clip", lambda: scorer.score(image_features, texts), out, cuda, args.rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
