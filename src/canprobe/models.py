"""Loading models by built-in name, local path or hub id, each with its family (``canprobe.families``).

Every model, the shipped organisms included, goes through ``from_pretrained`` with the
transformers Auto classes, so the code path that handles ``toy-llava`` is the one that handles
``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from canprobe.errors import ModelLoadError
from canprobe.families import Family, attach, family_for, named
from canprobe.faults import DTYPES

if TYPE_CHECKING:
    from canprobe.config import Model

log = logging.getLogger(__name__)

ORGANISM_DIR = Path(__file__).parent / "organisms" / "weights"
BUILTIN_MODELS = ("toy-llava", "toy-instructblip", "toy-clip")


@dataclass
class LoadedModel:
    """A model with its processor (or tokenizer, for text-only models) and family.

    ``family``: a ``Family`` or a family's name (``llava``, ``decoder``, ...).
    """

    model: torch.nn.Module
    processor: object
    family: Family | str
    source: str

    def __post_init__(self):
        self.family = named(self.family)

    @property
    def kind(self) -> str:
        """The family's name, for messages."""
        return self.family.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @cached_property
    def fingerprint(self) -> str:
        """The weights' fingerprint, part of every artifact's identity (``canprobe.identity``)."""
        from canprobe.identity import weights_fingerprint

        return weights_fingerprint(self.model)


def resolve_model_path(name_or_path: str) -> str:
    """Map a built-in name to its shipped folder; pass local paths and hub ids through."""
    if name_or_path in BUILTIN_MODELS:
        path = ORGANISM_DIR / name_or_path
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"built-in model {name_or_path} is missing from {ORGANISM_DIR}; "
                f"train it with: canprobe organisms train {name_or_path}"
            )
        return str(path)
    if Path(name_or_path).exists():
        if not (Path(name_or_path) / "config.json").exists():
            raise ModelLoadError(f"{name_or_path} is not a model folder (no config.json in it)")
        return name_or_path
    if "/" not in name_or_path:
        raise ModelLoadError(
            f"unknown model {name_or_path!r}: built-in models are {', '.join(BUILTIN_MODELS)}; "
            "otherwise give a local checkpoint folder or a hub id like llava-hf/llava-1.5-7b-hf (needs network)"
        )
    return name_or_path


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (its type where it has none), for one-line messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    sites: str | Path | None = None,
) -> LoadedModel:
    """Load a model and its processor in eval mode with frozen weights.

    ``sites``: a site file (``canprobe.families.sitefile``) for a model with no adapter; its
    family is attached to the model.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load {name_or_path!r}: {str(exc).splitlines()[0]} "
            f"(built-in models: {', '.join(BUILTIN_MODELS)}; hub ids need network access)"
        ) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{name_or_path} needs custom code from its repository; rerun with --trust-remote-code if you trust it"
            ) from None
        raise ModelLoadError(f"cannot read the config of {name_or_path!r}: {exc}") from None
    if sites is not None:
        from canprobe.families.sitefile import read_site_file

        family = read_site_file(sites)
    else:
        family = family_for(config)
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    # the organisms load in milliseconds: a progress bar would only be noise (restore the caller's choice)
    quiet = name_or_path in BUILTIN_MODELS and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        model = family.model_class().from_pretrained(path, **kwargs)
        processor = family.load_processor(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ModelLoadError(f"cannot load {name_or_path!r}: {first_line(exc)}") from None
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    if device_map is None and device is not None:
        model.to(device)
    model.eval().requires_grad_(False)
    if sites is not None:
        attach(model, family)
    log.info("loaded %s (%s, %s family, %s)", name_or_path, config.model_type, family.name, dtype)
    return LoadedModel(model, processor, family, name_or_path)


def load(model: Model) -> LoadedModel:
    """The model a ``Model`` section names, loaded as it says (``load_model``)."""
    return load_model(
        model.model,
        dtype=model.dtype,
        device=model.device,
        device_map=model.device_map,
        trust_remote_code=model.trust_remote_code,
        sites=model.sites,
    )
