"""LLaVA-OneVision (``llava_onevision``): a SigLIP vision tower over a grid of image crops, LLaVA's
two-layer projector and a Qwen2 language model."""

from __future__ import annotations

from canprobe.families.base import ImagesOnly
from canprobe.families.llava import Llava


class LlavaOnevision(ImagesOnly, Llava):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    encoder_inputs = ("pixel_values", "image_sizes", "batch_num_images")
    processor_class = "LlavaOnevisionProcessor"

    def text_model(self, model):
        return None  # not yet checked against the full pass

    def cached_features(self, model):
        return False  # its image encoding takes more than LLaVA's (batch_num_images, the aspect-ratio rule)
