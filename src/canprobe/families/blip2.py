"""BLIP-2 (``blip-2``) with an OPT or a (Flan-)T5 language model, and InstructBLIP (``instructblip``)
with (Flan-)T5: a ViT, a Q-Former whose learned queries read the image (BLIP-2's has no instruction
branch), and the language model. OPT's MLP is ``fc2(act(fc1(x)))`` written straight into each
decoder layer.

OPT's sites keep the language scheme: ``up_proj`` is ``fc1``'s output (before the activation, as a
SwiGLU's ``up_proj``), ``down_proj`` is ``fc2``'s output and ``down_proj.input`` its input (the
activated hidden units); T5's ``wi``/``wi_1`` is ``up_proj``, gated ``wi_0`` (through the
activation) ``gate_proj``, ``wo`` ``down_proj``.
"""

from __future__ import annotations

from canprobe.families.base import FC_MLP, Family, SiteKind, get_module
from canprobe.families.instructblip import InstructBlip

OPT_MLP = {
    "up_proj": SiteKind("fc1", "output", "fc1", "out"),
    "down_proj": SiteKind("fc2", "output", "fc2", "out"),
    "down_proj.input": SiteKind("fc2", "input", "fc2", "in"),
}
QFORMER_QUERY = {
    "intermediate_query": SiteKind(
        "intermediate_query.intermediate_act_fn", "output", "intermediate_query.dense", "out"
    ),
    "output_query": SiteKind("output_query.dense", "output", "output_query.dense", "out"),
}


class Blip2(Family):
    name = "blip-2"
    model_types = ("blip-2",)
    default_prompt = "a photo of"
    layer_roots = {
        "language": ("language_model.model.decoder.layers",),
        "vision": ("vision_model.encoder.layers",),
        "qformer": ("qformer.encoder.layer",),
    }
    site_kinds = {"language": OPT_MLP, "vision": FC_MLP, "qformer": QFORMER_QUERY}

    def tokens(self, config, component, text_tokens):
        if component == "qformer":
            return config.num_query_tokens
        if component == "language":
            return config.num_query_tokens + text_tokens
        return super().tokens(config, component, text_tokens)


# T5's feed-forward sublayer (the last of each block): gated ``wo(act(wi_0(x)) * wi_1(x))`` (Flan-T5)
# or dense ``wo(act(wi(x)))`` (the original T5)
T5_GATED = {
    "gate_proj": SiteKind("DenseReluDense.act", "output", "DenseReluDense.wi_0", "out"),
    "up_proj": SiteKind("DenseReluDense.wi_1", "output", "DenseReluDense.wi_1", "out"),
    "down_proj": SiteKind("DenseReluDense.wo", "output", "DenseReluDense.wo", "out"),
    "down_proj.input": SiteKind("DenseReluDense.wo", "input", "DenseReluDense.wo", "in"),
}
T5_DENSE = {
    "up_proj": SiteKind("DenseReluDense.wi", "output", "DenseReluDense.wi", "out"),
    "down_proj": T5_GATED["down_proj"],
    "down_proj.input": T5_GATED["down_proj.input"],
}
T5_STACKS = ("language_model.encoder.block", "language_model.decoder.block")


class T5Language:
    """A (Flan-)T5 language model behind the Q-Former: the instruction and the image queries go to its
    encoder, the caption to its decoder. ``language.layers`` number the encoder's blocks first, then
    the decoder's (with 24 + 24 blocks, ``language.layers.24`` is the decoder's first); each site is the
    block's feed-forward sublayer."""

    encoder_decoder = True

    def matches(self, config) -> bool:
        return bool(getattr(config.text_config, "is_encoder_decoder", False))

    def layer_paths(self, model, component):
        if component != "language":
            return super().layer_paths(model, component)
        stacks = [(root, get_module(model, root)) for root in T5_STACKS]
        if any(blocks is None for _, blocks in stacks):
            return None
        return [f"{root}.{i}.layer.{len(block.layer) - 1}" for root, blocks in stacks for i, block in enumerate(blocks)]

    def kinds(self, model, component):
        if component == "language":
            return T5_GATED if model.config.text_config.is_gated_act else T5_DENSE
        return super().kinds(model, component)

    def text_model(self, model):
        return None  # an encoder-decoder: the caption is decoded, not appended to the prompt

    def encoder_site(self, module_path: str) -> bool:
        return module_path.startswith(f"{T5_STACKS[0]}.")

    def tokens(self, config, component, text_tokens):
        if component == "language":
            return config.num_query_tokens + text_tokens
        return super().tokens(config, component, text_tokens)


class Blip2T5(T5Language, Blip2):
    name = "blip-2-t5"
    layer_roots = {**Blip2.layer_roots, "language": T5_STACKS}


class InstructBlipOpt(InstructBlip):
    """InstructBLIP with an OPT language model (transformers' default config; released checkpoints use
    Vicuna or Flan-T5): checked on the meta device only, so no cached features or prefix continuation."""

    name = "instructblip-opt"
    layer_roots = {**InstructBlip.layer_roots, "language": Blip2.layer_roots["language"]}
    site_kinds = {**InstructBlip.site_kinds, "language": OPT_MLP}

    def matches(self, config) -> bool:
        return getattr(config.text_config, "model_type", None) == "opt"

    def text_model(self, model):
        return None

    def cached_features(self, model):
        return False


class InstructBlipT5(T5Language, InstructBlip):
    name = "instructblip-t5"
    layer_roots = {**InstructBlip.layer_roots, "language": T5_STACKS}

    def cached_features(self, model):
        return False  # its generate from cached features is written for a decoder-only language model
