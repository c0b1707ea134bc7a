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
- which rows of a vision activation belong to which sample (``vision_rows``), where an image's rows
  sit on its grid of patches (``patch_grid``), and the sequence length per component that
  ``--dry-run`` assumes (``tokens``).

Nothing outside ``canprobe.families`` branches on a family's name: code asks the family.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from canprobe.errors import InputError

log = logging.getLogger(__name__)

READINGS = ("output", "input")


@dataclass(frozen=True)
class SiteKind:
    """What a neuron of one site kind is, relative to one layer (or to the projector module).

    ``module``: path inside the layer of the module whose ``reading`` ("output" or "input") holds the
    neurons in its last dimension. ``weight``: the linear layer whose rows (``axis="out"``) or columns
    (``axis="in"``) belong to the neurons; its size along that axis is the number of neurons.
    ``part`` of ``parts``: the neurons are that slice of the weight's axis, cut in ``parts`` equal
    slices, for linears that compute several things at once (Phi-3's ``gate_up_proj``: the gate
    units, then the up units); where the reading is wider than the site, the same slice of it.
    ``weight=""``: no one linear owns the neurons (a mixture of experts' output channels); ``size``
    gives their number, and faults and methods that edit or read weights refuse the site.
    ``experts``: the module (an experts module's ``act_fn``) computes the units of that many routed
    experts at once, in rows grouped by expert id; the kind then has one site per expert (``sites``).
    """

    module: str
    reading: str
    weight: str
    axis: str
    part: int = 0
    parts: int = 1
    size: int = 0
    experts: int = 0

    def __post_init__(self):
        if self.reading not in READINGS or self.axis not in ("out", "in"):
            raise ValueError(f"bad site kind {self}: reading is output or input, axis is out or in")
        if not 0 <= self.part < self.parts:
            raise ValueError(f"bad site kind {self}: part is one of 0 .. parts - 1")


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


@dataclass(frozen=True)
class PatchGrid:
    """Where one image's activation rows sit on its patches: row i covers cell ``cells[i]`` of a
    ``shape`` grid (row-major), or no cell (-1: a class token, a crop or row break beyond the grid)."""

    shape: tuple[int, int]
    cells: torch.Tensor

    @classmethod
    def square(cls, side: int, rows: int, leading: int = 0) -> PatchGrid:
        """``leading`` rows that are no patch (class tokens), then a ``side`` x ``side`` grid row by row,
        then rows beyond it (none of the grid's)."""
        cells = torch.full((rows,), -1, dtype=torch.long)
        n = max(0, min(side * side, rows - leading))
        cells[leading : leading + n] = torch.arange(n)
        return cls((side, side), cells)


class Family:
    """One architecture family. Subclasses set the class attributes and override what differs."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    auto_class: str = "AutoModelForImageTextToText"  # attribute of ``transformers``
    takes_images: bool = True  # captions images (False: a text-only LM, continues texts)
    generates: bool = True  # False: a contrastive image-text scorer (CLIP), never probed
    # the language model is an encoder-decoder (T5): the prompt goes to the encoder, the text being
    # written (and scored) to the decoder
    encoder_decoder: bool = False
    default_prompt: str = "Describe the image briefly."
    layer_roots: Mapping[str, tuple[str, ...]] = {}
    site_kinds: Mapping[str, Mapping[str, SiteKind]] = {}
    # processor outputs only the image encoder reads: dropped from a call that gets cached features
    encoder_inputs: tuple[str, ...] = ("pixel_values",)

    def matches(self, config) -> bool:
        """Whether a model of one of ``model_types`` with this config is this family's (variants of a
        type, e.g. BLIP-2 with OPT or with T5, are told apart here); the first family that matches wins."""
        return True

    def kinds(self, model: torch.nn.Module, component: str) -> Mapping[str, SiteKind]:
        """The site kinds of a component of this model (``site_kinds``, unless they differ by model)."""
        return self.site_kinds.get(component, {})

    def components(self, model: torch.nn.Module) -> list[str]:
        """The components of this model that have sites, in forward order."""
        return list(self.layer_roots)

    def layer_kinds(self, model: torch.nn.Module, component: str, layer: int) -> Mapping[str, SiteKind]:
        """The site kinds of one layer (``kinds``, unless layers differ: dense and expert layers of one model)."""
        return self.kinds(model, component)

    def encoder_site(self, module_path: str) -> bool:
        """Whether a language site reads the prompt in an encoder (T5's) rather than the text being written."""
        return False

    def __repr__(self) -> str:
        return f"<family {self.name}: {', '.join(self.model_types)}>"

    # --- loading ---

    def load_processor(self, path: str, trust_remote_code: bool = False):
        """The processor (or, for text-only models, the tokenizer) saved beside the checkpoint."""
        import transformers

        if self.takes_images:
            return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if tok.pad_token is None:  # Llama-style tokenizers ship none; batches of texts need one
            tok.pad_token = tok.eos_token
        return tok

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def layer_paths(self, model: torch.nn.Module, component: str) -> list[str] | None:
        """Paths of the component's layers in model order (the projector: its one module), from the
        first candidate root the model has; None when it has none."""
        for root in self.layer_roots[component]:
            found = get_module(model, root)
            if found is not None:
                return [root] if component == "projector" else [f"{root}.{i}" for i in range(len(found))]
        return None

    # --- prompts and inputs ---

    places_image: bool = True  # the family's format puts the image in: a user's image token is refused

    def prompt(self, processor, prompt: str | None) -> str:
        """The user's instruction (the family's default when none) wrapped by ``prompts``, the image in it once.

        An instruction that writes the image token itself (``<image>``, typed by habit from model cards)
        would place a second image the processor cannot fill: it is refused with one line.
        """
        text = prompt or self.default_prompt
        if self.takes_images and self.places_image:
            token = next((t for t in image_tokens(processor) if t in text), None)
            if token is not None:
                raise InputError(
                    f"the prompt {text!r} holds the image token {token!r}: canprobe places the image itself, once, "
                    f"where {self.name} models expect it; give only the instruction, e.g. {self.default_prompt!r}"
                )
        return self.prompts(processor, [text])[0]

    def prompts(self, processor, prompts: Sequence[str]) -> list[str]:
        """Each instruction wrapped the way the model was trained to see it (as given, by default)."""
        return list(prompts)

    def inputs(self, processor, images, texts: list[str]) -> dict[str, torch.Tensor]:
        """Processor outputs (CPU tensors) for already wrapped ``texts`` and their ``images``.

        Text-only models: the tokenizer, left-padded when the texts differ (generation appends on the right).
        """
        if not self.takes_images:
            tok = getattr(processor, "tokenizer", processor)
            if len(set(texts)) == 1:
                return dict(tok(texts, return_tensors="pt"))
            return dict(tok(texts, return_tensors="pt", padding=True, padding_side="left"))
        return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))

    def continue_tokens(self, key: str, value: torch.Tensor, width: int) -> torch.Tensor:
        """A per-token input ``value`` [rows, prompt, ...] widened to ``width`` tokens for appended text.

        By default each appended token repeats the prompt's last token (a text token), as
        ``generate`` extends token types and cross-attention masks.
        """
        extra = value[:, -1:].expand(value.shape[0], width - value.shape[1], *value.shape[2:])
        return torch.cat([value, extra], dim=1)

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

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The module that continues a cached prompt prefix from token ids (``canprobe.evaluation.PrefixCache``);
        None: PPL passes always run over the whole prompt (the default, until a family is checked)."""
        return None

    # --- scoring positions and dry-run token counts ---

    def vision_rows(self, model: torch.nn.Module, enc: dict) -> torch.Tensor:
        """Per row of a vision-tower activation, the weight of that row in its sample (1 / crops)."""
        return torch.ones(enc["input_ids"].shape[0])

    def patch_grid(self, model: torch.nn.Module, enc: dict, component: str, image: int, rows: int) -> PatchGrid | None:
        """Where the ``rows`` activation rows of image ``image`` of a processor batch sit on its patches.

        ``component``: "language" (the image's image-token rows, in order), "vision" or "projector" (its
        rows of that component; of its first crop when it has several). None: the rows are no patches
        (learned queries) or their layout is unknown. By default a ViT's rows: the square patch grid of
        the vision config, after a class token when there is one more row than patches.
        """
        vision = getattr(model.config, "vision_config", None)
        if component != "vision" or vision is None or not getattr(vision, "patch_size", None):
            return None
        side = vision.image_size // vision.patch_size
        return PatchGrid.square(side, rows, rows - side * side) if rows - side * side in (0, 1) else None

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


NOT_FOR_IMAGES = ("video_processor",)  # processor parts that transformers builds on torchvision


def image_only_processor(cls: type) -> type:
    """``cls``, a processor class that takes a video processor, as one that takes none.

    transformers builds video processors on torchvision, and checks the video processor's class even
    when none is given, so where torchvision cannot be imported such a processor cannot be built at
    all, although captioning images never uses its video part. The subclass keeps ``cls``'s name
    (what ``save_pretrained`` records, so ``AutoProcessor`` reads the folder back as ``cls``) and its
    other arguments (what ``save_pretrained`` writes to processor_config.json).
    """
    import inspect

    signature = inspect.signature(cls.__init__)
    dropped = dict.fromkeys(n for n in signature.parameters if n in NOT_FOR_IMAGES)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(
            self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **dropped, **kwargs
        )
        for name in dropped:  # code paths that look for the part (SmolVLM's) find none
            if not hasattr(self, name):
                setattr(self, name, None)

    __init__.__signature__ = signature.replace(
        parameters=[p for name, p in signature.parameters.items() if name not in NOT_FOR_IMAGES]
    )
    return type(cls.__name__, (cls, _without_video()), {"__init__": __init__, "__module__": cls.__module__})


def _without_video():
    from transformers.processing_utils import ProcessorMixin

    class WithoutVideo(ProcessorMixin):
        """Between a processor class and ``ProcessorMixin``: drops the video part its ``__init__`` hands on by
        keyword (Gemma 4's), which the mixin would refuse as an argument the subclass does not take."""

        def __init__(self, *args, **kwargs):
            for name in NOT_FOR_IMAGES:
                if name in kwargs and kwargs[name] is None:
                    del kwargs[name]
            super().__init__(*args, **kwargs)

    return WithoutVideo


class ImagesOnly:
    """Mixin for families whose processor holds a video processor, which transformers builds on torchvision.

    Where torchvision is not installed, or does not import against this torch (a CUDA build beside a
    CPU torch), the processor is built from its image processor, tokenizer and chat template, with
    the settings of processor_config.json, and one log line says so.
    """

    processor_class: str = ""  # the transformers processor class

    def load_processor(self, path: str, trust_remote_code: bool = False):
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            try:
                return super().load_processor(path, trust_remote_code)
            except (ImportError, RuntimeError) as exc:
                reason = f"torchvision does not load ({(str(exc).splitlines() or [type(exc).__name__])[0]})"
        else:
            reason = "torchvision is not installed"
        return processor_for_images(path, self.processor_class, reason)


def pil_image_processor(name: str) -> type:
    """The PIL image processor class ``name``, imported from its own module (5.6's top-level name for some,
    Idefics2's, insists on torchvision although the class does not use it)."""
    import importlib
    from pathlib import Path

    import transformers

    for file in sorted((Path(transformers.__file__).parent / "models").glob("*/image_processing_pil_*.py")):
        if f"class {name}(" in file.read_text():
            return getattr(importlib.import_module(f"transformers.models.{file.parent.name}.{file.stem}"), name)
    raise ImportError(f"this transformers has no image processor {name}")


def processor_for_images(path: str, processor_class: str, reason: str):
    """The processor saved at ``path`` built from its image processor, tokenizer and chat template alone
    (``processor_class``: its class; empty: the one processor_config.json names), with one log line."""
    import json
    from pathlib import Path

    import transformers
    from transformers.utils import cached_file

    def read(name: str) -> str | None:
        file = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        return Path(file).read_text() if file else None

    settings = json.loads(read("processor_config.json") or "{}")
    processor_class = processor_class or settings.get("processor_class", "")
    log.info("%s: the %s is built without its video processor", reason, processor_class)
    parts = ("processor_class", "image_processor", "video_processor", "feature_extractor")
    kwargs = {k: v for k, v in settings.items() if k not in parts}
    if "feature_extractor" in settings:  # an audio part (Gemma 4's), built on numpy
        kwargs["feature_extractor"] = transformers.AutoFeatureExtractor.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    template = read("chat_template.jinja") or json.loads(read("chat_template.json") or "{}").get("chat_template")
    try:
        images = transformers.AutoImageProcessor.from_pretrained(path)
    except ImportError:  # releases (5.6) whose Auto class insists on torchvision: the PIL twin of the saved class
        saved = settings.get("image_processor") or json.loads(read("preprocessor_config.json") or "{}")
        images = pil_image_processor(f"{saved['image_processor_type'].removesuffix('Fast')}Pil").from_pretrained(path)
    return image_only_processor(getattr(transformers, processor_class))(
        images,
        tokenizer,
        chat_template=template or getattr(tokenizer, "chat_template", None),
        **kwargs,
    )


def patch_rows(enc: dict) -> torch.Tensor:
    """Per patch of a flattened vision sequence (every image's patches in turn, ``image_grid_thw`` giving
    each image's count), 1 / the number of patches of its image."""
    counts = enc["image_grid_thw"].prod(dim=-1).tolist()
    return torch.cat([torch.full((c,), 1.0 / c) for c in counts])


def chat(prompts: Sequence[str]) -> list[list[dict]]:
    """Each instruction as a conversation of one user turn holding one image."""
    return [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts]


def image_tokens(processor) -> list[str]:
    """The texts a processor expands into an image's positions (its image token, Gemma 3's begin-of-image)."""
    tok = getattr(processor, "tokenizer", None)
    found = [getattr(processor, "image_token", None), getattr(processor, "boi_token", None)]
    found.append(getattr(tok, "image_token", None))
    return list(dict.fromkeys(t for t in found if isinstance(t, str) and t))


def chat_prompts(processor, prompts: Sequence[str]) -> list[str]:
    """Each instruction as one user turn holding one image, through the processor's chat template."""
    return [processor.apply_chat_template(m, add_generation_prompt=True) for m in chat(prompts)]


def get_module(model: torch.nn.Module, path: str):
    """The submodule at a dotted path (digits index into lists), or None."""
    obj = model
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, (list, tuple, torch.nn.ModuleList, torch.nn.Sequential)):
            obj = obj[int(part)] if int(part) < len(obj) else None
        else:
            obj = getattr(obj, part, None)  # also a digit-named child of a ModuleDict; nothing else indexes
        if obj is None:
            return None
    return obj
