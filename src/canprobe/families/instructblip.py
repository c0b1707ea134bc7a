"""InstructBLIP (``instructblip``): an EVA ViT, a Q-Former reading the instruction, and a
Vicuna language model fed the Q-Former's query outputs."""

from __future__ import annotations

import torch

from canprobe.families.base import FC_MLP, SWIGLU, Family, SiteKind, validates_mm_encoder_outputs


class InstructBlip(Family):
    name = "instructblip"
    model_types = ("instructblip",)
    default_prompt = "Write a short caption for this image."
    layer_roots = {
        "language": ("language_model.model.layers", "language_model.layers"),
        "vision": ("vision_model.encoder.layers",),
        "qformer": ("qformer.encoder.layer",),
    }
    site_kinds = {
        "language": SWIGLU,
        "vision": FC_MLP,
        "qformer": {
            "intermediate": SiteKind("intermediate.intermediate_act_fn", "output", "intermediate.dense", "out"),
            "output": SiteKind("output.dense", "output", "output.dense", "out"),
            "intermediate_query": SiteKind(
                "intermediate_query.intermediate_act_fn", "output", "intermediate_query.dense", "out"
            ),
            "output_query": SiteKind("output_query.dense", "output", "output_query.dense", "out"),
        },
    }
    encoder_inputs = ("pixel_values", "qformer_input_ids", "qformer_attention_mask")

    # the instruction goes in as it is: the processor adds the query tokens

    def text_model(self, model):
        return model.language_model  # the top model re-encodes pixels; its language model continues a prefix

    def cached_features(self, model):
        return validates_mm_encoder_outputs(model)

    @torch.no_grad()
    def encode_images(self, model, enc):
        out = model.get_image_features(
            enc["pixel_values"],
            qformer_input_ids=enc["qformer_input_ids"],
            qformer_attention_mask=enc["qformer_attention_mask"],
            return_dict=True,
        )
        return [f.detach() for f in out.pooler_output]

    def feature_inputs(self, model, text, rows):
        from transformers.models.instructblip.modeling_instructblip import BaseModelOutputWithVisionQformerOutputs

        image = BaseModelOutputWithVisionQformerOutputs(pooler_output=torch.stack(rows))
        return {**text, "pixel_values": None, "qformer_input_ids": None, "mm_encoder_outputs": {"image": image}}

    def generate_from_features(self, model, text, rows, **options):
        """InstructBLIP's generate always re-encodes; this is its code path with the encoding taken out."""
        input_ids = text["input_ids"]
        embeds = model.get_input_embeddings()(input_ids)
        rows = torch.stack([f.to(embeds.device, embeds.dtype) for f in rows])
        embeds = embeds.masked_scatter(model.get_placeholder_mask(input_ids, inputs_embeds=embeds), rows)
        return model.language_model.generate(
            inputs_embeds=embeds, attention_mask=text["attention_mask"], input_ids=input_ids, **options
        )

    def tokens(self, config, component, text_tokens):
        if component == "qformer":
            return config.num_query_tokens + text_tokens // 4
        if component == "language":
            return config.num_query_tokens + text_tokens
        return super().tokens(config, component, text_tokens)
