"""Cost of finding k*: the geometric + bisection search against a step-one sweep, and batched multi-k.

    python benchmarks/bench_search.py                 # toy-llava, language.down_proj, 12 scenes
    python benchmarks/bench_search.py --images 24 --scope language.gate_proj

In one process, on the same images, CAN ranking, CLIP and settings:

1. search: ``find_k_star`` (baseline, x2 growth, bisection; no grid, no control), evaluations and
   wall time until k* is known;
2. sweep: the way published code does it, one evaluation per k = 0, 1, 2, ... adding one neuron
   at a time until the first collapsed k (``--sweep-limit`` caps it; the time is then
   extrapolated linearly and marked as such);
3. batched multi-k: the same k values (the growth grid) evaluated one k per generate call, then
   all of them in batched calls through per-row masks; throughput ratio of the two;
4. vision-feature reuse: search 1 (which encodes each image once and reuses the encoding under
   every language mask) against the same search re-encoding the image for every mask and every
   perplexity pass: time, and whether k* and every caption agree;
5. the unmasked PPL pass per evaluated k: on each image's cached prefix (``PrefixCache``, the
   prefix encoded once) against the full teacher-forcing pass it replaces, with the largest
   relative difference of the two PPLs;
6. masked generation per evaluated k with each decoding (eager, static KV cache, compiled step):
   time against eager, and whether every caption is the same. transformers compiles the decoding
   step on GPUs only, so on a CPU ``compiled`` decodes with the static cache uncompiled (the 7B
   architecture on a GPU: ``benchmarks/bench_evaluation.py``).

Timings are single runs of the whole thing (a sweep is long; repeats would not change the ratio
by much) on whatever CPU runs it; compare ratios, not seconds, across machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from canprobe.config import Generation


def prefix_pass(lm, images, ranked, ks, max_new_tokens, clip) -> None:
    """Section 5: per evaluated k, the cached-prefix PPL pass against the full pass, on that k's captions."""
    from canprobe.evaluation import MaskEvaluator, PrefixCache, caption_ppl
    from canprobe.features import FeatureCache

    n = len(images)
    ev = MaskEvaluator(lm, images, clip, Generation(max_new_tokens=max_new_tokens, batch_size=n))
    cache = FeatureCache(lm, images, Generation(batch_size=n))
    cache.rows(range(n))
    prefix = PrefixCache(lm, images, Generation(batch_size=n))
    start = time.perf_counter()
    prefix.fill(cache.rows)
    fill_s = time.perf_counter() - start
    print(f"cached prefix: encoding {n} prefixes once took {fill_s:.2f} s")
    total_full = total_cached = 0.0
    for k in ks:
        captions = [m.caption for m in ev.evaluate([ranked.prefix(k)])[0]]
        start = time.perf_counter()
        full = caption_ppl(lm, images, captions, Generation(batch_size=n), cache.rows(range(n)))
        full_s = time.perf_counter() - start
        start = time.perf_counter()
        cached = prefix.nll(range(n), captions).exp()
        cached_s = time.perf_counter() - start
        total_full, total_cached = total_full + full_s, total_cached + cached_s
        diff = float(((cached - full).abs() / full.abs()).nan_to_num(0.0).max())
        print(
            f"  k = {k:5d}: full PPL pass {1000 * full_s:7.1f} ms, cached prefix {1000 * cached_s:7.1f} ms "
            f"=> {full_s / cached_s:5.2f}x (aim >= 2x); largest relative PPL difference {diff:.1e}"
        )
    amortized = total_full / (total_cached + fill_s)
    print(f"  over {len(ks)} k: {total_full / total_cached:.2f}x, {amortized:.2f}x with the one-time prefix encoding")


def decoding_pass(lm, images, ranked, ks, max_new_tokens, clip) -> None:
    """Section 6: per evaluated k, masked generation with each decoding against eager."""
    from canprobe.evaluation import MaskEvaluator

    masks = [ranked.prefix(k) for k in ks]
    eager_s, eager = None, None
    for decoding in ("eager", "static", "compiled"):
        ev = MaskEvaluator(
            lm, images, clip, Generation(max_new_tokens=max_new_tokens, batch_size=len(images), decoding=decoding)
        )
        ev.reserve(ranked.site_names)
        ev.masked_captions(masks[:1])  # warm-up (and, where it compiles, the trace)
        start = time.perf_counter()
        captions = [ev.masked_captions([m])[0] for m in masks]
        seconds = (time.perf_counter() - start) / len(masks)
        ev.close()
        if eager is None:
            eager_s, eager = seconds, captions
        same = sum(a == b for x, y in zip(captions, eager) for a, b in zip(x, y))
        print(
            f"decoding {decoding:8s}: {1000 * seconds:7.1f} ms per evaluated k => {eager_s / seconds:5.2f}x eager; "
            f"{same}/{len(masks) * len(images)} captions as eager"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-llava")
    parser.add_argument("--scope", default="language.down_proj")
    parser.add_argument("--images", type=int, default=12, help="Number of drawn scenes.")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--sweep-limit", type=int, default=1000, help="Most sweep evaluations to run.")
    parser.add_argument("--clip-model", default=None)
    parser.add_argument(
        "--collapse-clip-ratio",
        type=float,
        default=0.6,
        help="toy-clip rates word salad of scene words at 50-57%% of the unmasked score, so 0.5 may never fire",
    )
    args = parser.parse_args()

    from canprobe.config import SearchConfig
    from canprobe.evaluation import MaskEvaluator, default_clip_model
    from canprobe.metrics import MetricSummary
    from canprobe.models import load_model
    from canprobe.organisms.scenes import make_scenes
    from canprobe.scoring import score_neurons
    from canprobe.search import find_k_star, growth_ks, ranked_in_scope
    from canprobe.sites import SiteRegistry

    lm = load_model(args.model)
    clip = load_model(args.clip_model or default_clip_model(args.model))
    images = [im for im, _ in make_scenes(args.images, seed=17)]
    ranking = score_neurons(lm, images, scope=args.scope).ranking()
    n = len(images)
    print(f"{args.model} {args.scope}: {len(ranking)} neurons, {n} images, {torch.get_num_threads()} threads")

    def evaluator(batch_rows: int) -> MaskEvaluator:
        return MaskEvaluator(lm, images, clip, Generation(max_new_tokens=args.max_new_tokens, batch_size=batch_rows))

    # 1. the search
    config = SearchConfig.of(
        scope=args.scope,
        collapse_clip_ratio=args.collapse_clip_ratio,
        grid_per_octave=0,
        max_new_tokens=args.max_new_tokens,
        batch_size=n,
    )
    start = time.perf_counter()
    result = find_k_star(lm, images, ranking, clip, config)
    search_s = time.perf_counter() - start
    search_n = result.summary["evaluations"]["search"]
    print(f"{config.criterion.describe()}")
    print(f"search: k* = {result.k_star}, {search_n} evaluations, {search_s:.1f} s")

    # 4. the same search without reusing the image encoding
    start = time.perf_counter()
    plain_config = dataclasses.replace(config, generation=dataclasses.replace(config.generation, reuse_features=False))
    plain = find_k_star(lm, images, ranking, clip, plain_config)
    plain_s = time.perf_counter() - start
    pairs = [(p, plain.point(p.k, p.control)) for p in result.points]
    same = all(
        q is not None and [c["caption"] for c in p.captions] == [c["caption"] for c in q.captions] for p, q in pairs
    )
    print(
        f"feature reuse: {search_s:.1f} s with, {plain_s:.1f} s without => {plain_s / search_s:.2f}x faster; "
        f"k* {result.k_star} vs {plain.k_star}; every point's captions identical: {same}"
    )
    if result.k_star is None:
        print("no collapse in this scope: nothing to compare")
        return

    ranked = ranked_in_scope(SiteRegistry.of(lm.model), ranking, args.scope)
    evaluated = [p.k for p in result.curve() if p.k > 0]
    prefix_pass(lm, images, ranked, evaluated, args.max_new_tokens, clip)
    decoding_pass(lm, images, ranked, evaluated, args.max_new_tokens, clip)

    # 2. the step-one sweep, stopping at the first collapsed k
    ev = evaluator(n)
    start = time.perf_counter()
    baseline = MetricSummary.of(ev.evaluate_baseline())
    sweep_n, first = 1, None
    for k in range(1, min(len(ranked), args.sweep_limit) + 1):
        (metrics,) = ev.evaluate([ranked.prefix(k)])
        sweep_n += 1
        if config.criterion.stage(MetricSummary.of(metrics), baseline) == "collapsed":
            first = k
            break
    sweep_s = time.perf_counter() - start
    if first is None:
        projected = result.k_star + 1
        sweep_s, note = sweep_s * projected / sweep_n, f" (capped at {sweep_n}; time extrapolated to {projected})"
        sweep_n = projected
    else:
        note = f" (first collapse at k = {first})"
    print(f"sweep:  {sweep_n} evaluations, {sweep_s:.1f} s{note}")
    print(f"=> search needs {sweep_n / search_n:.1f}x fewer evaluations and {sweep_s / search_s:.1f}x less time")
    if result.k_star <= 50:
        print(f"   (k* = {result.k_star} is small: the sweep is short and the ratio is modest)")

    # 3. batched multi-k against one k per generate call
    ks = growth_ks(min(len(ranked), 2 * result.k_star), 2.0)
    masks = [ranked.prefix(k) for k in ks]
    one = evaluator(n)
    one.set_baseline(ev.baseline_captions())
    start = time.perf_counter()
    single = [one.evaluate([m])[0] for m in masks]
    single_s = time.perf_counter() - start
    many = evaluator(n * len(ks))
    many.set_baseline(ev.baseline_captions())
    start = time.perf_counter()
    batched = many.evaluate(masks)
    batched_s = time.perf_counter() - start
    same = sum(a.caption == b.caption for x, y in zip(single, batched) for a, b in zip(x, y))
    print(
        f"multi-k: {len(ks)} k values x {n} images; one k per call {single_s:.2f} s, all in one batch "
        f"{batched_s:.2f} s => {single_s / batched_s:.1f}x throughput ({same}/{len(ks) * n} captions identical)"
    )


if __name__ == "__main__":
    main()
