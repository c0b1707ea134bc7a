"""Plain decoder language models with a SwiGLU MLP (``llama``, ``mistral``, ``qwen2``, ``qwen3``,
``gemma2``, ``gemma3_text``: Gemma's activation is a tanh GELU, its sites the same): no images;
they continue the given texts, and collapse is judged on the texts alone."""

from __future__ import annotations

from canprobe.families.base import Family
from canprobe.families.structure import FromStructure


class Decoder(FromStructure, Family):
    name = "decoder"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
    auto_class = "AutoModelForCausalLM"
    takes_images = False
    encoder_inputs = ()

    def tokens(self, config, component, text_tokens):
        return text_tokens
