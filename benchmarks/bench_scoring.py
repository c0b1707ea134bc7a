"""Cost of CAN scoring against a bare forward+backward with frozen weights, and against Captum.

    python benchmarks/bench_scoring.py                      # toy-llava, everything in this process
    python benchmarks/bench_scoring.py --arch llava-1.5-7b  # 7B LLaVA, random bf16 weights, one image

The toy run times, in one process and interleaved over repeats (median reported): building the
inputs; a bare forward+backward (pixel values require grad, so the backward runs through the
whole model; weights frozen); ``score_inputs`` on every language and vision site; and Captum's
LayerGradientXActivation on the same sites (two calls: output sites, then ``down_proj`` input
sites, since Captum takes one ``attribute_to_layer_input`` per call), reduced the same way.

The 7B run measures the bare pass and scoring each in a fresh subprocess so that peak RSS is
clean; it needs about 20 GB of RAM. The prompt is 1 BOS + 576 image tokens + 39 text tokens
(the last 20 are the caption), like LLaVA-1.5 with a 336 px image.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

SCOPE = "language,vision"


def _toy_inputs(batch_size: int):
    from canprobe.captions import teacher_forcing_inputs
    from canprobe.data import make_scenes
    from canprobe.models import load_model

    lm = load_model("toy-llava")
    scenes = make_scenes(batch_size, seed=3)
    images, captions = [im for im, _ in scenes], [s.caption for _, s in scenes]
    return lm, lambda: teacher_forcing_inputs(lm.processor, lm.kind, images, captions)


def _bare(lm, enc) -> None:
    from canprobe.scoring import per_sample_loss

    enc = {**enc, "pixel_values": enc["pixel_values"].clone().requires_grad_(True)}
    per_sample_loss(lm.model, enc).sum().backward()


def _captum(lm, enc) -> dict[str, torch.Tensor]:
    """CAN alpha=1 and the signed estimate of the same sites through Captum."""
    from captum.attr import LayerGradientXActivation

    from canprobe.scoring import per_sample_loss
    from canprobe.sites import SiteRegistry

    registry = SiteRegistry(lm.model)
    # Captum cannot attribute to a layer that never reaches the loss: LLaVA's last vision layer
    # (vision_feature_layer=-2) is left out, which only makes Captum's job smaller
    last_vision = max(s.layer for s in registry.sites if s.component == "vision")
    sites = [s for s in registry.select(SCOPE) if not (s.component == "vision" and s.layer == last_vision)]
    labels = enc["labels"]
    loss_pos = torch.zeros_like(labels, dtype=torch.float32)
    loss_pos[:, :-1] = (labels[:, 1:] != -100).float()
    w_lang = loss_pos / loss_pos.sum(1, keepdim=True)

    def forward(pixel_values):
        return per_sample_loss(lm.model, {**enc, "pixel_values": pixel_values})

    out = {}
    for hook in ("output", "input"):
        group = [s for s in sites if s.hook == hook]
        attrs = LayerGradientXActivation(forward, [registry.module(s) for s in group]).attribute(
            enc["pixel_values"], attribute_to_layer_input=hook == "input"
        )
        for site, attr in zip(group, attrs):
            attr = attr.detach()
            w = w_lang if site.component == "language" else torch.full(attr.shape[:2], 1.0 / attr.shape[1])
            out[site.name] = (w[..., None] * attr.abs()).sum((0, 1))
            out[site.name + "/signed"] = -attr.sum((0, 1))
    return out


def bench_toy(batch_size: int, repeats: int) -> None:
    from canprobe.scoring import score_inputs

    lm, make = _toy_inputs(batch_size)
    enc = make()
    runs = {
        "inputs": make,
        "bare": lambda: _bare(lm, enc),
        "score": lambda: score_inputs(lm, [enc], scope=SCOPE),
        "captum": lambda: _captum(lm, enc),
    }
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    t = {k: statistics.median(v) for k, v in times.items()}
    n_sites = len(score_inputs(lm, [enc], scope=SCOPE, method="random").sites)
    print(
        f"toy-llava, batch {batch_size}, {n_sites} sites ({SCOPE}), "
        f"median of {repeats}, {torch.get_num_threads()} threads"
    )
    for name in runs:
        print(f"  {name:7s} {1000 * t[name]:8.1f} ms")
    print(f"  scoring / bare forward+backward           {t['score'] / t['bare']:.2f}x  (aim <= 1.3x)")
    print(f"  scoring / (inputs + bare forward+backward) {t['score'] / (t['inputs'] + t['bare']):.2f}x")
    print(f"  scoring / Captum on the same sites         {t['score'] / t['captum']:.2f}x  (aim <= 1x)")


def _seven_b_model():
    from transformers import AutoModelForImageTextToText

    from canprobe.inventory import build_shipped

    config = build_shipped("llava-1.5-7b").config
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def _seven_b_inputs(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 32000, (39,), generator=g)
    ids = torch.cat(
        [torch.tensor([1]), text[:10], torch.full((cfg.image_seq_length,), cfg.image_token_index), text[10:]]
    )
    labels = torch.full_like(ids, -100)
    labels[-20:] = ids[-20:]
    size = cfg.vision_config.image_size
    return {
        "input_ids": ids[None],
        "attention_mask": torch.ones_like(ids)[None],
        "labels": labels[None],
        "pixel_values": torch.randn(1, 3, size, size, generator=g).to(torch.bfloat16),
    }


def seven_b_child(mode: str) -> None:
    from canprobe.models import LoadedModel
    from canprobe.scoring import score_inputs

    model = _seven_b_model()
    enc = _seven_b_inputs(model)
    lm = LoadedModel(model, None, "llava", "llava-1.5-7b (random bf16)")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "bare":
        _bare(lm, enc)
    else:
        score_inputs(lm, [enc], scope=SCOPE)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps({"mode": mode, "seconds": seconds, "peak_gb": peak * 1024 / 1e9, "before_gb": before * 1024 / 1e9})
    )


def bench_seven_b() -> None:
    results = {}
    for mode in ("bare", "score"):
        proc = subprocess.run(
            [sys.executable, __file__, "--arch", "llava-1.5-7b", "--child", mode],
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    bare, score = results["bare"], results["score"]
    print(f"llava-1.5-7b architecture, random bf16 weights, CPU, one image + 40 text tokens, {SCOPE} sites")
    for r in (bare, score):
        print(
            f"  {r['mode']:5s} {r['seconds']:7.1f} s/image   peak RSS {r['peak_gb']:5.1f} GB "
            f"(after building the model: {r['before_gb']:.1f})"
        )
    print(f"  time ratio scoring / bare forward+backward {score['seconds'] / bare['seconds']:.2f}x  (aim <= 1.3x)")
    print(f"  peak RSS ratio                             {score['peak_gb'] / bare['peak_gb']:.2f}x  (aim <= 1.1x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["toy-llava", "llava-1.5-7b"], default="toy-llava")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=["bare", "score"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        seven_b_child(args.child)
    elif args.arch == "toy-llava":
        bench_toy(args.batch_size, args.repeats)
    else:
        bench_seven_b()


if __name__ == "__main__":
    main()
