"""PaliGemma (``paligemma``) and Gemma 3 (``gemma3``): a SigLIP vision tower, a one-linear projector
(no projector sites: its outputs are the language model's image embeddings) and a Gemma decoder.

PaliGemma reads its prompt as a bidirectional prefix (``token_type_ids`` 0) and the text it writes
causally (1); Gemma 3 marks its image tokens (``token_type_ids`` 1) so they attend to each other.
"""

from __future__ import annotations

import math

import torch

from canprobe.families.base import Family, PatchGrid, chat_prompts
from canprobe.families.structure import FromStructure


class PaliGemma(FromStructure, Family):
    name = "paligemma"
    model_types = ("paligemma",)
    default_prompt = "caption en"

    def prompts(self, processor, prompts):
        """The image token, then the instruction (no chat template): the processor expands the image
        token, puts BOS after it and a newline after the instruction."""
        return [getattr(processor, "image_token", "<image>") + p for p in prompts]

    def inputs(self, processor, images, texts):
        enc = super().inputs(processor, images, texts)
        enc.pop("labels", None)  # the processor marks the prompt as not scored: no use without a suffix
        return enc

    def continue_tokens(self, key, value, width):
        if key == "token_type_ids":  # the text after the prefix is read causally, as generate does
            return torch.cat([value, value.new_ones(value.shape[0], width - value.shape[1])], dim=1)
        return super().continue_tokens(key, value, width)

    def patch_grid(self, model, enc, component, image, rows):
        """Image tokens: one per SigLIP patch, row by row (the projector is one linear per patch)."""
        if component != "language":
            return super().patch_grid(model, enc, component, image, rows)
        vision = model.config.vision_config
        return PatchGrid.square(vision.image_size // vision.patch_size, rows)

    def tokens(self, config, component, text_tokens):
        patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        return patches if component == "vision" else patches + text_tokens + 1


class Gemma3(FromStructure, Family):
    name = "gemma3"
    model_types = ("gemma3",)

    def prompts(self, processor, prompts):
        return chat_prompts(processor, prompts)

    def inputs(self, processor, images, texts):
        # the processor groups images per sample: one list of one image per text
        return dict(processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True))

    def patch_grid(self, model, enc, component, image, rows):
        """Image tokens: the projector average-pools the SigLIP patches to ``mm_tokens_per_image`` tokens, a
        square grid row by row; with pan and scan, the whole image's tokens come first (its crops' get no cell)."""
        if component != "language":
            return super().patch_grid(model, enc, component, image, rows)
        return PatchGrid.square(math.isqrt(model.config.mm_tokens_per_image), rows)

    def tokens(self, config, component, text_tokens):
        patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        return patches if component == "vision" else config.mm_tokens_per_image + text_tokens
