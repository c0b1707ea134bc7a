"""The experiment configuration: one validated dataclass, read from YAML and/or command-line flags.

Everything is checked before any model loads: unknown keys, wrong types, out-of-range values,
missing image folders, and categories without images each fail with one line naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from canprobe.ablation import ABLATION_KINDS
from canprobe.errors import InputError
from canprobe.faults import PROTECTIONS, check_fault
from canprobe.scoring import SCORE_METHODS

CONTROLS = ("random", "activation", "mean")


@dataclass
class ExperimentConfig:
    """A whole CAN study on one model: score, search k* per (scope, category), controls, stability.

    Robustness (``canprobe.robustness``, on the pooled images): ``faults`` (fault specs) each get k*
    with the CAN, activation-only and random rankings; ``protections`` (protect_top, range) each get
    the collapse rate under ``fault_trials`` random draws of ``fault_counts`` neurons with ``random_fault``.
    """

    model: str
    images: str
    out: str = "canprobe-run"
    annotations: str | None = None
    categories: list[str] | None = None
    images_per_category: int | None = None
    prompt: str | None = None
    method: str = "can"
    alpha: float = 1.0
    reduction: str = "loss"
    loss_text: str = "self"
    scopes: list[str] = field(default_factory=lambda: ["language.down_proj", "language.gate_proj"])
    per_category: bool = True
    pooled: bool = True
    ablation: str = "zero"
    faults: list[str] = field(default_factory=list)
    protections: list[str] = field(default_factory=list)
    random_fault: str = "bitflip"
    fault_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    fault_trials: int = 4
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    split_half: bool = True
    ppl_scorer: str = "unmasked"
    clip_model: str | None = None
    max_new_tokens: int = 20
    batch_size: int = 16
    collapse_ppl_ratio: float = 100.0
    collapse_clip_ratio: float = 0.5
    stage1_ppl_ratio: float = 2.0
    stage1_clip_ratio: float = 0.9
    seed: int = 0
    dtype: str = "float32"
    device: str | None = None
    device_map: str | None = None
    gradient_checkpointing: bool = False
    reuse_features: bool = True

    def __post_init__(self) -> None:
        _check_types(self)
        choices = {
            "method": SCORE_METHODS,
            "reduction": ("loss", "all"),
            "loss_text": ("self", "reference"),
            "ablation": ABLATION_KINDS,
            "dtype": ("float32", "bfloat16", "float16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"config field {name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for control in self.controls:
            if control not in CONTROLS:
                raise InputError(f"config field controls: {control!r} is not one of {', '.join(CONTROLS)}")
        for spec in [*self.faults, self.random_fault]:
            check_fault(spec, self.dtype)
        for protection in self.protections:
            if protection not in PROTECTIONS:
                raise InputError(f"config field protections: {protection!r} is not one of {', '.join(PROTECTIONS)}")
        if not self.fault_counts or any(n <= 0 for n in self.fault_counts) or self.fault_trials <= 0:
            raise InputError("config fields fault_counts and fault_trials: give positive counts and trials")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"config field alpha: {self.alpha} is outside [0, 1]")
        for name in ("max_new_tokens", "batch_size", "images_per_category"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"config field {name}: must be positive, got {value}")
        if not self.scopes:
            raise InputError("config field scopes: give at least one scope, e.g. language.down_proj")
        if not self.per_category and not self.pooled:
            raise InputError("config fields per_category and pooled are both false: nothing to search")
        if self.collapse_ppl_ratio <= 1 or self.stage1_ppl_ratio <= 1:
            raise InputError("config fields collapse_ppl_ratio and stage1_ppl_ratio must be above 1")
        for name in ("collapse_clip_ratio", "stage1_clip_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise InputError(f"config field {name}: must be between 0 and 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


_HINTS = typing.get_type_hints(ExperimentConfig)


def _check_types(config: ExperimentConfig) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, _HINTS[f.name]):
            want = str(_HINTS[f.name]).replace("typing.", "")
            raise InputError(f"config field {f.name}: expected {want}, got {type(value).__name__} {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            raise InputError(f"config field {f.name}: must be a finite number, got {value}")
        if isinstance(value, int) and _HINTS[f.name] in (float, float | None):
            setattr(config, f.name, float(value))


def config_fields() -> dict[str, object]:
    """Field name -> type annotation, for building command-line flags."""
    return dict(_HINTS)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (also on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: Path | str) -> dict:
    """Parse a YAML config safely (no object tags) into a plain mapping."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    from canprobe.data import read_text_file

    try:
        data = yaml.load(read_text_file(path), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise InputError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def make_config(values: dict) -> ExperimentConfig:
    """Build and validate a config from a mapping; unknown and missing keys are named."""
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    for key in values:
        if key not in known:
            raise InputError(f"unknown config field {key!r}; known fields: {', '.join(sorted(known))}")
    for required in ("model", "images"):
        if values.get(required) is None:
            raise InputError(f"config field {required} is required")
    return ExperimentConfig(**values)


def check_image_source(config: ExperimentConfig) -> dict[str, int]:
    """Images per category, counted from file names (no decoding), before any model loads."""
    from canprobe.data import coco_candidates, folder_candidates

    root = Path(config.images)
    if config.annotations is not None:
        if not Path(config.annotations).is_file():
            raise InputError(f"config field annotations: {config.annotations} does not exist")
        if not root.is_dir():
            raise InputError(f"config field images: folder {root} does not exist")
        candidates, _ = coco_candidates(Path(config.annotations), root)
    else:
        if not root.is_dir():
            raise InputError(f"config field images: folder {root} does not exist")
        candidates = folder_candidates(root)
    counts: dict[str, int] = {}
    for _, category in candidates:
        counts[category] = counts.get(category, 0) + 1
    if root.is_dir() and config.annotations is None:
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            counts.setdefault(sub.name, 0)
    wanted = config.categories if config.categories is not None else sorted(counts)
    if not wanted:
        raise InputError(f"config field images: no images in {root}")
    for category in wanted:
        if counts.get(category, 0) == 0:
            raise InputError(f"config field categories: category {category!r} has no images in {root}")
    return {c: counts[c] for c in wanted}
