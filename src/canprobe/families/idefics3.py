"""Idefics3 (``idefics3``; SmolVLM checkpoints are of this type): a SigLIP-style ViT over image crops
(up to a grid of crops plus the whole image, per image), a pixel-shuffle connector with one linear
(no projector sites) and a Llama decoder."""

from __future__ import annotations

from pathlib import Path

import torch

from canprobe.families.base import Family, PatchGrid, chat_prompts
from canprobe.families.structure import FromStructure


class Idefics3(FromStructure, Family):
    name = "idefics3"
    model_types = ("idefics3",)
    encoder_inputs = ("pixel_values", "pixel_attention_mask")

    def load_processor(self, path: str, trust_remote_code: bool = False):
        """Releases whose AutoImageProcessor has no idefics3 entry (5.6) get the processor from its parts."""
        try:
            return super().load_processor(path, trust_remote_code)
        except ValueError as exc:
            if "Unrecognized image processor" not in str(exc):
                raise
        import json

        import transformers
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
        from transformers.utils import cached_file

        settings = json.loads(Path(cached_file(path, "processor_config.json")).read_text())
        images = {k: v for k, v in settings.pop("image_processor").items() if k != "image_processor_type"}
        template = cached_file(path, "chat_template.jinja", _raise_exceptions_for_missing_entries=False)
        return transformers.Idefics3Processor(
            Idefics3ImageProcessorPil(**images),
            transformers.AutoTokenizer.from_pretrained(path),
            chat_template=Path(template).read_text() if template else None,
            **{k: v for k, v in settings.items() if k != "processor_class"},
        )

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

    def patch_grid(self, model, enc, component, image, rows):
        """Image tokens: the whole image's come last, after its crops' (which get no cell: the processor keeps
        how they tile the image to itself), one per ``scale_factor`` x ``scale_factor`` block of its patches, row
        by row (the connector's pixel shuffle). Vision rows (the first crop's): the ViT's grid when that crop is
        the whole image, none when the image was split."""
        cfg = model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        if component == "language":
            n = side // cfg.scale_factor
            return PatchGrid.square(n, rows, max(0, rows - n * n))
        crops = int((enc["pixel_values"][image] != 0).flatten(1).any(dim=-1).sum())
        return super().patch_grid(model, enc, component, image, rows) if crops == 1 else None

    def tokens(self, config, component, text_tokens):
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        if component == "vision":
            return 5 * patches  # a 2 x 2 grid of crops and the whole image
        return 5 * patches // config.scale_factor**2 + text_tokens
