"""7B architectures: scoring and masked captioning against the bare floor of the same model.

    python benchmarks/bench_scale.py                                   # llava-1.5-7b, all modes, CPU
    python benchmarks/bench_scale.py --arch instructblip-vicuna-7b
    python benchmarks/bench_scale.py --layers 4                        # a quick run on 4 language layers
    python benchmarks/bench_scale.py --images 3 --modes score,score_ckpt  # checkpointing on a batch
    python benchmarks/bench_scale.py --device cuda --batch-sizes 1,8   # on a GPU, per batch size
    python benchmarks/bench_scale.py --device cuda --scope all --modes bare,score

With ``--device`` the random-weight model is built directly on that device and every mode runs in
this process, timed after a warm-up (median of ``--repeats``, synchronized) for each batch size of
``--batch-sizes``; on CUDA the peak of ``torch.cuda.max_memory_allocated`` is reported per mode,
and the achieved TFLOP/s of ``bare`` and ``score``: 2 FLOPs per weight and token for the forward
pass of the language model plus 2 for the backward pass to its activations (weights frozen: no
weight gradients), and 2 per weight and image token for the vision tower's forward (attention
scores left out, so the figure is a slight underestimate). Without ``--device`` (CPU):

The model is the shipped config with random bf16 weights (no download; ``--dtype float32`` on CPUs
without a fast bf16 matmul, with ``--layers`` halved to keep the same bytes), fed one image
(``--images N``: a batch of N copies): LLaVA-1.5 gets 1 BOS + 576 image tokens + 39 text tokens,
InstructBLIP 32 query tokens + 40 text tokens and a 10-token Q-Former instruction; the last 20 text
tokens are the caption that carries the loss.
every mode runs in a fresh subprocess so that its peak RSS is its own:

- ``bare``: forward + backward of the caption loss, weights frozen, the graph starting at the
  language model's input embeddings (the floor any gradient-based score pays);
- ``score``: ``score_inputs`` on ``--scope`` (CAN, alpha 1);
- ``score_ckpt``: the same with gradient checkpointing;
- ``generate`` / ``generate_masked``: greedy generation of 20 new tokens, unmasked and with the
  first ``--mask`` neurons of the scope zeroed.

It prints seconds and peak RSS per mode and the ratios the issue asks about, measured in this run.
Needs about 20 GB of RAM for the 7B models.

Peak RSS is what the process holds, not only what it uses: glibc keeps freed blocks under its
dynamic mmap threshold (which grows to 32 MB) in the heap, so activations freed in the backward
pass would still count. The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` (every mode alike)
so large tensors go back to the system when freed; ``--glibc-default`` keeps glibc's default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

MODES = ("bare", "score", "score_ckpt", "generate", "generate_masked")
ARCHS = ("llava-1.5-7b", "instructblip-vicuna-7b")
NEW_TOKENS = 20


TINY = {  # --tiny: every width 1/16 (whole heads of the same size), few layers; sequence shapes and vocabularies kept
    "text_config": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 2},
    "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 1},
    "qformer_config": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 1},
}


def build(arch: str, layers: int | None, dtype: str, device: str | None = None, tiny: bool = False):
    """The shipped architecture with random weights (seeded) in ``dtype``, built on ``device`` (default CPU).

    ``tiny``: the same architecture and token counts at 1/16 of every width and a few layers (``TINY``),
    a CPU proxy of the 7B code paths.
    """
    from transformers import AutoModelForImageTextToText

    from canprobe.inventory import build_shipped

    config = build_shipped(arch).config
    for part, sizes in TINY.items() if tiny else ():
        sub = getattr(config, part, None)
        for key, value in sizes.items() if sub is not None else ():
            setattr(sub, key, value)
            if key == "num_attention_heads" and hasattr(sub, "num_key_value_heads"):
                sub.num_key_value_heads = value
    if tiny and hasattr(config, "qformer_config"):
        config.qformer_config.encoder_hidden_size = config.vision_config.hidden_size
    if layers is not None:
        config.text_config.num_hidden_layers = layers
    if getattr(config, "image_token_index", None) is None:  # older InstructBLIP configs predate the field
        config.image_token_index = config.text_config.vocab_size - 1
    torch.manual_seed(0)
    with torch.device(device or "cpu"):  # parameters are created (and initialized) on the device itself
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    return model.eval().requires_grad_(False)


def inputs(model, images: int) -> dict[str, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    vocab = cfg.text_config.vocab_size
    text = torch.randint(3, min(vocab, 32000) - 1, (40,), generator=g)
    size = cfg.vision_config.image_size
    enc = {"pixel_values": torch.randn(1, 3, size, size, generator=g).to(model.dtype)}
    if cfg.model_type == "llava":
        image = torch.full((cfg.image_seq_length,), cfg.image_token_index)
        ids = torch.cat([torch.tensor([1]), text[:10], image, text[11:]])
    else:
        image = torch.full((cfg.num_query_tokens,), cfg.image_token_index)
        ids = torch.cat([image, torch.tensor([1]), text[1:]])
        enc["qformer_input_ids"] = torch.randint(1000, 2000, (1, 10), generator=g)
        enc["qformer_attention_mask"] = torch.ones(1, 10, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    labels[-NEW_TOKENS:] = ids[-NEW_TOKENS:]
    enc.update(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], labels=labels[None])
    device = next(model.parameters()).device
    return {k: v.repeat(images, *[1] * (v.dim() - 1)).to(device) for k, v in enc.items()}


def _bare(model, enc) -> None:
    from canprobe.scoring import per_sample_loss

    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    try:
        with torch.enable_grad():
            per_sample_loss(model, enc).sum().backward()
    finally:
        handle.remove()


def _generate(model, enc, mask: list[str] | None) -> None:
    from canprobe.ablation import ablate

    prompt = {k: v for k, v in enc.items() if k != "labels"}
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    if mask is None:
        model.generate(**prompt, **kwargs)
    else:
        with ablate(model, mask):
            model.generate(**prompt, **kwargs)


def _run(mode: str, lm, enc, scope: str, mask: list[str]) -> None:
    from canprobe.scoring import score_inputs

    if mode == "bare":
        _bare(lm.model, enc)
    elif mode.startswith("score"):
        score_inputs(lm, [dict(enc)], scope=scope, gradient_checkpointing=mode == "score_ckpt")
    else:
        _generate(lm.model, enc, mask if mode == "generate_masked" else None)


def flops(model, enc) -> float:
    """FLOPs of one bare forward+backward (see the module docstring): 4 per LM weight and token, 2 per vision one."""
    cfg = model.config
    language = getattr(model, "language_model", None) or model.model.language_model
    own = {id(p) for p in language.parameters()}
    n_lm = sum(p.numel() for p in language.parameters()) - model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    n_lm += head.numel() if id(head) not in own else 0
    vision = model.model.vision_tower if cfg.model_type == "llava" else model.vision_model
    n_vision = sum(p.numel() for p in vision.parameters())
    patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1
    rows, tokens = enc["input_ids"].shape
    return 4.0 * n_lm * rows * tokens + 2.0 * n_vision * rows * patches


def on_device(args) -> dict:
    """Every mode in this process on ``args.device``, per batch size: seconds, peak memory, TFLOP/s (returned
    as ``{"batch": {batch: {mode: {"seconds", "peak_gb", "tflops"}}}}``)."""
    from canprobe.models import LoadedModel
    from canprobe.sites import SiteRegistry

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build(args.arch, args.layers, args.dtype, args.device, args.tiny)
    kind = "llava" if model.config.model_type == "llava" else "instructblip"
    lm = LoadedModel(model, None, kind, f"{args.arch} (random {args.dtype})")
    mask = [s.address(i) for s in SiteRegistry.of(model).select(args.scope) for i in range(s.size)][: args.mask]
    figures: dict = {"arch": args.arch, "dtype": args.dtype, "scope": args.scope, "batch": {}}
    weights_gb = torch.cuda.memory_allocated(device) / 1e9 if cuda else float("nan")
    name = torch.cuda.get_device_name(device) if cuda else str(device)
    print(f"{args.arch}, random {args.dtype} weights on {name}, scope {args.scope}, weights {weights_gb:.1f} GB")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        enc = inputs(model, batch)
        results = {}
        for mode in args.modes.split(","):
            _run(mode, lm, enc, args.scope, mask)  # warm-up (kernels, allocator)
            times = []
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(args.repeats):
                start = time.perf_counter()
                _run(mode, lm, enc, args.scope, mask)
                if cuda:
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else float("nan")
            rate = flops(model, enc) / seconds / 1e12 if mode in ("bare", "score", "score_ckpt") else float("nan")
            results[mode] = (seconds, peak)
            figures["batch"].setdefault(batch, {})[mode] = {"seconds": seconds, "peak_gb": peak, "tflops": rate}
            print(
                f"  batch {batch:3d}  {mode:16s} {seconds:8.3f} s   peak allocated {peak:6.1f} GB   "
                f"{rate:6.1f} TFLOP/s",
                flush=True,
            )
        for a, b in (("score", "bare"), ("score_ckpt", "score"), ("generate_masked", "generate")):
            if a in results and b in results:
                print(
                    f"  batch {batch:3d}  {a} / {b}: time {results[a][0] / results[b][0]:.2f}x, "
                    f"peak memory {results[a][1] / results[b][1]:.2f}x"
                )
    return figures


def child(arch: str, mode: str, layers: int | None, scope: str, n_mask: int, dtype: str, images: int) -> None:
    from canprobe.models import LoadedModel
    from canprobe.sites import SiteRegistry

    model = build(arch, layers, dtype)
    enc = inputs(model, images)
    kind = "llava" if model.config.model_type == "llava" else "instructblip"
    lm = LoadedModel(model, None, kind, f"{arch} (random {dtype})")
    mask = [s.address(i) for s in SiteRegistry.of(model).select(scope) for i in range(s.size)][:n_mask]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    _run(mode, lm, enc, scope, mask)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_gb": peak * 1024 / 1e9, "model_gb": before * 1024 / 1e9}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS, default=ARCHS[0])
    parser.add_argument("--layers", type=int, default=None, help="Language layers (default: the real count).")
    parser.add_argument("--scope", default="language.down_proj")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="float32 where the CPU has no fast bf16 matmul (no AVX512-BF16/AMX): same bytes at half the layers",
    )
    parser.add_argument("--mask", type=int, default=5, help="Neurons masked in generate_masked.")
    parser.add_argument("--images", type=int, default=1, help="Images per batch (copies of the one image).")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--glibc-default", action="store_true", help="Keep glibc's dynamic mmap threshold.")
    parser.add_argument("--device", default=None, help="Build and run on this device, in this process (e.g. cuda).")
    parser.add_argument("--batch-sizes", default="1,8", help="With --device: batch sizes, one run each.")
    parser.add_argument("--repeats", type=int, default=3, help="With --device: timed runs per mode (median).")
    parser.add_argument("--tiny", action="store_true", help="With --device: 1/16 widths, few layers (a CPU proxy).")
    parser.add_argument("--json", default=None, help="With --device: also write the figures to this JSON file.")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device:
        figures = on_device(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=1)
        return
    if args.child:
        child(args.arch, args.child, args.layers, args.scope, args.mask, args.dtype, args.images)
        return
    results = {}
    env = dict(os.environ) if args.glibc_default else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for mode in args.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--arch",
            args.arch,
            "--child",
            mode,
            "--scope",
            args.scope,
            "--dtype",
            args.dtype,
        ]
        cmd += ["--mask", str(args.mask), "--images", str(args.images)]
        cmd += ["--layers", str(args.layers)] if args.layers else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{mode} failed:\n{proc.stderr[-2000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(
            f"  {mode:16s} {r['seconds']:8.1f} s   peak RSS {r['peak_gb']:5.1f} GB (model alone {r['model_gb']:.1f})",
            flush=True,
        )
    layers = args.layers or "all"
    print(
        f"{args.arch}, random {args.dtype} weights, CPU, {torch.get_num_threads()} threads, "
        f"{layers} language layers, {args.images} image(s)"
    )

    def ratio(a: str, b: str, key: str) -> str:
        return f"{results[a][key] / results[b][key]:.2f}x" if a in results and b in results else "n/a"

    print(f"  scoring / bare forward+backward, time      {ratio('score', 'bare', 'seconds')}  (aim <= 1.3x)")
    print(f"  scoring / bare forward+backward, peak RSS  {ratio('score', 'bare', 'peak_gb')}  (aim <= 1.1x)")
    if "score" in results and "score_ckpt" in results:
        model_gb = results["score"]["model_gb"]
        change = results["score_ckpt"]["peak_gb"] / results["score"]["peak_gb"] - 1
        extra = (results["score_ckpt"]["peak_gb"] - model_gb) / (results["score"]["peak_gb"] - model_gb) - 1
        print(f"  gradient checkpointing: peak RSS {change:+.0%} (aim <= -20%), memory above the model {extra:+.0%}")
        print(f"  gradient checkpointing, time               {ratio('score_ckpt', 'score', 'seconds')}")
    print(
        f"  masked / unmasked captioning, time         {ratio('generate_masked', 'generate', 'seconds')}  (aim <= 1.2x)"
    )


if __name__ == "__main__":
    main()
