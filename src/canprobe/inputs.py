"""Model inputs: processor batches for captioning, teacher forcing for losses, inputs on the model's device."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from PIL import Image

from canprobe.errors import InputError
from canprobe.families import Family, named
from canprobe.models import LoadedModel


def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def caption_inputs(lm: LoadedModel, images: list[Image.Image], prompt: str | None = None) -> dict[str, torch.Tensor]:
    """Processor outputs for ``images`` with the family's prompt, on the model's device."""
    family = lm.family
    if not (family.takes_images and family.generates):
        raise InputError(f"{lm.source} is a {family.name} model; captioning needs a vision-language model")
    text = family.prompts(lm.processor, [prompt or family.default_prompt])
    return to_model_inputs(family.inputs(lm.processor, images, text * len(images)), lm.model)


def teacher_forcing_inputs(
    processor,
    family: Family | str,
    images: list[Image.Image] | None,
    captions: list[str],
    prompt: str | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for scoring ``captions`` as continuations of the prompt (images optional for decoders).

    Each row is ``prompt tokens + caption tokens + end token``, right-padded; ``labels`` holds the
    caption and end tokens and -100 elsewhere, so ``model(**inputs).loss`` is the caption NLL and
    ``labels != -100`` marks the positions that carry the loss (shifted by one inside the model).
    """
    family = named(family)
    text = family.prompts(processor, [prompt or family.default_prompt]) * len(captions)
    tok = getattr(processor, "tokenizer", processor)
    enc = family.inputs(processor, images, text)
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


def to_model_inputs(enc: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Inputs on the model's device, floating ones in its dtype (anything but a tensor passes through)."""
    p = next(model.parameters())
    return {
        k: (v.to(p.device, dtype=p.dtype) if v.is_floating_point() else v.to(p.device))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in enc.items()
    }
