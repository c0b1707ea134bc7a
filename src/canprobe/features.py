"""Image features computed once per image and reused under every mask that cannot change them.

A mask on the language model leaves the vision tower, the projector and the Q-Former untouched, so
the features they hand to the language model are the same for every such mask. Scoring and search
over language scopes encode each image once and feed the cached features to every masked caption
and every loss pass: LLaVA takes them through transformers' ``mm_encoder_outputs``; InstructBLIP
gets them scattered into the language model's ``inputs_embeds``, exactly as its own ``generate``
does. A mask on a vision, projector or Q-Former site changes the features: ``reusable`` says no.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch
from PIL import Image

from canprobe.inputs import caption_inputs
from canprobe.models import LoadedModel

# inputs the image encoder reads; with cached features they are dropped from the model call
ENCODER_INPUTS = ("pixel_values", "image_sizes", "qformer_input_ids", "qformer_attention_mask")
SUPPORTED_TYPES = ("llava", "instructblip")
ENCODER_COMPONENTS = ("vision", "projector", "qformer")


def reusable(lm: LoadedModel, site_names: Iterable[str]) -> bool:
    """Whether cached image features stay valid under masks of these sites (language sites only)."""
    if lm.model.config.model_type not in SUPPORTED_TYPES:
        return False
    if "mm_encoder_outputs" not in inspect.signature(lm.model.forward).parameters:
        return False  # transformers before pre-encoded image inputs: encode every time
    return not any(name.split(".", 1)[0] in ENCODER_COMPONENTS for name in site_names)


@torch.no_grad()
def encode(lm: LoadedModel, enc: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per image of a processor batch, what the language model receives in place of its image tokens."""
    model = lm.model
    if lm.kind == "llava":
        cfg = model.config
        out = model.get_image_features(
            pixel_values=enc["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
    else:
        out = model.get_image_features(
            enc["pixel_values"],
            qformer_input_ids=enc["qformer_input_ids"],
            qformer_attention_mask=enc["qformer_attention_mask"],
            return_dict=True,
        )
    return [f.detach() for f in out.pooler_output]


def model_inputs(lm: LoadedModel, enc: dict[str, torch.Tensor], features: Sequence[torch.Tensor]) -> dict:
    """Model-call inputs for a batch whose rows use ``features`` (one entry per row) instead of pixels."""
    text = {k: v for k, v in enc.items() if k not in ENCODER_INPUTS}
    param = next(lm.model.parameters())
    rows = tuple(f.to(param.device, param.dtype) for f in features)
    if lm.kind == "llava":  # LLaVA concatenates a sequence of per-image features
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {**text, "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=rows)}}
    from transformers.models.instructblip.modeling_instructblip import BaseModelOutputWithVisionQformerOutputs

    image = BaseModelOutputWithVisionQformerOutputs(pooler_output=torch.stack(rows))
    return {**text, "pixel_values": None, "qformer_input_ids": None, "mm_encoder_outputs": {"image": image}}


@torch.no_grad()
def generate(lm: LoadedModel, enc: dict[str, torch.Tensor], features: Sequence[torch.Tensor], **kwargs):
    """``generate`` from cached features: the same tokens as the model's own generate on the pixels."""
    if lm.kind == "llava":
        return lm.model.generate(**model_inputs(lm, enc, features), **kwargs)
    # InstructBLIP's generate always re-encodes; this is its code path with the encoding taken out
    model, input_ids = lm.model, enc["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    rows = torch.stack([f.to(embeds.device, embeds.dtype) for f in features])
    embeds = embeds.masked_scatter(model.get_placeholder_mask(input_ids, inputs_embeds=embeds), rows)
    return model.language_model.generate(
        inputs_embeds=embeds, attention_mask=enc["attention_mask"], input_ids=input_ids, **kwargs
    )


class FeatureCache:
    """Features of a fixed image list under one prompt, encoded in batches the first time they are asked for."""

    def __init__(self, lm: LoadedModel, images: Sequence[Image.Image], prompt: str | None, batch_size: int):
        self.lm, self.images, self.prompt, self.batch_size = lm, list(images), prompt, batch_size
        self._features: list[torch.Tensor] | None = None
        self.encoded = 0  # images run through the encoder (a benchmark and test counter)

    def rows(self, image_ids: Sequence[int]) -> list[torch.Tensor]:
        if self._features is None:
            feats: list[torch.Tensor] = []
            for start in range(0, len(self.images), self.batch_size):
                batch = self.images[start : start + self.batch_size]
                feats += [f.cpu() for f in encode(self.lm, caption_inputs(self.lm, batch, self.prompt))]
                self.encoded += len(batch)
            self._features = feats
        return [self._features[i] for i in image_ids]
