"""Mllama (``mllama``, Llama 3.2 Vision): a tiled ViT (a local encoder, then a global one), and a
Llama decoder whose cross-attention layers read the image; every decoder layer, cross-attention
layers included, has the same SwiGLU MLP.

The vision layers are numbered through both encoders: ``vision.layers.0`` to ``L-1`` are the local
encoder's, ``L`` on the global encoder's.
"""

from __future__ import annotations

from canprobe.families.base import FC_MLP, SWIGLU, Family, chat_prompts, get_module

VISION_ENCODERS = ("model.vision_model.transformer.layers", "model.vision_model.global_transformer.layers")


class Mllama(Family):
    name = "mllama"
    model_types = ("mllama",)
    layer_roots = {
        "language": ("model.language_model.layers", "language_model.model.layers"),
        "vision": VISION_ENCODERS,
    }
    site_kinds = {"language": SWIGLU, "vision": FC_MLP}
    encoder_inputs = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")

    def layer_paths(self, model, component):
        if component != "vision":
            return super().layer_paths(model, component)
        roots = [(root, get_module(model, root)) for root in VISION_ENCODERS]
        if any(layers is None for _, layers in roots):
            return None
        return [f"{root}.{i}" for root, layers in roots for i in range(len(layers))]

    def prompts(self, processor, prompts):
        return chat_prompts(processor, prompts)

    def inputs(self, processor, images, texts):
        return dict(processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True))

    def tokens(self, config, component, text_tokens):
        vision = config.vision_config
        patches = vision.max_num_tiles * ((vision.image_size // vision.patch_size) ** 2 + 1)
        return patches if component == "vision" else text_tokens
