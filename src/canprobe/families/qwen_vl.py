"""Qwen2-VL (``qwen2_vl``), Qwen2.5-VL (``qwen2_5_vl``) and Qwen3-VL (``qwen3_vl``): a ViT over the
flattened patches of all images of a batch, a patch merger (the projector) and a Qwen decoder with
multimodal rotary positions.

The vision tower's activations have no batch dimension: one sequence holds the patches of every
image in turn (``image_grid_thw`` gives each image's count), and the merger folds each 2 x 2 group
of neighbouring patches into one image token. Qwen2-VL's vision MLP is ``fc2(act(fc1(x)))``,
Qwen2.5-VL's a SwiGLU with biases, Qwen3-VL's ``linear_fc2(act_fn(linear_fc1(x)))``.
"""

from __future__ import annotations

import torch

from canprobe.families.base import Family, ImagesOnly, PatchGrid, chat_prompts, patch_rows
from canprobe.families.structure import FromStructure


class Qwen2VL(ImagesOnly, FromStructure, Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    processor_class = "Qwen2VLProcessor"
    encoder_inputs = ("pixel_values", "image_grid_thw")

    def prompts(self, processor, prompts):
        return chat_prompts(processor, prompts)

    def vision_rows(self, model, enc):
        return patch_rows(enc)

    def patch_grid(self, model, enc, component, image, rows):
        """Image tokens and merger rows: one per ``m`` x ``m`` group of patches, row by row over the merged grid.
        Vision rows: the patches of each group in turn (the processor orders them so), groups row by row."""
        t, h, w = (int(v) for v in enc["image_grid_thw"][image])
        m = model.config.vision_config.spatial_merge_size
        if component != "vision":
            return PatchGrid((h // m, w // m), torch.arange(rows) % (h // m * w // m))
        index = torch.arange(rows) % (h * w)
        group, inside = index // (m * m), index % (m * m)
        r = group // (w // m) * m + inside // m
        c = group % (w // m) * m + inside % m
        return PatchGrid((h, w), r * w + c)

    def tokens(self, config, component, text_tokens):
        vision = config.vision_config
        patches = (448 // vision.patch_size) ** 2  # a 448 x 448 image, the processors' usual size
        if component == "vision":
            return patches
        merged = patches // vision.spatial_merge_size**2
        return merged if component == "projector" else merged + text_tokens


class Qwen25VL(Qwen2VL):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    processor_class = "Qwen2_5_VLProcessor"


class Qwen3VL(Qwen2VL):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    processor_class = "Qwen3VLProcessor"
