"""One evaluated k on the LLaVA-1.5-7b architecture against its floor: masked captioning and its PPL.

    python benchmarks/bench_evaluation.py --device cuda                     # bf16, 24 images, 16 tokens
    python benchmarks/bench_evaluation.py --layers 2 --dtype float32 --images 4 --modes eager,static

The model is the shipped LLaVA-1.5-7b config with random weights built on ``--device`` (no
download), its processor a CLIP image processor and a word-level tokenizer over the config's
vocabulary; each image is random noise and the prompt the family's default, so every row's prefix
is 1 + 576 image + about 20 text tokens. Every evaluated k of a search pays two passes, both timed
here (median of ``--repeats``, each with another ``--mask`` random neurons of ``--scope``):

- masked generation of ``--new-tokens`` tokens for every image: ``eager`` (a growing KV cache,
  hooks per batch), ``static`` (a fixed-size KV cache) and ``compiled`` (the static cache with the
  decoding step compiled by transformers; the mask hooks stay installed and the masks change in
  place, so a new mask reuses the compiled step: the script checks that no new graph appears);
- the unmasked model's PPL of those captions: the full teacher-forcing pass over prefix and caption
  against the pass over the caption tokens on each image's cached prefix (``PrefixCache``).

The floor of an evaluated k is the prefill of every row at the card's measured bf16 matmul rate
(2 FLOPs per weight and token, attention scores left out) plus one read of the language model's
weights per decoding step at the card's measured copy bandwidth, plus the cached-prefix PPL pass at
the same rates. It prints each figure and the ratios measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_scale import build


def tokenizer(vocab_size: int, image_token_id: int):
    """A word-level tokenizer over the whole vocabulary with Llama's specials and the config's image token."""
    from canprobe.organisms.build import word_level_tokenizer

    names = {0: "<unk>", 1: "<s>", 2: "</s>", image_token_id: "<image>", image_token_id + 1: "<pad>"}
    vocab = {names.get(i, f"w{i}"): i for i in range(vocab_size)}
    return word_level_tokenizer(vocab, list(names.values()), "<s> $A", "left", {"image_token": "<image>"}, 4096)


def loaded(args):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from canprobe.models import LoadedModel

    model = build("llava-1.5-7b", args.layers, args.dtype, args.device)
    cfg = model.config
    size = cfg.vision_config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True
        ),
        tokenizer=tokenizer(cfg.text_config.vocab_size, cfg.image_token_index),
        patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model.generation_config.eos_token_id = None  # random weights: every row decodes all its tokens
    return LoadedModel(model, processor, "llava", f"llava-1.5-7b (random {args.dtype})")


def timed(fn, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def card_rates(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """Measured matmul FLOP/s (8192^3 products) and copy bandwidth (bytes read + written per second)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    flops = 2 * n**3 * 5 / timed(lambda: [a @ b for _ in range(5)], cuda)
    x = torch.empty(2**30 if cuda else 2**26, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    bandwidth = 2 * x.numel() * 5 / timed(lambda: [y.copy_(x) for _ in range(5)], cuda)
    return flops, bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=None, help="Language layers (default: all 32).")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--mask", type=int, default=5, help="Neurons masked per evaluated k.")
    parser.add_argument("--scope", default="language.down_proj")
    parser.add_argument("--modes", default="eager,static,compiled")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from PIL import Image
    from torch._dynamo.utils import counters

    from canprobe.evaluation import MaskEvaluator, PrefixCache, caption_ppl
    from canprobe.models import load_model
    from canprobe.sites import SiteRegistry

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    lm = loaded(args)
    clip = load_model("toy-clip", device=args.device)  # built but unused: only captions and PPL are timed
    g = torch.Generator().manual_seed(0)
    size = lm.model.config.vision_config.image_size
    images = [
        Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
        for _ in range(args.images)
    ]
    registry = SiteRegistry.of(lm.model)
    pool = [s.address(i) for s in registry.select(args.scope) for i in range(s.size)]
    masks = [[pool[i] for i in torch.randperm(len(pool), generator=g)[: args.mask]] for _ in range(args.repeats + 1)]
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"llava-1.5-7b architecture, random {args.dtype} weights, {args.layers or 32} layers, on {name}")

    n = len(images)
    generation: dict[str, float] = {}
    captions: dict[str, list[list[str]]] = {}
    for mode in args.modes.split(","):
        ev = MaskEvaluator(lm, images, clip, max_new_tokens=args.new_tokens, batch_size=n, decoding=mode)
        ev.reserve(s.name for s in registry.select(args.scope))
        graphs = None
        runs, texts = [], []
        for r, mask in enumerate(masks):  # the first one warms up (and compiles)
            seconds = timed(lambda ev=ev, texts=texts, mask=mask: texts.append(ev.masked_captions([mask])[0]), cuda)
            if r == 0:
                graphs = counters["stats"]["unique_graphs"]
                print(f"  {mode:9s} first masked generation (warm-up, compile) {seconds:7.2f} s")
            else:
                runs.append(seconds)
        generation[mode] = statistics.median(runs)
        captions[mode] = texts
        new = counters["stats"]["unique_graphs"] - graphs
        print(f"  {mode:9s} masked generation {generation[mode]:7.3f} s  (graphs traced after the warm-up: {new})")
        ev.close()
    for mode in generation:
        same = sum(a == b for x, y in zip(captions[mode], captions["eager"]) for a, b in zip(x, y))
        total = sum(len(x) for x in captions[mode])
        print(f"  {mode:9s} {generation['eager'] / generation[mode]:5.2f}x eager; {same}/{total} captions as eager")

    texts = captions[next(iter(captions))][-1]
    prefix = PrefixCache(lm, images, None, n)
    fill = timed(lambda: prefix.fill(), cuda)
    full = statistics.median(timed(lambda: caption_ppl(lm, images, texts, None, n), cuda) for _ in range(3))
    cached = statistics.median(timed(lambda: prefix.nll(range(n), texts), cuda) for _ in range(3))
    print(
        f"  PPL: full pass {full:.3f} s, cached prefix {cached:.3f} s => {full / cached:.1f}x "
        f"(the prefix cache costs {fill:.2f} s once)"
    )

    flops, bandwidth = card_rates(device, lm.model.dtype)
    language = lm.family.text_model(lm.model)
    n_lm = sum(p.numel() for p in language.parameters()) + lm.model.get_output_embeddings().weight.numel()
    vision = getattr(lm.model, "vision_tower", None) or lm.model.model.vision_tower
    n_vision = sum(p.numel() for p in vision.parameters())
    bytes_lm = n_lm * lm.model.dtype.itemsize
    prefix_tokens = prefix._mask[0].shape[-1]
    patches = (size // lm.model.config.vision_config.patch_size) ** 2 + 1
    prefill = 2 * (n_lm * prefix_tokens + n_vision * patches) * n / flops
    floor_generation = prefill + args.new_tokens * bytes_lm / bandwidth
    floor_ppl = 2 * n_lm * n * (args.new_tokens + 1) / flops + bytes_lm / bandwidth
    print(
        f"  card: {flops / 1e12:.0f} TFLOP/s matmul, {bandwidth / 1e12:.2f} TB/s copy; prefix {prefix_tokens} tokens; "
        f"floor: generation {floor_generation:.3f} s (prefill {prefill:.3f} s), cached PPL {floor_ppl:.3f} s"
    )
    floor = floor_generation + floor_ppl
    for mode, seconds in generation.items():
        for ppl_name, ppl in (("full PPL", full), ("cached PPL", cached)):
            k = seconds + ppl
            print(f"  evaluated k, {mode} generation + {ppl_name}: {k:.3f} s = {k / floor:.2f}x floor ({floor:.3f} s)")


if __name__ == "__main__":
    main()
