"""A run's identity: everything that changes its results, and nothing that does not.

Every artifact records the identity it was made under, and nothing is reused across identities.
Identity holds the model's name and a fingerprint of its weights, the dtype, a digest of the
images' pixels (so a folder of other images under the same file names is not mistaken for the
old one), and the settings that change numbers (scope, method, alpha, reduction, loss text,
prompt, max new tokens, criterion, fault, seed). ``SETTINGS`` marks those that only
change how fast or where a run goes (``identity=False``): device, device map, batch size (one
prompt and same-size images, so no padding differs), gradient checkpointing, feature reuse,
decoding, k values per round, and how many sample captions are kept.

The weights fingerprint is a SHA-256 over every parameter and buffer's name, shape and 64 values
sampled at even strides (as float32), computed on the loaded model: it costs milliseconds on the
organisms and well under a second on a 7B model, needs no files (hub and local checkpoints alike),
and tells apart any two trainings or checkpoints. A change confined to unsampled values would go
unseen; the config (shapes, names) and the sample catch every retraining and every other model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from canprobe.errors import InputError

SAMPLES_PER_TENSOR = 64


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits that change when any model's weights do (see the module docstring)."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        count = min(SAMPLES_PER_TENSOR, flat.numel())
        index = torch.linspace(0, flat.numel() - 1, count, device=flat.device).long()
        digest.update(flat[index].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def images_fingerprint(images: Sequence[Image.Image]) -> str:
    """16 hex digits over the decoded pixels of every image, in order."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()[:16]


def texts_fingerprint(texts: Sequence[str] | None) -> str | None:
    return None if texts is None else hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def identity(record: Mapping[str, Any], settings: Mapping[str, Any] | None = None) -> dict:
    """The fields of ``record`` that decide results, as plain JSON values (nested mappings flattened).

    Inside a ``config`` mapping, keys are setting names (unique across sections, so nesting is
    dropped: ``config.criterion.collapse_ppl_ratio`` and ``config.collapse_ppl_ratio`` are one
    field; a setting recorded under a former name reads as today's), and the settings that
    ``settings`` (``canprobe.config.SETTINGS``) marks as no part of the identity are left out.
    """
    settings = settings or {}
    former = {old: name for name, s in settings.items() for old in getattr(s, "former", ())}
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any, config: bool) -> None:
        if not isinstance(value, Mapping):
            flat[prefix.rstrip(".")] = value
            return
        for key, item in value.items():
            if key == "format" and not prefix:
                continue  # the artifact format of run.json (canprobe.runfolder), not a setting of the run
            key = former.get(key, key) if config else key  # a setting recorded under its former name
            setting = settings.get(key) if config else None
            if setting is not None and not setting.identity:
                continue
            if config and isinstance(item, Mapping):
                walk(prefix, item, True)
            else:
                walk(f"{prefix}{key}.", item, config or key == "config")

    walk("", json.loads(json.dumps(record)), False)
    return flat


def differences(
    previous: Mapping[str, Any], current: Mapping[str, Any], settings: Mapping[str, Any] | None = None
) -> list[str]:
    """'field (was A, now B)' for each field whose value differs between two identities.

    A setting of ``settings`` that ``previous`` lacks was added by a later release: it reads as its
    default, the value every earlier run had.
    """
    before, after = identity(previous, settings), identity(current, settings)
    for key in after.keys() - before.keys():
        name = key.removeprefix("config.")
        if name != key and name in (settings or {}):
            before[key] = json.loads(json.dumps(settings[name].default))
    return [
        f"{key} (was {_short(before.get(key))}, now {_short(after.get(key))})"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]


def check_same(what: str, previous: Mapping[str, Any], current: Mapping[str, Any], remedy: str) -> None:
    """Raise InputError naming the first fields that differ, and how to start over."""
    changed = differences(previous, current)
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise InputError(f"{what} differs in {'; '.join(changed[:3])}{more}; {remedy}")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
