"""One evaluated k on a 7B architecture against its floor: masked captioning, its PPL and its CLIP score.

    python benchmarks/bench_evaluation.py --device cuda                     # bf16, 24 images, 16 tokens
    python benchmarks/bench_evaluation.py --device cuda --arch instructblip-vicuna-7b --json k.json
    python benchmarks/bench_evaluation.py --tiny --dtype float32 --images 4 --modes eager,static  # CPU proxy

The model is the shipped LLaVA-1.5-7b (or InstructBLIP-vicuna-7b) config with random weights built
on ``--device`` (no download), its processor the family's kind of image processor and a word-level
tokenizer over the config's vocabulary; each image is random noise and the prompt the family's
default, so every LLaVA row's prefix is 1 + 576 image + about 20 text tokens (InstructBLIP: 32
query + about 10). CLIP is ViT-L/14 with random weights. Every evaluated k of a search pays three
passes, each timed here (median of ``--repeats``, each with another ``--mask`` random neurons of
``--scope``):

- masked generation of ``--new-tokens`` tokens for every image: ``eager`` (a growing KV cache,
  hooks per batch), ``static`` (a fixed-size KV cache) and ``compiled`` (the static cache with the
  decoding step compiled by transformers; the mask hooks stay installed and the masks change in
  place, so a new mask reuses the compiled step: the script checks that no new graph appears);
- the unmasked model's PPL of those captions: the full teacher-forcing pass over prefix and caption
  against the pass over the caption tokens on each image's cached prefix (``PrefixCache``);
- CLIP's text tower over the captions (the image features are computed once per search).

The floor of an evaluated k is the prefill of every row through the language model at the card's
measured matmul rate (2 FLOPs per weight and token, attention scores left out; the image encoder
runs once per search, not per k) plus one read of the language model's weights per decoding step
at the card's measured copy bandwidth, plus the cached-prefix PPL pass and the CLIP text pass at
the same rates. It prints each figure and the ratios measured in this run; ``--json`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_scale import ARCHS, build

from canprobe.config import Generation

# CLIP ViT-L/14 (the paper's CLIP, DEFAULT_CLIP) as a config: its text tower scores every evaluated k's captions
CLIP_L = {
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 224,
    },
    "projection_dim": 768,
}
CLIP_TINY = {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 1}


def tokenizer(
    vocab_size: int, names: dict[int, str], template: str = "<s> $A", padding_side: str = "left", image_attr=False
):
    """A word-level tokenizer over the whole vocabulary: ``names`` for the specials, ``w<id>`` for the rest;
    ``image_attr``: it names its image token, as llava-hf tokenizers do (Salesforce's leave it to the processor)."""
    from canprobe.organisms.build import word_level_tokenizer

    vocab = {names.get(i, f"w{i}"): i for i in range(vocab_size)}
    extra = {"image_token": "<image>"} if image_attr else None
    specials = list(names.values())
    return word_level_tokenizer(vocab, specials, template, padding_side, extra, 4096)


def loaded(args):
    """The architecture with random weights and a processor of the real one's kind (``--tiny``: see ``build``)."""
    from transformers import BlipImageProcessorPil, CLIPImageProcessorPil, InstructBlipProcessor, LlavaProcessor

    from canprobe.models import LoadedModel

    model = build(args.arch, args.layers, args.dtype, args.device, args.tiny)
    cfg = model.config
    size = cfg.vision_config.image_size
    vocab = cfg.text_config.vocab_size
    image = cfg.image_token_index
    if cfg.model_type == "llava":
        names = {0: "<unk>", 1: "<s>", 2: "</s>", image: "<image>", image + 1: "<pad>"}
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True
            ),
            tokenizer=tokenizer(vocab, names, image_attr=True),
            patch_size=cfg.vision_config.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        kind = "llava"
    else:  # Vicuna pads with <unk>; the Q-Former reads the instruction through a BERT-sized vocabulary
        names = {0: "<unk>", 1: "<s>", 2: "</s>", image: "<image>", 3: "<pad>"}
        qformer = {0: "<pad>", 1: "<unk>", 2: "<s>", 3: "</s>"}
        processor = InstructBlipProcessor(
            image_processor=BlipImageProcessorPil(
                size={"height": size, "width": size},
                image_mean=CLIPImageProcessorPil().image_mean,
                image_std=CLIPImageProcessorPil().image_std,
            ),
            tokenizer=tokenizer(vocab, names),
            qformer_tokenizer=tokenizer(cfg.qformer_config.vocab_size, qformer, "<s> $A </s>", "right"),
            num_query_tokens=cfg.num_query_tokens,
        )
        kind = "instructblip"
    model.generation_config.eos_token_id = None  # random weights: every row decodes all its tokens
    return LoadedModel(model, processor, kind, f"{args.arch} (random {args.dtype})")


def clip_model(args, vocab_size: int):
    """CLIP ViT-L/14 with random weights over the captioner's words (``--tiny``: narrow), on ``--device``."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from canprobe.models import LoadedModel

    parts = {k: {**v, **(CLIP_TINY if args.tiny else {})} for k, v in CLIP_L.items() if isinstance(v, dict)}
    # eos must not be id 2 (CLIP then pools at the largest id): <s> 3, </s> 4
    names = {0: "<unk>", 1: "<pad>", 3: "<s>", 4: "</s>"}
    parts["text_config"].update(vocab_size=vocab_size, bos_token_id=3, eos_token_id=4, pad_token_id=1)
    config = CLIPConfig(**parts, projection_dim=CLIP_L["projection_dim"])
    torch.manual_seed(1)
    with torch.device(args.device):
        model = CLIPModel(config).to(getattr(torch, args.dtype)).eval()
    size = config.vision_config.image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer(vocab_size, names, "<s> $A </s>", "right"),
    )
    return LoadedModel(model, processor, "clip", f"CLIP ViT-L/14 (random {args.dtype})")


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


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, default=ARCHS[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=None, help="Language layers (default: all 32).")
    parser.add_argument("--tiny", action="store_true", help="1/16 widths and few layers (bench_scale.build).")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--mask", type=int, default=5, help="Neurons masked per evaluated k.")
    parser.add_argument("--scope", default="language.down_proj")
    parser.add_argument("--modes", default="eager,static,compiled")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    figures = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


def run(args) -> dict:
    """Every timing and floor of the module docstring, printed and returned."""
    from PIL import Image
    from torch._dynamo.utils import counters

    from canprobe import features
    from canprobe.evaluation import ClipScorer, MaskEvaluator, PrefixCache, caption_ppl
    from canprobe.sites import SiteRegistry

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    lm = loaded(args)
    clip = clip_model(args, 49408)
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
    layers = lm.model.config.text_config.num_hidden_layers
    tiny = " (tiny)" if args.tiny else ""
    print(f"{args.arch} architecture{tiny}, random {args.dtype} weights, {layers} layers, on {name}")
    figures: dict = {"arch": args.arch, "dtype": args.dtype, "images": args.images, "new_tokens": args.new_tokens}
    # older transformers take no cached image features: then every evaluated k also encodes the images
    figures["features_reused"] = features.supported(lm)
    print(f"  image features encoded once and reused for every mask: {figures['features_reused']}")

    n = len(images)
    generation: dict[str, float] = {}
    captions: dict[str, list[list[str]]] = {}
    for mode in args.modes.split(","):
        ev = MaskEvaluator(lm, images, clip, Generation(max_new_tokens=args.new_tokens, batch_size=n, decoding=mode))
        ev.reserve(s.name for s in registry.select(args.scope))
        graphs = None
        runs, texts = [], []
        for r, mask in enumerate(masks):  # the first one warms up (and compiles)
            seconds = timed(lambda ev=ev, texts=texts, mask=mask: texts.append(ev.masked_captions([mask])[0]), cuda)
            if r == 0:
                graphs = counters["stats"]["unique_graphs"]
                print(f"  {mode:9s} first masked generation (warm-up, compile) {seconds:7.2f} s")
                figures.setdefault("first_generation_s", {})[mode] = seconds
            else:
                runs.append(seconds)
        generation[mode] = statistics.median(runs)
        captions[mode] = texts
        new = counters["stats"]["unique_graphs"] - graphs
        figures.setdefault("graphs_after_warmup", {})[mode] = new
        print(f"  {mode:9s} masked generation {generation[mode]:7.3f} s  (graphs traced after the warm-up: {new})")
        ev.close()
    figures["generation_s"] = generation
    for mode in generation:
        same = sum(a == b for x, y in zip(captions[mode], captions["eager"]) for a, b in zip(x, y))
        total = sum(len(x) for x in captions[mode])
        figures.setdefault("captions_as_eager", {})[mode] = same / total
        print(f"  {mode:9s} {generation['eager'] / generation[mode]:5.2f}x eager; {same}/{total} captions as eager")

    texts = captions[next(iter(captions))][-1]
    rows = Generation(batch_size=n)
    prefix = PrefixCache(lm, images, rows)
    fill = timed(lambda: prefix.fill(), cuda)
    full = statistics.median(timed(lambda: caption_ppl(lm, images, texts, rows), cuda) for _ in range(3))
    cached = statistics.median(timed(lambda: prefix.nll(range(n), texts), cuda) for _ in range(3))
    print(
        f"  PPL: full pass {full:.3f} s, cached prefix {cached:.3f} s => {full / cached:.1f}x "
        f"(the prefix cache costs {fill:.2f} s once)"
    )
    scorer = ClipScorer(clip, n)
    image_features = scorer.image_features(images)  # once per search
    clip_s = statistics.median(timed(lambda: scorer.score(image_features, texts), cuda) for _ in range(3))
    caption_tokens = max(len(t) for t in clip.processor.tokenizer(texts)["input_ids"])
    print(f"  CLIP text pass over {n} captions: {clip_s:.3f} s")
    figures.update(ppl_full_s=full, ppl_cached_s=cached, prefix_fill_s=fill, clip_s=clip_s)

    flops, bandwidth = card_rates(device, lm.model.dtype)
    n_lm = parameters(lm.family.text_model(lm.model))
    head = lm.model.get_output_embeddings().weight
    n_lm += 0 if any(p is head for p in lm.family.text_model(lm.model).parameters()) else head.numel()
    bytes_lm = n_lm * lm.model.dtype.itemsize
    prefix_tokens = prefix._mask[0].shape[-1]
    n_clip = parameters(clip.model.text_model) + parameters(clip.model.text_projection)
    # the image encoder runs once per search (cached features), so only the language model counts per k
    prefill = 2 * n_lm * prefix_tokens * n / flops
    floor_generation = prefill + args.new_tokens * bytes_lm / bandwidth
    floor_ppl = 2 * n_lm * n * (args.new_tokens + 1) / flops + bytes_lm / bandwidth
    floor_clip = 2 * n_clip * n * caption_tokens / flops + n_clip * clip.model.dtype.itemsize / bandwidth
    print(
        f"  card: {flops / 1e12:.0f} TFLOP/s matmul, {bandwidth / 1e12:.2f} TB/s copy; prefix {prefix_tokens} tokens; "
        f"floor: generation {floor_generation:.3f} s (prefill {prefill:.3f} s), cached PPL {floor_ppl:.3f} s, "
        f"CLIP {floor_clip:.4f} s"
    )
    floor = floor_generation + floor_ppl + floor_clip
    figures.update(
        card={"tflops": flops / 1e12, "tbps": bandwidth / 1e12},
        prefix_tokens=prefix_tokens,
        floor_s={
            "generation": floor_generation,
            "prefill": prefill,
            "ppl": floor_ppl,
            "clip": floor_clip,
            "total": floor,
        },
        evaluated_k_s={},
    )
    for mode, seconds in generation.items():
        for ppl_name, ppl in (("full", full), ("cached", cached)):
            k = seconds + ppl + clip_s
            figures["evaluated_k_s"].setdefault(mode, {})[ppl_name] = k
            print(
                f"  evaluated k, {mode} generation + {ppl_name} PPL + CLIP: {k:.3f} s = {k / floor:.2f}x floor "
                f"({floor:.3f} s)"
            )
    return figures


if __name__ == "__main__":
    main()
