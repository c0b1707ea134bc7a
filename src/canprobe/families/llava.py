"""LLaVA-1.5 (``llava``) and LLaVA-NeXT (``llava_next``): a CLIP-style vision tower, a two-layer
projector and a Llama/Mistral/Vicuna language model."""

from __future__ import annotations

import torch

from canprobe.families.base import (
    Family,
    PatchGrid,
    chat_prompts,
    validates_mm_encoder_outputs,
)
from canprobe.families.structure import FromStructure

# the LLaVA-1.5 conversation format, for processors saved without a chat template
FALLBACK_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


class Llava(FromStructure, Family):
    name = "llava"
    model_types = ("llava", "llava_next")
    encoder_inputs = ("pixel_values", "image_sizes")

    def prompts(self, processor, prompts):
        """The processor's chat template with one image (llava-hf checkpoints ship one); the 1.5
        format ``USER: <image>\\n... ASSISTANT:`` when a processor has none."""
        if getattr(processor, "chat_template", None):
            return chat_prompts(processor, prompts)
        return [FALLBACK_TEMPLATE.format(prompt=p) for p in prompts]

    def text_model(self, model):
        return model  # text-only continuation: no image tokens, plain 1-D positions

    def cached_features(self, model):
        return validates_mm_encoder_outputs(model)

    @torch.no_grad()
    def encode_images(self, model, enc):
        cfg = model.config
        extra = {"image_sizes": enc["image_sizes"]} if "image_sizes" in enc else {}
        out = model.get_image_features(
            pixel_values=enc["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
            **extra,
        )
        return [f.detach() for f in out.pooler_output]

    def feature_inputs(self, model, text, rows):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # LLaVA concatenates a sequence of per-image features
        return {**text, "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=rows)}}

    def vision_rows(self, model, enc):
        """LLaVA-NeXT tiles each image into crops: every crop of a sample weighs 1 / its crop count."""
        n = enc["input_ids"].shape[0]
        cfg = model.config
        if "image_sizes" not in enc or not getattr(cfg, "image_grid_pinpoints", None):
            return torch.ones(n)
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        counts = [
            image_size_to_num_patches(size.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for size in enc["image_sizes"]
        ]
        return torch.cat([torch.full((c,), 1.0 / c) for c in counts])

    def patch_grid(self, model, enc, component, image, rows):
        """Image tokens and projector rows are the vision tower's patches (after its class token with the
        ``full`` feature strategy); LLaVA-NeXT's image tokens start with the whole image's grid, then crops."""
        if component == "vision":
            return super().patch_grid(model, enc, component, image, rows)
        cfg = model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        return PatchGrid.square(side, rows, int(cfg.vision_feature_select_strategy == "full"))
