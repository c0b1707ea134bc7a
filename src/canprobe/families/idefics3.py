"""Idefics3 (``idefics3``; SmolVLM checkpoints are of this type): a SigLIP-style ViT over image crops
(up to a grid of crops plus the whole image, per image), a pixel-shuffle connector with one linear
(no projector sites) and a Llama decoder."""

from __future__ import annotations

import torch

from canprobe.families.base import FC_MLP, SWIGLU, Family, chat_prompts


class Idefics3(Family):
    name = "idefics3"
    model_types = ("idefics3",)
    layer_roots = {
        "language": ("model.text_model.layers",),
        "vision": ("model.vision_model.encoder.layers",),
    }
    site_kinds = {"language": SWIGLU, "vision": FC_MLP}
    encoder_inputs = ("pixel_values", "pixel_attention_mask")

    def prompts(self, processor, prompts):
        return chat_prompts(processor, prompts)

    def inputs(self, processor, images, texts):
        return dict(processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True))

    def vision_rows(self, model, enc):
        """Per crop the model encodes, 1 / the crops of its sample: the model drops all-zero padding crops."""
        pixels = enc["pixel_values"]
        real = (pixels != 0).flatten(2).any(dim=-1)  # [samples, crops]
        counts = real.sum(dim=1).tolist()
        return torch.cat([torch.full((c,), 1.0 / c) for c in counts])

    def tokens(self, config, component, text_tokens):
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        if component == "vision":
            return 5 * patches  # a 2 x 2 grid of crops and the whole image
        return 5 * patches // config.scale_factor**2 + text_tokens
