"""Model inputs: processor batches for captioning (and whether they fit the context), teacher forcing for
losses, inputs on the model's device."""

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


def is_texts(items) -> bool:
    """Whether generation inputs are texts to continue (a text-only model's) rather than images."""
    return bool(items) and all(isinstance(x, str) for x in items)


def caption_inputs(lm: LoadedModel, images: list[Image.Image] | list[str], prompt: str | None = None) -> dict:
    """Processor outputs for ``images`` with the family's prompt, on the model's device.

    A text-only model continues texts instead: ``images`` then holds the texts, left-padded.
    """
    family = lm.family
    if not family.generates or family.takes_images == is_texts(images):
        what = "a text-only model: it continues texts" if not family.takes_images else f"a {family.name} model"
        raise InputError(f"{lm.source} is {what}; captioning images needs a vision-language model")
    if family.takes_images:
        text = [family.prompt(lm.processor, prompt)] * len(images)
        return to_model_inputs(family.inputs(lm.processor, images, text), lm.model)
    return to_model_inputs(family.inputs(lm.processor, None, list(images)), lm.model)


def context_length(lm: LoadedModel) -> int | None:
    """How many positions the language model was trained on (None when its config does not say)."""
    config = lm.model.config
    return getattr(getattr(config, "text_config", config), "max_position_embeddings", None)


def check_prompt_fits(lm: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    """Prompt (image tokens included) plus the caption to generate must fit the model's context."""
    limit = context_length(lm)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise InputError(
            f"the prompt takes {prompt_tokens} tokens (image tokens included) and max new tokens adds "
            f"{max_new_tokens}: {prompt_tokens + max_new_tokens} exceed the {limit}-token context of {lm.source}; "
            "shorten the prompt or lower max new tokens"
        )


def check_context(lm: LoadedModel, image: Image.Image | str, prompt: str | None, max_new_tokens: int) -> None:
    """``check_prompt_fits`` for one image (or a text-only model's text), before any work (captions of
    longer prompts would be garbage)."""
    check_prompt_fits(lm, caption_inputs(lm, [image], prompt)["input_ids"].shape[1], max_new_tokens)


def teacher_forcing_inputs(
    processor,
    family: Family | str,
    images: list[Image.Image] | list[str] | None,
    captions: list[str],
    prompt: str | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for scoring ``captions`` as continuations of the prompt (images optional for decoders).

    Each row is ``prompt tokens + caption tokens + end token``, right-padded; ``labels`` holds the
    caption and end tokens and -100 elsewhere, so ``model(**inputs).loss`` is the caption NLL and
    ``labels != -100`` marks the positions that carry the loss (shifted by one inside the model).
    For an encoder-decoder language model (T5) the prompt stays the encoder's input, and the decoder
    reads ``decoder_input_ids`` (the pad token, T5's start token, then the caption) and predicts
    ``labels`` at the same positions (no shift). For a text-only family, ``images`` may hold one
    text per row that replaces the prompt (the text a continuation continues); texts of different
    lengths are left-padded and get ``position_ids`` that count from each row's first token.
    """
    family = named(family)
    tok = getattr(processor, "tokenizer", processor)
    if not family.takes_images and is_texts(images):
        enc = family.inputs(processor, None, list(images))
    else:
        text = [family.prompt(processor, prompt)] * len(captions)
        enc = family.inputs(processor, images if family.takes_images else None, text)
    caption_ids = tok(list(captions), add_special_tokens=False)["input_ids"]
    if family.encoder_decoder:
        return {**enc, **_decoder_inputs(caption_ids, tok.pad_token_id, tok.eos_token_id)}
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
    for key, value in enc.items():  # per-token inputs besides the ids (token types, cross-attention masks)
        if key not in ("input_ids", "attention_mask") and value.shape[:2] == (n, p):
            enc[key] = family.continue_tokens(key, value, width)
    enc.update(input_ids=ids, attention_mask=mask, labels=labels)
    if not family.takes_images and not bool(enc["attention_mask"][:, 0].all()):  # left-padded texts
        enc["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return enc


def forced_batches(
    lm: LoadedModel, images: list, captions: list[str], prompt: str | None, batch_size: int
) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor]]:
    """Per batch of ``images``, (index of its first image, teacher-forcing inputs of prompt + caption on the
    CPU without their ``labels``, the labels): for passes that read activations rather than the loss."""
    for start in range(0, len(images), batch_size):
        enc = teacher_forcing_inputs(
            lm.processor, lm.family, images[start : start + batch_size], captions[start : start + batch_size], prompt
        )
        yield start, enc, enc.pop("labels")


def _decoder_inputs(caption_ids: list[list[int]], pad: int, eos: int) -> dict[str, torch.Tensor]:
    n, width = len(caption_ids), max(len(c) for c in caption_ids) + 1
    labels = torch.full((n, width), -100, dtype=torch.long)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(caption_ids):
        seq = torch.tensor(c + [eos], dtype=torch.long)
        labels[i, : len(seq)] = seq
        ids[i, 1 : len(seq)] = seq[:-1]
        mask[i, : len(seq)] = 1
    return {"decoder_input_ids": ids, "decoder_attention_mask": mask, "labels": labels}


def to_model_inputs(enc: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Inputs on the model's device, floating ones in its dtype (anything but a tensor passes through)."""
    p = next(model.parameters())
    return {
        k: (v.to(p.device, dtype=p.dtype) if v.is_floating_point() else v.to(p.device))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in enc.items()
    }
