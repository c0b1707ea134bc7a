"""Batched greedy captioning with each model family's own prompt format.

This is the generation path that masking wraps: anything active on the model while
``generate_captions`` runs (hooks, masks) applies to prompt encoding and to every generated token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from canprobe import runfolder
from canprobe.config import Generation
from canprobe.data import ImageSet
from canprobe.errors import InputError
from canprobe.features import generate as generate_from_features
from canprobe.inputs import caption_inputs, check_prompt_fits
from canprobe.models import LoadedModel


@dataclass(frozen=True)
class CaptionRecord:
    image: str
    category: str
    caption: str
    reference: str | None = None


@torch.no_grad()
def generate_captions(
    lm: LoadedModel,
    inputs: Sequence[Image.Image | str],
    generation: Generation = Generation(),
    features: Sequence[torch.Tensor] | None = None,
    encoded: Sequence[dict[str, torch.Tensor]] | None = None,
) -> list[str]:
    """Greedy captions, one per input (an image, or a text that a text-only model continues), in order.

    ``generation``: the prompt, the length limit, the inputs per batch and the decoding: ``eager``
    (a growing KV cache), ``static`` (a KV cache of fixed size, transformers' static cache) or
    ``compiled`` (the static cache with the decoding step compiled, where transformers supports it:
    CUDA devices; elsewhere it decodes eagerly). The captions are the same either way. A compiled
    step is traced with the hooks then active and, unlike torch's default, checks them at every
    call, so a mask added or removed later retraces instead of running stale (``StandingMasks``
    avoids the retracing). ``features``: one cached image encoding per image (``canprobe.features``);
    the image encoder is then skipped and the images only shape the prompt. ``encoded``: the
    processor's outputs for each batch, made earlier by ``caption_inputs`` (a caller that captions
    the same images again need not process them again).
    """
    max_new_tokens, batch_size, prompt = generation.max_new_tokens, generation.batch_size, generation.prompt
    tok = lm.tokenizer
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id)
    if generation.decoding != "eager":
        options["cache_implementation"] = "static"
    options["disable_compile"] = generation.decoding != "compiled"
    captions: list[str] = []
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size]
            enc = caption_inputs(lm, batch, prompt) if encoded is None else encoded[start // batch_size]
            check_prompt_fits(lm, enc["input_ids"].shape[1], max_new_tokens)
            if features is None:
                out = lm.model.generate(**enc, **options)
            else:
                out = generate_from_features(lm, enc, features[start : start + batch_size], **options)
            prompt_len = enc["input_ids"].shape[1]
            # decoder-style generate returns prompt + continuation; keep only the continuation
            if out.shape[1] >= prompt_len and torch.equal(out[:, :prompt_len], enc["input_ids"]):
                out = out[:, prompt_len:]
            captions += [c.strip() for c in tok.batch_decode(out, skip_special_tokens=True)]
    return captions


def caption_image_set(
    lm: LoadedModel, image_set: ImageSet, generation: Generation = Generation()
) -> list[CaptionRecord]:
    texts = generate_captions(lm, image_set.images, generation)
    return [CaptionRecord(r.name, r.category, t, r.caption) for r, t in zip(image_set.records, texts)]


def write_captions(records: list[CaptionRecord], path: Path) -> None:
    """JSON lines, one record per image, each stamped with its format, written atomically."""
    runfolder.write_jsonl(path, (runfolder.stamped(asdict(r)) for r in records))


def read_captions(path: Path) -> list[CaptionRecord]:
    """The records of a ``canprobe caption`` file, of this format or an earlier one (a newer one is refused)."""
    records = []
    for n, entry in enumerate(runfolder.read_jsonl(path), 1):
        where = f"{path}:{n}"
        runfolder.check_format(entry.get(runfolder.FORMAT_KEY) if isinstance(entry, dict) else None, where)
        try:
            records.append(CaptionRecord(entry["image"], entry["category"], entry["caption"], entry.get("reference")))
        except (KeyError, TypeError):
            raise InputError(
                f"{where} is not a caption record (image, category, caption); the file is damaged"
            ) from None
    return records


def exact_match_rate(records: list[CaptionRecord]) -> float | None:
    scored = [r for r in records if r.reference is not None]
    if not scored:
        return None
    return sum(r.caption == r.reference for r in scored) / len(scored)
