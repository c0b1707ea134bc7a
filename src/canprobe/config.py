"""One configuration model: every setting declared once, with its type, default, choices and bounds.

``SETTINGS`` is the single table of settings, grouped in sections (model, data, captions, scoring,
search and its collapse criterion, evaluation, study). The configuration dataclasses take their
fields from it with ``setting(name)``, the command line builds its options from it
(``canprobe.cli``), and ``validate`` checks any of them against it, so an option, its default and
its choice list exist once:

- ``CollapseCriterion`` and ``SearchConfig``: one k* search (``canprobe search``, ``find_k_star``);
- ``ExperimentConfig``: a whole study (``canprobe run``, study YAML files). Its keys stay flat,
  as the study files written so far have them; each key names one setting of the table.

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

from canprobe.errors import InputError
from canprobe.faults import MEAN_BY, PROTECTIONS, SEED_MAX, check_fault, parse_fault

# choice lists, written once
DTYPE_NAMES = ("float32", "bfloat16", "float16")
SCORE_METHODS = ("can", "activation", "gradient", "random", "wanda")
REDUCTIONS = ("loss", "all")
LOSS_TEXTS = ("self", "reference")
PPL_SCORERS = ("unmasked", "masked")
STUDY_CONTROLS = ("random", "activation", "mean")
SEARCH_CONTROLS = ("random",)
CONTROL_AT = ("curve", "k_star")
DECODINGS = ("eager", "static", "compiled")


@dataclass(frozen=True)
class Setting:
    """One setting: its section, default, help text, and what values it accepts."""

    section: str
    default: object
    help: str
    kind: type = str  # the type of one value (of each item, for lists)
    choices: tuple[str, ...] | None = None
    low: float | None = None  # inclusive lower bound unless low_open
    high: float | None = None  # inclusive upper bound unless high_open
    low_open: bool = False
    high_open: bool = False

    def check(self, name: str, value) -> None:
        """Raise InputError naming ``name`` when ``value`` is not allowed (None passes: optional)."""
        if value is None:
            return
        if isinstance(value, list):
            twice = next((v for i, v in enumerate(value) if v in value[:i]), None)
            if twice is not None:
                raise InputError(f"config field {name}: {twice!r} is given twice; give each once")
        for item in value if isinstance(value, list) else [value]:
            if self.choices is not None and item not in self.choices:
                raise InputError(f"config field {name}: {item!r} is not one of {', '.join(self.choices)}")
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not math.isfinite(item):
                raise InputError(f"config field {name}: must be a finite number, got {item}")
            below = self.low is not None and (item <= self.low if self.low_open else item < self.low)
            above = self.high is not None and (item >= self.high if self.high_open else item > self.high)
            if below or above:
                raise InputError(f"config field {name}: {item} is outside {self.describe_range()}")

    def describe_range(self) -> str:
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{lo}{low}, {high}{hi}"


def _s(section: str, default, help: str, **kw) -> Setting:
    if "kind" not in kw and default is not None:
        kw["kind"] = type(default[0] if isinstance(default, list) else default)
    return Setting(section, default, help, **kw)


_POSITIVE = {"low": 1}
_RATIO = {"low": 0.0, "high": 1.0, "low_open": True, "high_open": True}

SETTINGS: dict[str, Setting] = {
    # model: which model, and how it runs (none of these but dtype changes a number)
    "model": _s("model", None, "Built-in name (toy-llava, ...), local folder or hub id."),
    "dtype": _s("model", "float32", "Weights and activations; scores and metrics stay float32.", choices=DTYPE_NAMES),
    "device": _s("model", None, "torch device, e.g. cpu or cuda:0."),
    "device_map": _s("model", None, "accelerate placement for models larger than one GPU, e.g. auto."),
    "trust_remote_code": _s("model", False, "Allow custom code shipped with a hub checkpoint."),
    "sites": _s("model", None, "YAML site file for a model with no adapter (see README: models without an adapter)."),
    "batch_size": _s("model", 16, "Images per scoring batch; rows (image x mask) per evaluation batch.", **_POSITIVE),
    "gradient_checkpointing": _s("model", False, "Recompute layer activations in the backward pass (less memory)."),
    "decoding": _s(
        "model",
        "eager",
        "Caption decoding: eager, static (fixed-size KV cache) or compiled (static, its step compiled on GPUs).",
        choices=DECODINGS,
    ),
    "reuse_features": _s("model", True, "Encode each image once for all masks that leave the image encoder alone."),
    # data: which images
    "images": _s("data", None, "Image set folder."),
    "annotations": _s("data", None, "COCO-style annotation file; images then come from the images folder."),
    "categories": _s("data", None, "Categories to use (default: all)."),
    "images_per_category": _s("data", None, "At most N images per category.", kind=int, **_POSITIVE),
    # captions: the text the model writes, for the loss text and for every evaluated caption
    "prompt": _s("captions", None, "Instruction text; the model family's default when omitted."),
    "max_new_tokens": _s("captions", 24, "Length limit of every generated caption.", **_POSITIVE),
    # scoring
    "method": _s("scoring", "can", "Score method.", choices=SCORE_METHODS),
    "alpha": _s("scoring", 1.0, "Gradient exponent of the CAN score.", low=0.0, high=1.0),
    "reduction": _s("scoring", "loss", "Token positions a language-site score averages over.", choices=REDUCTIONS),
    "loss_text": _s(
        "scoring",
        "self",
        "Loss text: own greedy captions, or the image set's captions.jsonl.",
        choices=LOSS_TEXTS,
    ),
    "seed": _s("scoring", 0, "Seed of the random score method and of the random control's draw.", low=0, high=SEED_MAX),
    # search: the k* algorithm and its collapse criterion
    "scope": _s("search", "language.down_proj", "Sites, e.g. language, vision.fc1, all."),
    "stage1_ppl_ratio": _s("search", 2.0, "Stage 1: median PPL above this x unmasked ...", low=1.0, low_open=True),
    "stage1_clip_ratio": _s("search", 0.9, "... or mean CLIP below this fraction of the unmasked one.", **_RATIO),
    "collapse_ppl_ratio": _s(
        "search", 100.0, "Collapse: median PPL at least this x unmasked ...", low=1.0, low_open=True
    ),
    "collapse_clip_ratio": _s("search", 0.5, "... and mean CLIP below this fraction of the unmasked one.", **_RATIO),
    "growth": _s("search", 2.0, "Factor of the geometric growth of k.", low=1.0, low_open=True),
    "k_per_round": _s("search", 1, "k values per batched round.", **_POSITIVE),
    "grid_per_octave": _s("search", 1, "Curve points per doubling; 0: none.", low=0),
    "grid_max": _s("search", None, "Largest k of the plotting grid (default: the whole scope).", kind=int, **_POSITIVE),
    "max_k": _s("search", None, "Largest k to try (default: every neuron of the scope).", kind=int, **_POSITIVE),
    "control": _s("search", None, "Add random neurons of the same counts.", choices=SEARCH_CONTROLS),
    "control_at": _s(
        "search",
        "curve",
        "The control at every k of the curve, or at k* and stage 1.",
        choices=CONTROL_AT,
    ),
    "n_samples": _s("search", 4, "Sample captions kept per point.", low=0),
    # evaluation: what a mask does and how its captions are measured
    "ablation": _s(
        "evaluation",
        "zero",
        "What masking does to a neuron: zero, mean (over all positions), mean:by=position (the mean at the "
        "token's own position), sign, stuck:value=V, stuck:at=max:factor=F, noise:sigma=S, "
        "bitflip:bit=exponent|sign|mantissa|N, weight_bitflip:bit=...:weights=largest|all.",
    ),
    "ppl_scorer": _s("evaluation", "unmasked", "unmasked, masked, or a causal LM path."),
    "clip_model": _s("evaluation", None, "CLIP for the CLIP score (default: toy-clip for organisms)."),
    # study: what a whole run searches, and where it writes
    "out": _s("study", "canprobe-run", "Run folder; rerun to resume."),
    "scopes": _s("study", ["language.down_proj", "language.gate_proj"], "Scopes to search."),
    "per_category": _s("study", True, "One search per category."),
    "pooled": _s("study", True, "One search over all images."),
    "controls": _s("study", list(STUDY_CONTROLS), "Controls of the study.", choices=STUDY_CONTROLS),
    "mean_control": _s(
        "study",
        "all",
        "The mean-ablation control sets each masked neuron to its mean over all positions (all), or to its mean "
        "at the token's own position (position: Sun et al.'s control for massive activations on the first token).",
        choices=MEAN_BY,
    ),
    "split_half": _s("study", True, "Compare the rankings of two disjoint halves of the images."),
    # robustness (canprobe.robustness, on the pooled images)
    "faults": _s("robustness", [], "Fault specs, each searched for k* under three rankings.", kind=str),
    "protections": _s("robustness", [], "Protections measured under random faults.", kind=str, choices=PROTECTIONS),
    "random_fault": _s("robustness", "bitflip", "The fault drawn at random neurons for the protections."),
    "fault_counts": _s("robustness", [1, 2, 4, 8, 16, 32], "Random fault counts.", **_POSITIVE),
    "fault_trials": _s("robustness", 4, "Random draws per fault count.", **_POSITIVE),
}


def setting(name: str):
    """A dataclass field whose default is the setting's default (lists copied per instance)."""
    default = SETTINGS[name].default
    if isinstance(default, list):
        return field(default_factory=lambda: list(default))
    return field(default=default)


def default(name: str):
    return SETTINGS[name].default


def validate(obj) -> None:
    """Check a configuration dataclass against its annotations and ``SETTINGS``; ints become floats where due."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        annotation = hints[f.name]
        if dataclasses.is_dataclass(value):
            continue
        if not _matches(value, annotation):
            want = str(annotation).replace("typing.", "")
            raise InputError(f"config field {f.name}: expected {want}, got {type(value).__name__} {value!r}")
        if f.name in SETTINGS:
            SETTINGS[f.name].check(f.name, value)
        if isinstance(value, int) and not isinstance(value, bool) and annotation in (float, float | None):
            object.__setattr__(obj, f.name, float(value))


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


@dataclass(frozen=True)
class CollapseCriterion:
    """Stage thresholds, relative to the unmasked model (METHOD.md, "Progressive masking and k*").

    Stage 1 (degraded): median PPL > stage1_ppl_ratio x baseline OR mean CLIP < stage1_clip_ratio x
    baseline. Stage 2 (collapsed): median PPL >= collapse_ppl_ratio x baseline AND mean CLIP <
    collapse_clip_ratio x baseline. Text-only models have no CLIP score (the baseline's is NaN):
    the mean distinct-word ratio of their continuations takes its place, with the same ratios, so
    collapse = PPL up 100x AND a continuation at most half as varied as the unmasked one (repeated
    tokens, empty output).
    """

    stage1_ppl_ratio: float = setting("stage1_ppl_ratio")
    stage1_clip_ratio: float = setting("stage1_clip_ratio")
    collapse_ppl_ratio: float = setting("collapse_ppl_ratio")
    collapse_clip_ratio: float = setting("collapse_clip_ratio")

    def __post_init__(self) -> None:
        validate(self)
        if self.collapse_ppl_ratio < self.stage1_ppl_ratio:
            raise InputError(
                f"collapse-ppl-ratio ({self.collapse_ppl_ratio}) must be at least stage1-ppl-ratio "
                f"({self.stage1_ppl_ratio}): collapse is the later stage"
            )
        if self.collapse_clip_ratio > self.stage1_clip_ratio:
            raise InputError(
                f"collapse-clip-ratio ({self.collapse_clip_ratio}) must not exceed stage1-clip-ratio "
                f"({self.stage1_clip_ratio}): collapse is the later stage"
            )

    def stage(self, point, baseline) -> str:
        """NaN medians compare false, so a point with no scorable caption never counts as collapsed."""
        ppl, clip, ppl0, clip0 = point.ppl_median, point.clip_mean, baseline.ppl_median, baseline.clip_mean
        if math.isnan(clip0):  # a text-only model: text statistics in place of CLIP
            clip, clip0 = point.distinct_mean, baseline.distinct_mean
        if ppl >= self.collapse_ppl_ratio * ppl0 and clip < self.collapse_clip_ratio * clip0:
            return "collapsed"
        if ppl > self.stage1_ppl_ratio * ppl0 or clip < self.stage1_clip_ratio * clip0:
            return "degraded"
        return "healthy"

    def describe(self) -> str:
        return (
            f"collapse: median PPL >= {self.collapse_ppl_ratio:g}x and mean CLIP < {self.collapse_clip_ratio:.0%} "
            f"of unmasked; stage 1: PPL > {self.stage1_ppl_ratio:g}x or CLIP < {self.stage1_clip_ratio:.0%} "
            "(text-only models: the mean distinct-word ratio in place of CLIP)"
        )


CRITERION_FIELDS = tuple(f.name for f in dataclasses.fields(CollapseCriterion))


@dataclass(frozen=True)
class SearchConfig:
    """Everything that decides which points a search evaluates and what they measure.

    ``growth``: factor of the geometric growth phase. ``k_per_round``: k values evaluated together
    in one batched generate during growth and bisection (1 = the classic sequential search, fewest
    evaluations; more = fewer rounds, some speculative points). ``grid_per_octave``: points per
    doubling of the plotting grid from 1 to ``grid_max`` (default: the whole scope); 0 = no grid.
    ``control``: "random" adds random neurons of the same counts, drawn with ``seed`` from the scope
    (one permutation, so the random sets are nested like the top-k sets), at every k of the top
    curve (``control_at="curve"``) or only at k* and the start of stage 1 (``"k_star"``, cheap).
    ``batch_size`` counts generation rows (one row = one image under one mask). ``clip_model``: the
    CLIP that scores the captions; ``find_k_star`` records the one it is given (None: whichever).
    """

    scope: str = setting("scope")
    criterion: CollapseCriterion = field(default_factory=CollapseCriterion)
    growth: float = setting("growth")
    k_per_round: int = setting("k_per_round")
    grid_per_octave: int = setting("grid_per_octave")
    grid_max: int | None = setting("grid_max")
    max_k: int | None = setting("max_k")
    control: str | None = setting("control")
    control_at: str = setting("control_at")
    seed: int = setting("seed")
    ablation: str = setting("ablation")
    ppl_scorer: str = setting("ppl_scorer")
    clip_model: str | None = setting("clip_model")
    prompt: str | None = setting("prompt")
    max_new_tokens: int = setting("max_new_tokens")
    batch_size: int = setting("batch_size")
    n_samples: int = setting("n_samples")
    decoding: str = setting("decoding")

    def __post_init__(self) -> None:
        validate(self)
        parse_fault(self.ablation)
        if not self.ppl_scorer:
            raise InputError(f"ppl scorer must be {' or '.join(PPL_SCORERS)} or a causal LM path")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ExperimentConfig:
    """A whole CAN study on one model: score, search k* per (scope, category), controls, stability.

    Robustness (``canprobe.robustness``, on the pooled images): ``faults`` (fault specs) each get k*
    with the CAN, activation-only and random rankings; ``protections`` (protect_top, range) each get
    the collapse rate under ``fault_trials`` random draws of ``fault_counts`` neurons with ``random_fault``.
    """

    model: str
    images: str
    out: str = setting("out")
    annotations: str | None = setting("annotations")
    categories: list[str] | None = setting("categories")
    images_per_category: int | None = setting("images_per_category")
    prompt: str | None = setting("prompt")
    method: str = setting("method")
    alpha: float = setting("alpha")
    reduction: str = setting("reduction")
    loss_text: str = setting("loss_text")
    scopes: list[str] = setting("scopes")
    per_category: bool = setting("per_category")
    pooled: bool = setting("pooled")
    ablation: str = setting("ablation")
    faults: list[str] = setting("faults")
    protections: list[str] = setting("protections")
    random_fault: str = setting("random_fault")
    fault_counts: list[int] = setting("fault_counts")
    fault_trials: int = setting("fault_trials")
    controls: list[str] = setting("controls")
    mean_control: str = setting("mean_control")
    split_half: bool = setting("split_half")
    ppl_scorer: str = setting("ppl_scorer")
    clip_model: str | None = setting("clip_model")
    max_new_tokens: int = setting("max_new_tokens")
    batch_size: int = setting("batch_size")
    collapse_ppl_ratio: float = setting("collapse_ppl_ratio")
    collapse_clip_ratio: float = setting("collapse_clip_ratio")
    stage1_ppl_ratio: float = setting("stage1_ppl_ratio")
    stage1_clip_ratio: float = setting("stage1_clip_ratio")
    seed: int = setting("seed")
    dtype: str = setting("dtype")
    device: str | None = setting("device")
    device_map: str | None = setting("device_map")
    gradient_checkpointing: bool = setting("gradient_checkpointing")
    reuse_features: bool = setting("reuse_features")
    decoding: str = setting("decoding")

    def __post_init__(self) -> None:
        validate(self)
        if not self.scopes:
            raise InputError("config field scopes: give at least one scope, e.g. language.down_proj")
        if not self.per_category and not self.pooled:
            raise InputError("config fields per_category and pooled are both false: nothing to search")
        for spec in [self.ablation, *self.faults, self.random_fault]:
            check_fault(spec, self.dtype)
        if not self.fault_counts:
            raise InputError("config field fault_counts: give at least one count")
        self.criterion()  # the thresholds must also agree with each other

    def criterion(self) -> CollapseCriterion:
        return CollapseCriterion(**{name: getattr(self, name) for name in CRITERION_FIELDS})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_fields() -> dict[str, object]:
    """Field name -> type annotation of a study config, for building command-line flags."""
    return typing.get_type_hints(ExperimentConfig)


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
    return flatten_sections(data)


def flatten_sections(values: dict) -> dict:
    """Study fields from a mapping that may group them under their sections (``scoring: {alpha: 0.5}``).

    A key that names a section and holds a mapping is a section; its keys must be settings of that
    section. Flat keys and sections mix; a field given both ways is refused.
    """
    names = {s.section for s in SETTINGS.values()}
    # ``scoring:`` with nothing under it is an empty section (YAML reads it as null), not an unknown field
    sections = {
        k: v or {}
        for k, v in values.items()
        if isinstance(k, str) and k in names and (isinstance(v, dict) or (v is None and k not in SETTINGS))
    }
    flat = {k: v for k, v in values.items() if k not in sections}
    for key, section in sections.items():
        for name, value in section.items():
            setting = SETTINGS.get(name) if isinstance(name, str) else None
            if setting is None or setting.section != key:
                own = sorted(n for n, s in SETTINGS.items() if s.section == key)
                raise InputError(f"config section {key}: {name!r} is not one of its fields ({', '.join(own)})")
            if name in flat:
                raise InputError(f"config field {name} is given twice (in section {key} and at the top level)")
            flat[name] = value
    return flat


def make_config(values: dict) -> ExperimentConfig:
    """Build and validate a config from a mapping, flat or in sections; unknown and missing keys are named."""
    values = flatten_sections(values)
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
