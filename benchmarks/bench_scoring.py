"""Cost of CAN scoring against a bare forward+backward with frozen weights, and against Captum.

    python benchmarks/bench_scoring.py                    # toy-llava, batch 1 and 8
    python benchmarks/bench_scoring.py --batch-sizes 8 --repeats 9

(The 7B architectures, with peak RSS per mode: benchmarks/bench_scale.py.)

The toy run times, in one process and interleaved over repeats (median reported): building the
inputs; a bare forward+backward (pixel values require grad, so the backward runs through the
whole model; weights frozen); ``score_inputs`` on every language and vision site; and Captum's
LayerGradientXActivation on the same sites (two calls: output sites, then ``down_proj`` input
sites, since Captum takes one ``attribute_to_layer_input`` per call), reduced the same way.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SCOPE = "language,vision"


def _toy_inputs(batch_size: int):
    from canprobe.inputs import teacher_forcing_inputs
    from canprobe.models import load_model
    from canprobe.organisms.scenes import make_scenes

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

    registry = SiteRegistry.of(lm.model)
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
    from canprobe.config import Scoring
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
    n_sites = len(score_inputs(lm, [enc], scope=SCOPE, scoring=Scoring(method="random")).sites)
    print(
        f"toy-llava, batch {batch_size}, {n_sites} sites ({SCOPE}), "
        f"median of {repeats}, {torch.get_num_threads()} threads"
    )
    for name in runs:
        print(f"  {name:7s} {1000 * t[name]:8.1f} ms")
    aim = "1.15x" if batch_size == 1 else "1.3x"
    print(f"  scoring / bare forward+backward           {t['score'] / t['bare']:.2f}x  (aim <= {aim})")
    print(f"  scoring / (inputs + bare forward+backward) {t['score'] / (t['inputs'] + t['bare']):.2f}x")
    print(f"  scoring / Captum on the same sites         {t['score'] / t['captum']:.2f}x  (aim <= 1x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8", help="Comma-separated batch sizes, one run each.")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        bench_toy(batch_size, args.repeats)


if __name__ == "__main__":
    main()
