"""The interface every model family implements, and the parts most families share.

A family is what canprobe knows about one architecture (one or more ``config.model_type``):

- which transformers Auto class loads it and whether it reads images;
- where its layers are (``layer_roots``: candidate paths per component, older and current
  transformers layouts) and what a neuron is in them (``site_kinds``: per component, per kind, the
  module read, whether its output or its input, and the linear whose rows or columns are the
  neurons); addresses keep one scheme (``language.layers.N.mlp.down_proj:J``) whatever the
  family calls its modules;
- how the user's instruction is wrapped (``prompts``) and turned into model inputs (``inputs``);
- optionally, how image features are encoded once and fed back in place of pixels
  (``cached_features`` says whether the installed transformers supports it, decided once per model);
- which rows of a vision activation belong to which sample (``vision_rows``), and the sequence
  length per component that ``--dry-run`` assumes (``tokens``).

Nothing outside ``canprobe.families`` branches on a family's name: code asks the family.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

READINGS = ("output", "input")


@dataclass(frozen=True)
class SiteKind:
    """What a neuron of one site kind is, relative to one layer (or to the projector module).

    ``module``: path inside the layer of the module whose ``reading`` ("output" or "input") holds the
    neurons in its last dimension. ``weight``: the linear layer whose rows (``axis="out"``) or columns
    (``axis="in"``) belong to the neurons; its size along that axis is the number of neurons.
    """

    module: str
    reading: str
    weight: str
    axis: str

    def __post_init__(self):
        if self.reading not in READINGS or self.axis not in ("out", "in"):
            raise ValueError(f"bad site kind {self}: reading is output or input, axis is out or in")


# the neurons of a SwiGLU language MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))``
SWIGLU = {
    "gate_proj": SiteKind("mlp.act_fn", "output", "mlp.gate_proj", "out"),
    "up_proj": SiteKind("mlp.up_proj", "output", "mlp.up_proj", "out"),
    "down_proj": SiteKind("mlp.down_proj", "output", "mlp.down_proj", "out"),
    "down_proj.input": SiteKind("mlp.down_proj", "input", "mlp.down_proj", "in"),
}
# the neurons of a two-layer vision MLP, ``fc2(act(fc1(x)))`` (CLIP, SigLIP, EVA ViTs)
FC_MLP = {
    "fc1": SiteKind("mlp.activation_fn", "output", "mlp.fc1", "out"),
    "fc2": SiteKind("mlp.fc2", "output", "mlp.fc2", "out"),
}


class Family:
    """One architecture family. Subclasses set the class attributes and override what differs."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    auto_class: str = "AutoModelForImageTextToText"  # attribute of ``transformers``
    takes_images: bool = True  # captions images (False: a text-only LM, continues texts)
    generates: bool = True  # False: a contrastive image-text scorer (CLIP), never probed
    default_prompt: str = "Describe the image briefly."
    layer_roots: Mapping[str, tuple[str, ...]] = {}
    site_kinds: Mapping[str, Mapping[str, SiteKind]] = {}
    # processor outputs only the image encoder reads: dropped from a call that gets cached features
    encoder_inputs: tuple[str, ...] = ("pixel_values",)

    def __repr__(self) -> str:
        return f"<family {self.name}: {', '.join(self.model_types)}>"

    # --- loading ---

    def load_processor(self, path: str, trust_remote_code: bool = False):
        """The processor (or, for text-only models, the tokenizer) saved beside the checkpoint."""
        import transformers

        loader = transformers.AutoProcessor if self.takes_images else transformers.AutoTokenizer
        return loader.from_pretrained(path, trust_remote_code=trust_remote_code)

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    # --- prompts and inputs ---

    def prompts(self, processor, prompts: Sequence[str]) -> list[str]:
        """Each instruction wrapped the way the model was trained to see it (as given, by default)."""
        return list(prompts)

    def inputs(self, processor, images, texts: list[str]) -> dict[str, torch.Tensor]:
        """Processor outputs (CPU tensors) for already wrapped ``texts`` and their ``images``."""
        if not self.takes_images:
            tok = getattr(processor, "tokenizer", processor)
            return dict(tok(texts, return_tensors="pt"))
        return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))

    # --- cached image features ---

    def cached_features(self, model: torch.nn.Module) -> bool:
        """Whether image features can be encoded once and fed back in place of pixels on this model."""
        return False

    def encode_images(self, model: torch.nn.Module, enc: dict) -> list[torch.Tensor]:
        """Per image of a processor batch, what the language model receives in place of its image tokens."""
        raise NotImplementedError(f"{self.name} has no cached image features")

    def feature_inputs(self, model: torch.nn.Module, text: dict, rows: tuple[torch.Tensor, ...]) -> dict:
        """Model-call inputs from the batch's text inputs and one cached encoding per row."""
        raise NotImplementedError(f"{self.name} has no cached image features")

    def generate_from_features(self, model: torch.nn.Module, text: dict, rows: tuple[torch.Tensor, ...], **options):
        """``generate`` fed cached features: by default, ``generate`` of ``feature_inputs``."""
        return model.generate(**self.feature_inputs(model, text, rows), **options)

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module that continues a cached prompt prefix from token ids (``canprobe.evaluation.PrefixCache``)."""
        return model

    # --- scoring positions and dry-run token counts ---

    def vision_rows(self, model: torch.nn.Module, enc: dict) -> torch.Tensor:
        """Per row of a vision-tower activation, the weight of that row in its sample (1 / crops)."""
        return torch.ones(enc["input_ids"].shape[0])

    def tokens(self, config, component: str, text_tokens: int) -> int:
        """Sequence length per sample of ``component`` for one image and ``text_tokens`` text tokens."""
        vision = getattr(config, "vision_config", None)
        patches = (vision.image_size // vision.patch_size) ** 2 if vision is not None else 0
        if component == "vision":
            return patches + 1
        if component == "projector":
            return patches
        return getattr(config, "image_seq_length", patches) + text_tokens


def validates_mm_encoder_outputs(model: torch.nn.Module) -> bool:
    """Whether this transformers takes ``mm_encoder_outputs`` (pre-encoded images) in forward AND in generate.

    Asked of the installed code, not of a version string: the forward must name the argument and
    generate's own keyword validation must let it through (releases before it was threaded through
    generation reject it there with "model_kwargs are not used by the model").
    """
    import inspect

    if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
        return False
    validate = getattr(model, "_validate_model_kwargs", None)
    if validate is None:
        return False
    try:
        validate({"mm_encoder_outputs": {}})
    except ValueError:
        return False
    return True
