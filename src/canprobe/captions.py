"""Batched greedy captioning with each model family's own prompt format.

This is the generation path that masking wraps: anything active on the model while
``generate_captions`` runs (hooks, masks) applies to prompt encoding and to every generated token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from canprobe import runfolder
from canprobe.config import default
from canprobe.data import ImageSet
from canprobe.errors import InputError
from canprobe.models import LoadedModel
from canprobe.prompts import DEFAULT_PROMPTS, build_prompts


@dataclass(frozen=True)
class CaptionRecord:
    image: str
    category: str
    caption: str
    reference: str | None = None


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def caption_inputs(lm: LoadedModel, images: list[Image.Image], prompt: str | None = None) -> dict[str, torch.Tensor]:
    """Processor outputs for ``images`` with the family's prompt, on the model's device."""
    if lm.kind not in ("llava", "instructblip"):
        raise InputError(f"{lm.source} is a {lm.kind} model; captioning needs a vision-language model")
    text = build_prompts(lm.processor, lm.kind, [prompt or DEFAULT_PROMPTS[lm.kind]])
    enc = lm.processor(images=images, text=text * len(images), return_tensors="pt", padding=True)
    dtype = next(lm.model.parameters()).dtype
    return {k: v.to(lm.device, dtype=dtype) if v.is_floating_point() else v.to(lm.device) for k, v in enc.items()}


def teacher_forcing_inputs(
    processor, kind: str, images: list[Image.Image] | None, captions: list[str], prompt: str | None = None
) -> dict[str, torch.Tensor]:
    """Model inputs for scoring ``captions`` as continuations of the prompt (images optional for decoders).

    Each row is ``prompt tokens + caption tokens + end token``, right-padded; ``labels`` holds the
    caption and end tokens and -100 elsewhere, so ``model(**inputs).loss`` is the caption NLL and
    ``labels != -100`` marks the positions that carry the loss (shifted by one inside the model).
    """
    text = build_prompts(processor, kind, [prompt or DEFAULT_PROMPTS[kind]]) * len(captions)
    tok = getattr(processor, "tokenizer", processor)
    if kind == "decoder":
        enc = dict(tok(text, return_tensors="pt"))
    else:
        enc = dict(processor(images=images, text=text, return_tensors="pt", padding=True))
    caption_ids = tok(list(captions), add_special_tokens=False)["input_ids"]
    prompt_ids = enc["input_ids"]
    n, p = prompt_ids.shape
    width = p + max(len(c) for c in caption_ids) + 1
    ids = torch.full((n, width), tok.pad_token_id if tok.pad_token_id is not None else 0, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    ids[:, :p] = prompt_ids
    mask[:, :p] = enc["attention_mask"]
    for i, c in enumerate(caption_ids):
        seq = torch.tensor(c + [tok.eos_token_id], dtype=torch.long)
        ids[i, p : p + len(seq)] = seq
        labels[i, p : p + len(seq)] = seq
        mask[i, p : p + len(seq)] = 1
    enc.update(input_ids=ids, attention_mask=mask, labels=labels)
    return enc


@torch.no_grad()
def generate_captions(
    lm: LoadedModel,
    images: list[Image.Image],
    prompt: str | None = None,
    max_new_tokens: int = default("max_new_tokens"),
    batch_size: int = default("batch_size"),
    features: Sequence[torch.Tensor] | None = None,
) -> list[str]:
    """Greedy captions, one per image, in order.

    ``features``: one cached image encoding per image (``canprobe.features``); the image encoder is
    then skipped and the images only shape the prompt.
    """
    if max_new_tokens <= 0 or batch_size <= 0:
        raise InputError("max new tokens and batch size must be positive")
    tok = lm.tokenizer
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id)
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        enc = caption_inputs(lm, images[start : start + batch_size], prompt)
        if features is None:
            out = lm.model.generate(**enc, **options)
        else:
            from canprobe import features as cached

            out = cached.generate(lm, enc, features[start : start + batch_size], **options)
        prompt_len = enc["input_ids"].shape[1]
        # decoder-style generate returns prompt + continuation; keep only the continuation
        if out.shape[1] >= prompt_len and torch.equal(out[:, :prompt_len], enc["input_ids"]):
            out = out[:, prompt_len:]
        captions += [c.strip() for c in tok.batch_decode(out, skip_special_tokens=True)]
    return captions


def caption_image_set(lm: LoadedModel, image_set: ImageSet, **kwargs) -> list[CaptionRecord]:
    texts = generate_captions(lm, image_set.images, **kwargs)
    return [CaptionRecord(r.name, r.category, t, r.caption) for r, t in zip(image_set.records, texts)]


def write_captions(records: list[CaptionRecord], path: Path) -> None:
    """JSON lines, one record per image, written atomically."""
    runfolder.write_jsonl(path, (asdict(r) for r in records))


def exact_match_rate(records: list[CaptionRecord]) -> float | None:
    scored = [r for r in records if r.reference is not None]
    if not scored:
        return None
    return sum(r.caption == r.reference for r in scored) / len(scored)
