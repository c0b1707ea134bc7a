"""Model families: one module per architecture behind one interface (``base.Family``), found by ``config.model_type``.

``family_for(model_or_config)`` is the only dispatch on a model's type in canprobe. A
vision-language model with no adapter (a type of transformers' image-text-to-text table) gets the
``structure`` family, which reads its sites from the module tree (``structure``). Any other model
can still be probed through a declarative site file (``sitefile``, ``--sites FILE``); the family it
defines is attached to the loaded model, and ``family_for`` returns it first.
Adding a family = one module here defining a ``Family`` subclass, listed in ``FAMILIES``: only
for what the structure cannot tell (cached image features, crops, encoder-decoders, odd layouts).
"""

from __future__ import annotations

from canprobe.errors import UnsupportedModelError
from canprobe.families.base import Family, SiteKind
from canprobe.families.blip2 import Blip2, Blip2T5, InstructBlipOpt, InstructBlipT5
from canprobe.families.clip import Clip
from canprobe.families.decoder import Decoder
from canprobe.families.gemma import Gemma3, PaliGemma
from canprobe.families.idefics3 import Idefics3
from canprobe.families.instructblip import InstructBlip
from canprobe.families.llava import Llava
from canprobe.families.mllama import Mllama
from canprobe.families.onevision import LlavaOnevision
from canprobe.families.phi3 import Phi3
from canprobe.families.qwen_vl import Qwen2VL, Qwen3VL, Qwen25VL
from canprobe.families.structure import KINDS, STRUCTURED

FAMILIES: tuple[Family, ...] = (
    Llava(),
    LlavaOnevision(),
    InstructBlipT5(),
    InstructBlipOpt(),
    InstructBlip(),
    Blip2T5(),
    Blip2(),
    Qwen2VL(),
    Qwen25VL(),
    Qwen3VL(),
    PaliGemma(),
    Gemma3(),
    Idefics3(),
    Mllama(),
    Decoder(),
    Phi3(),
    Clip(),
)
# model type -> its families, the first whose ``matches(config)`` holds is the model's
BY_MODEL_TYPE: dict[str, tuple[Family, ...]] = {}
for _family in FAMILIES:
    for _type in _family.model_types:
        BY_MODEL_TYPE[_type] = (*BY_MODEL_TYPE.get(_type, ()), _family)
BY_NAME: dict[str, Family] = {f.name: f for f in (*FAMILIES, STRUCTURED)}
ATTRIBUTE = "canprobe_family"  # where a loaded model carries a family given by a site file

__all__ = ["FAMILIES", "Family", "SiteKind", "family_for", "known_kinds", "named", "attach", "supported_types"]


def supported_types() -> list[str]:
    """Model types with an adapter that can be probed (CLIP only scores captions)."""
    return sorted(t for t, fs in BY_MODEL_TYPE.items() if any(f.generates for f in fs))


def _unsupported(model_type: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"no adapter for model type {model_type!r}; supported: {', '.join(supported_types())}, and any "
        "vision-language type of transformers' image-text-to-text table, read from its structure; "
        "for another architecture, describe its neuron sites in a YAML file and pass --sites FILE"
    )


def family_for(model_or_config) -> Family:
    """The family of a model (or of its config), by ``config.model_type``; a site file's family first."""
    attached = getattr(model_or_config, ATTRIBUTE, None)
    if isinstance(attached, Family):
        return attached
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None) or type(model_or_config).__name__
    family = next((f for f in BY_MODEL_TYPE.get(model_type, ()) if f.matches(config)), None)
    if family is not None:
        return family
    if model_type in image_text_types():
        return STRUCTURED
    raise _unsupported(model_type)


def image_text_types() -> tuple[str, ...]:
    """The model types of the installed transformers' image-text-to-text table (what ``structure`` may read)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return tuple(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def named(family: Family | str) -> Family:
    """A family object, from itself or from its name (``llava``, ``instructblip``, ``decoder``, ...)."""
    if isinstance(family, Family):
        return family
    if family not in BY_NAME:
        raise UnsupportedModelError(f"no model family named {family!r}; families: {', '.join(BY_NAME)}")
    return BY_NAME[family]


def attach(model, family: Family) -> None:
    """Make ``family_for(model)`` return ``family`` (a site file's family for a model with no adapter)."""
    setattr(model, ATTRIBUTE, family)


def known_kinds(component: str) -> list[str]:
    """Every site kind some family defines for ``component`` (what an address may name)."""
    adapters = (k for f in FAMILIES for k in f.site_kinds.get(component, {}))
    return list(dict.fromkeys((*adapters, *KINDS.get(component, ()))))
