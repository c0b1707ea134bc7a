"""Cost of a fault model against zero masking of the same k neurons (ratio per fault, one run).

    python benchmarks/bench_faults.py                  # toy-llava, language.down_proj, k=16, 12 scenes
    python benchmarks/bench_faults.py --k 64 --repeats 5 --model toy-instructblip

In one process, on the same images and the same k neurons (a seeded random draw of the scope),
every fault is timed through the path a search uses (per-row masks, ``ablate_rows``):

0. one forward pass over the prompt batch, ``--forward-repeats`` times (the hooks' own cost, least
   disturbed by other load on the machine);
1. generation at fixed length: one batched greedy ``generate`` of ``--max-new-tokens`` tokens per
   row (``min_new_tokens`` = ``max_new_tokens``), so a fault that makes captions longer or shorter
   does not change the amount of work: this is the cost of the fault itself;
2. a whole evaluation (``MaskEvaluator.evaluate``: captions, PPL and CLIP passes), where a fault
   that collapses the captions also changes their length and the scoring work.

Faults run interleaved, ``--repeats`` times each; the fastest time of each (the run least slowed
by other processes on a shared machine) is divided by zero masking's.
Clean statistics (for mean, stuck-at, noise) are computed once, outside the timings.
"""

from __future__ import annotations

import argparse
import time

import torch

from canprobe.config import Evaluation, Generation

FAULTS = (
    "zero",
    "mean",
    "stuck:at=max:factor=2",
    "sign",
    "noise:sigma=1",
    "bitflip:bit=exponent",
    "weight_bitflip:bit=exponent",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-llava")
    parser.add_argument("--scope", default="language.down_proj")
    parser.add_argument("--images", type=int, default=12, help="Number of drawn scenes.")
    parser.add_argument("--k", type=int, default=16, help="Neurons under the fault.")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forward-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from canprobe.ablation import RankedNeurons, ablate_rows, activation_stats
    from canprobe.evaluation import MaskEvaluator, default_clip_model
    from canprobe.inputs import caption_inputs
    from canprobe.models import load_model
    from canprobe.organisms.scenes import make_scenes
    from canprobe.sites import SiteRegistry

    lm = load_model(args.model)
    clip = load_model(default_clip_model(args.model))
    images = [im for im, _ in make_scenes(args.images, seed=17)]
    registry = SiteRegistry.of(lm.model)
    scope = RankedNeurons.from_sites(registry.select(args.scope))
    order = torch.randperm(len(scope), generator=torch.Generator().manual_seed(0))
    mask = scope.subset(order).prefix(args.k)
    stats = activation_stats(
        lm, images, args.scope, generation=Generation(max_new_tokens=args.max_new_tokens, batch_size=len(images))
    )
    enc = caption_inputs(lm, images)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=lm.tokenizer.pad_token_id,
    )
    forward: dict[str, list[float]] = {f: [] for f in FAULTS}
    generate: dict[str, list[float]] = {f: [] for f in FAULTS}
    evaluate: dict[str, list[float]] = {f: [] for f in FAULTS}
    with torch.no_grad():
        for _ in range(args.forward_repeats):
            for fault in FAULTS:
                with ablate_rows(lm, [mask] * len(images), fault, stats=stats):
                    start = time.perf_counter()
                    lm.model(**enc)
                    forward[fault].append(time.perf_counter() - start)
        for _ in range(args.repeats):
            for fault in FAULTS:
                with ablate_rows(lm, [mask] * len(images), fault, stats=stats):
                    start = time.perf_counter()
                    lm.model.generate(**enc, **options)
                    generate[fault].append(time.perf_counter() - start)
                # a fresh evaluator: its baseline (features, unmasked captions, CLIP image features) is
                # made outside the timing, and no masked caption has been scored before
                ev = MaskEvaluator(
                    lm,
                    images,
                    clip,
                    Generation(max_new_tokens=args.max_new_tokens),
                    Evaluation(ablation=fault),
                    stats=stats,
                )
                ev.evaluate_baseline()
                start = time.perf_counter()
                ev.evaluate([mask])
                evaluate[fault].append(time.perf_counter() - start)

    print(
        f"{args.model} {args.scope}: k={args.k} of {len(scope)} neurons, {len(images)} images, "
        f"{args.max_new_tokens} new tokens, {args.repeats} repeats, {torch.get_num_threads()} threads"
    )
    head = " ".join(
        f"{name:>{w}s} {'ratio':>6s}" for name, w in (("forward s", 10), ("generate s", 11), ("evaluate s", 11))
    )
    print(f"{'fault':30s} {head}")
    base = [min(t["zero"]) for t in (forward, generate, evaluate)]
    for fault in FAULTS:
        cells = [(min(t[fault]), min(t[fault]) / b) for t, b in zip((forward, generate, evaluate), base)]
        print(f"{fault:30s} " + " ".join(f"{s:{w}.4f} {r:6.2f}" for (s, r), w in zip(cells, (10, 11, 11))))


if __name__ == "__main__":
    main()
