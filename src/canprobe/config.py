"""The settings: one table (``SETTINGS``), and the section objects built from it.

Each setting is one row of ``SETTINGS``: its section, type, default, choices, bounds, help text,
and whether it is part of a run's identity (what decides the numbers, ``canprobe.identity``). The
sections are small frozen dataclasses whose fields are the table's rows (``@section``), passed
whole from the command line or a study file down to the code that reads them:

- ``Model`` (which model, how it runs), ``Data`` (which images), ``Generation`` (the captions and
  the passes over the inputs: prompt, length, batch size, decoding, feature reuse), ``Scoring``,
  ``Search`` (the k* algorithm and its ``CollapseCriterion``), ``Evaluation`` (the fault a mask
  applies and the PPL/CLIP scorers), ``Faults`` (the robustness study), ``Study`` (what a whole
  run searches, where it writes);
- ``SearchConfig``: one k* search (``canprobe search``, ``find_k_star``): its scope and control,
  the seed, and the Search, Generation and Evaluation sections;
- ``ExperimentConfig``: a whole study (``canprobe run``, study YAML files), one field per section.
  Study files and recorded configs are flat (one key per setting: names are unique across
  sections); a study file may also group keys under their sections.

The command line builds its options from the same rows (``canprobe.cli``), so an option, its
default, its help and its choice list exist once. Everything is checked before any model loads:
unknown keys, wrong types, out-of-range values, missing image folders, and categories without
images each fail with one line naming the field.
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

from canprobe.checks import read_text_file
from canprobe.errors import InputError
from canprobe.faults import DTYPES, MEAN_BY, PROTECTIONS, SEED_MAX, check_fault, parse_fault

# choice lists, written once
DTYPE_NAMES = tuple(DTYPES)
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
    """One setting: its section, default, help text, what values it accepts, and whether it decides results."""

    section: str
    default: object
    help: str
    kind: type = str  # the type of one value (of each item, for lists)
    choices: tuple[str, ...] | None = None
    low: float | None = None  # inclusive lower bound unless low_open
    high: float | None = None  # inclusive upper bound unless high_open
    low_open: bool = False
    high_open: bool = False
    many: bool = False  # a list of values
    identity: bool = True  # False: changes only where or how fast a run goes, never its numbers
    former: tuple[str, ...] = ()  # names an earlier release gave it (still read in study files and recorded configs)

    @property
    def annotation(self):
        """The Python type of the setting's value: ``kind``, a list of it, optional when the default is None."""
        base = list[self.kind] if self.many else self.kind
        return base | None if self.default is None else base

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
    if isinstance(default, list):
        kw["many"] = True
    if "kind" not in kw and default is not None:
        kw["kind"] = type(default[0] if isinstance(default, list) else default)
    return Setting(section, default, help, **kw)


_POSITIVE = {"low": 1}
_RATIO = {"low": 0.0, "high": 1.0, "low_open": True, "high_open": True}
_RUNTIME = {"identity": False}

SETTINGS: dict[str, Setting] = {
    # model: which model, and how it runs (none of these but model and dtype changes a number)
    "model": _s("model", None, "Built-in name (toy-llava, ...), local folder or hub id."),
    "dtype": _s("model", "float32", "Weights and activations; scores and metrics stay float32.", choices=DTYPE_NAMES),
    "device": _s("model", None, "torch device, e.g. cpu or cuda:0.", **_RUNTIME),
    "device_map": _s("model", None, "accelerate placement for models larger than one GPU, e.g. auto.", **_RUNTIME),
    "trust_remote_code": _s("model", False, "Allow custom code shipped with a hub checkpoint.", **_RUNTIME),
    "sites": _s(
        "model",
        None,
        "YAML site file for a model with no adapter (see README: models without an adapter).",
        **_RUNTIME,  # the sites it names show in the ranking's addresses, which are identity
    ),
    "gradient_checkpointing": _s(
        "model", False, "Recompute layer activations in the backward pass (less memory).", **_RUNTIME
    ),
    # data: which images (their content, names and captions are identity, their location is not)
    "images": _s("data", None, "Image set folder.", **_RUNTIME),
    "annotations": _s("data", None, "COCO-style annotation file; images then come from the images folder.", **_RUNTIME),
    "categories": _s("data", None, "Categories to use (default: all).", many=True),
    "images_per_category": _s("data", None, "At most N images per category.", kind=int, **_POSITIVE),
    # generation: the text the model writes, for the loss text and for every evaluated caption
    "prompt": _s("generation", None, "Instruction text; the model family's default when omitted."),
    "max_new_tokens": _s("generation", 24, "Length limit of every generated caption.", **_POSITIVE),
    "batch_size": _s(
        "generation",
        16,
        "Images per scoring batch; rows (image x mask) per evaluation batch.",
        **_POSITIVE,
        **_RUNTIME,
    ),
    "decoding": _s(
        "generation",
        "eager",
        "Caption decoding: eager, static (fixed-size KV cache) or compiled (static, its step compiled on GPUs).",
        choices=DECODINGS,
        **_RUNTIME,
    ),
    "reuse_features": _s(
        "generation", True, "Encode each image once for all masks that leave the image encoder alone.", **_RUNTIME
    ),
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
    # probe: what one search masks (a study sets these per search from scopes and controls)
    "scope": _s("probe", "language.down_proj", "Sites, e.g. language, vision.fc1, all."),
    "control": _s("probe", None, "Add random neurons of the same counts.", choices=SEARCH_CONTROLS),
    "control_at": _s(
        "probe",
        "curve",
        "The control at every k of the curve, or at k* and stage 1.",
        choices=CONTROL_AT,
    ),
    # search: the k* algorithm, and its collapse criterion (search.criterion)
    "stage1_ppl_ratio": _s(
        "search.criterion", 2.0, "Stage 1: median PPL above this x unmasked ...", low=1.0, low_open=True
    ),
    "stage1_clip_ratio": _s(
        "search.criterion", 0.9, "... or mean CLIP below this fraction of the unmasked one.", **_RATIO
    ),
    "collapse_ppl_ratio": _s(
        "search.criterion", 100.0, "Collapse: median PPL at least this x unmasked ...", low=1.0, low_open=True
    ),
    "collapse_clip_ratio": _s(
        "search.criterion", 0.5, "... and mean CLIP below this fraction of the unmasked one.", **_RATIO
    ),
    "growth": _s("search", 2.0, "Factor of the geometric growth of k.", low=1.0, low_open=True),
    "k_per_round": _s("search", 1, "k values per batched round.", **_POSITIVE, **_RUNTIME),
    "grid_per_octave": _s("search", 1, "Curve points per doubling; 0: none.", low=0),
    "grid_max": _s("search", None, "Largest k of the plotting grid (default: the whole scope).", kind=int, **_POSITIVE),
    "max_k": _s("search", None, "Largest k to try (default: every neuron of the scope).", kind=int, **_POSITIVE),
    "n_samples": _s("search", 4, "Sample captions kept per point.", low=0, **_RUNTIME),
    # evaluation: what a mask does and how its captions are measured
    "fault": _s(
        "evaluation",
        "zero",
        "What masking does to a neuron: zero, mean (over all positions), mean:by=position (the mean at the "
        "token's own position), sign, stuck:value=V, stuck:at=max:factor=F, noise:sigma=S, "
        "bitflip:bit=exponent|sign|mantissa|N, weight_bitflip:bit=...:weights=largest|all.",
        former=("ablation",),
    ),
    "ppl_scorer": _s("evaluation", "unmasked", "unmasked, masked, or a causal LM path."),
    "clip_model": _s("evaluation", None, "CLIP for the CLIP score (default: toy-clip for organisms)."),
    # faults: the robustness study (canprobe.robustness, on the pooled images)
    "faults": _s("faults", [], "Fault specs, each searched for k* under three rankings.", kind=str),
    "protections": _s("faults", [], "Protections measured under random faults.", kind=str, choices=PROTECTIONS),
    "random_fault": _s("faults", "bitflip", "The fault drawn at random neurons for the protections."),
    "fault_counts": _s("faults", [1, 2, 4, 8, 16, 32], "Random fault counts.", **_POSITIVE),
    "fault_trials": _s("faults", 4, "Random draws per fault count.", **_POSITIVE),
    # study: what a whole run searches, and where it writes
    "out": _s("study", "canprobe-run", "Run folder; rerun to resume.", **_RUNTIME),
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
}
# setting names of earlier releases -> today's (study files and recorded configs still read them)
FORMER_NAMES = {old: name for name, s in SETTINGS.items() for old in s.former}
# the sections study files of canprobe 0.1 grouped these settings under (still read)
FORMER_SECTIONS = {
    "captions": ("prompt", "max_new_tokens"),
    "model": ("batch_size", "decoding", "reuse_features"),
    "robustness": ("faults", "protections", "random_fault", "fault_counts", "fault_trials"),
}


def from_text(name: str, text: str | None):
    """A setting's value from command-line text: a list comma-separated (whole numbers where due); None stays."""
    s = SETTINGS[name]
    if text is None or not s.many:
        return text
    items = [v.strip() for v in text.split(",") if v.strip()]
    if s.kind is int:
        if not all(v.lstrip("-").isdigit() for v in items):
            raise InputError(f"--{name.replace('_', '-')}: give comma-separated whole numbers")
        return [int(v) for v in items]
    return items


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


def section(name: str):
    """Make ``cls`` a frozen dataclass whose fields are the settings of section ``name``, in table order.

    Fields the class declares itself (a nested section) come first; ``__post_init__`` validates
    every field against its annotation and its row of ``SETTINGS``, then runs the class's own
    ``check()`` (checks across fields), if it has one.
    """

    def build(cls):
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for key, s in SETTINGS.items():
            if s.section == name:
                annotations[key] = s.annotation
                setattr(cls, key, setting(key))
        cls.__annotations__ = annotations
        cls.section_name = name

        def __post_init__(self) -> None:
            validate(self)
            getattr(self, "check", lambda: None)()

        cls.__post_init__ = __post_init__
        return dataclass(frozen=True)(cls)

    return build


def flat(obj) -> dict:
    """A section object (or one composed of sections) as one mapping: setting name -> value."""
    out: dict = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out.update(flat(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return out


def compose(cls, values: dict):
    """``cls`` (a section, or one composed of sections) from flat setting values; the rest take defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = compose(kind, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def names(cls) -> list[str]:
    """The setting names of a section (or of one composed of sections), nested ones included."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        out += names(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else [f.name]
    return out


@section("model")
class Model:
    """Which model, and how it loads and runs: everything ``canprobe.models.load_model`` reads."""


@section("data")
class Data:
    """Which images: a folder (or COCO annotations), the categories, how many per category."""


@section("generation")
class Generation:
    """How the model writes and reads its inputs: the prompt, the length limit, rows per batch, the decoding, and
    whether each image is encoded once for every pass that leaves the image encoder alone (``canprobe.features``).

    Every function that generates captions or runs the model over prompts takes this section whole
    (``generate_captions``, ``MaskEvaluator``, ``score_neurons``, ``activation_stats``,
    ``massive_activations``, ``record_neurons``), so a new generation setting reaches them all.
    """


@section("scoring")
class Scoring:
    """How neurons are scored and ranked (``canprobe.scoring``); ``seed`` also draws the random control."""


@section("search.criterion")
class CollapseCriterion:
    """Stage thresholds, relative to the unmasked model (METHOD.md, "Progressive masking and k*").

    Stage 1 (degraded): median PPL > stage1_ppl_ratio x baseline OR mean CLIP < stage1_clip_ratio x
    baseline. Stage 2 (collapsed): median PPL >= collapse_ppl_ratio x baseline AND mean CLIP <
    collapse_clip_ratio x baseline. Text-only models have no CLIP score (the baseline's is NaN):
    the mean distinct-word ratio of their continuations (``distinct_mean``) takes its place, with
    the same ratios, so collapse = PPL up 100x AND a continuation at most half as varied as the
    unmasked one (repeated tokens, empty output). ``quality`` names the metric read beside PPL; a
    search's summary records it.
    """

    @staticmethod
    def quality(baseline_clip: float) -> str:
        """The metric compared beside median PPL: ``clip_mean``, or ``distinct_mean`` where the unmasked
        model has no CLIP score (a text-only model)."""
        return "distinct_mean" if math.isnan(baseline_clip) else "clip_mean"

    def check(self) -> None:
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
        quality = self.quality(baseline.clip_mean)
        ppl, ppl0 = point.ppl_median, baseline.ppl_median
        clip, clip0 = getattr(point, quality), getattr(baseline, quality)
        if ppl >= self.collapse_ppl_ratio * ppl0 and clip < self.collapse_clip_ratio * clip0:
            return "collapsed"
        if ppl > self.stage1_ppl_ratio * ppl0 or clip < self.stage1_clip_ratio * clip0:
            return "degraded"
        return "healthy"

    def describe(self, quality: str | None = None) -> str:
        """The criterion in words; ``quality`` (see ``quality``): say which metric stands beside PPL."""
        if quality == "distinct_mean":
            return (
                f"collapse: median PPL >= {self.collapse_ppl_ratio:g}x and mean distinct-word ratio < "
                f"{self.collapse_clip_ratio:.0%} of unmasked; stage 1: PPL > {self.stage1_ppl_ratio:g}x or "
                f"distinct-word ratio < {self.stage1_clip_ratio:.0%} (a text-only model: no CLIP score; the "
                "distinct-word ratio of its continuations stands in for it)"
            )
        return (
            f"collapse: median PPL >= {self.collapse_ppl_ratio:g}x and mean CLIP < {self.collapse_clip_ratio:.0%} "
            f"of unmasked; stage 1: PPL > {self.stage1_ppl_ratio:g}x or CLIP < {self.stage1_clip_ratio:.0%} "
            "(text-only models: the mean distinct-word ratio in place of CLIP)"
        )


@section("search")
class Search:
    """The k* algorithm: the collapse criterion, growth, batched rounds, the plotting grid, the largest k.

    ``growth``: factor of the geometric growth phase. ``k_per_round``: k values evaluated together
    in one batched generate during growth and bisection (1 = the classic sequential search, fewest
    evaluations; more = fewer rounds, some speculative points). ``grid_per_octave``: points per
    doubling of the plotting grid from 1 to ``grid_max`` (default: the whole scope); 0 = no grid.
    """

    criterion: CollapseCriterion = field(default_factory=CollapseCriterion)


@section("evaluation")
class Evaluation:
    """What a mask does to its neurons (``fault``, a ``canprobe.faults`` spec) and which models score captions.

    ``clip_model``: the CLIP that scores the captions; ``find_k_star`` records the one it is given.
    """

    def check(self) -> None:
        parse_fault(self.fault)
        if not self.ppl_scorer:
            raise InputError(f"ppl scorer must be {' or '.join(PPL_SCORERS)} or a causal LM path")


@section("faults")
class Faults:
    """The robustness study (``canprobe.robustness``, on the pooled images).

    ``faults`` (fault specs) each get k* with the CAN, activation-only and random rankings;
    ``protections`` (protect_top, range) each get the collapse rate under ``fault_trials`` random
    draws of ``fault_counts`` neurons with ``random_fault``.
    """

    def check(self) -> None:
        if not self.fault_counts:
            raise InputError("config field fault_counts: give at least one count")


@section("study")
class Study:
    """What a whole study searches (scopes, per category and/or pooled), its controls, and where it writes."""

    def check(self) -> None:
        if not self.scopes:
            raise InputError("config field scopes: give at least one scope, e.g. language.down_proj")
        if not self.per_category and not self.pooled:
            raise InputError("config fields per_category and pooled are both false: nothing to search")


@section("probe")
class SearchConfig:
    """One k* search: its scope and random control, the seed, and the Search, Generation and Evaluation sections.

    ``control``: "random" adds random neurons of the same counts, drawn with ``seed`` from the scope
    (one permutation, so the random sets are nested like the top-k sets), at every k of the top
    curve (``control_at="curve"``) or only at k* and the start of stage 1 (``"k_star"``, cheap).
    ``generation.batch_size`` counts generation rows (one row = one image under one mask).
    Build one from flat setting names with ``SearchConfig.of(max_k=24, ...)``.
    """

    search: Search = field(default_factory=Search)
    generation: Generation = field(default_factory=Generation)
    evaluation: Evaluation = field(default_factory=Evaluation)
    seed: int = setting("seed")

    @classmethod
    def of(cls, **values) -> SearchConfig:
        values = current_names(values)
        unknown = sorted(values.keys() - set(names(cls)))
        if unknown:
            raise InputError(f"unknown search setting(s) {', '.join(unknown)}; known: {', '.join(names(cls))}")
        return compose(cls, values)

    @property
    def criterion(self) -> CollapseCriterion:
        return self.search.criterion

    def to_dict(self) -> dict:
        return flat(self)


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole CAN study on one model: score, search k* per (scope, category), controls, stability.

    One field per section; ``make_config`` builds it from a flat or sectioned mapping, ``to_dict``
    gives it back flat.
    """

    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    generation: Generation = field(default_factory=Generation)
    scoring: Scoring = field(default_factory=Scoring)
    search: Search = field(default_factory=Search)
    evaluation: Evaluation = field(default_factory=Evaluation)
    faults: Faults = field(default_factory=Faults)
    study: Study = field(default_factory=Study)

    def __post_init__(self) -> None:
        for spec in [self.evaluation.fault, *self.faults.faults, self.faults.random_fault]:
            check_fault(spec, self.model.dtype)

    def search_config(self, scope: str, control: str | None, control_at: str) -> SearchConfig:
        """The config of one of the study's searches: every setting of the study's sections reaches it."""
        return SearchConfig(
            scope=scope,
            control=control,
            control_at=control_at,
            search=self.search,
            generation=self.generation,
            evaluation=self.evaluation,
            seed=self.scoring.seed,
        )

    def to_dict(self) -> dict:
        return flat(self)


def config_fields() -> dict[str, object]:
    """Setting name -> type annotation of a study config, for building command-line flags."""
    return {name: SETTINGS[name].annotation for name in names(ExperimentConfig)}


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


def _grouped(section: str) -> set[str]:
    """The settings a study file may group under ``section``: its own, its subsections', FORMER_SECTIONS'."""
    own = {n for n, s in SETTINGS.items() if s.section == section or s.section.startswith(section + ".")}
    return own | {old for old, name in FORMER_NAMES.items() if name in own} | set(FORMER_SECTIONS.get(section, ()))


def flatten_sections(values: dict, within: str = "") -> dict:
    """Study fields from a mapping that may group them under their sections (``scoring: {alpha: 0.5}``).

    A key that names a section and holds a mapping is a section; its keys must be settings of that
    section (a subsection nests: ``search: {criterion: {collapse_ppl_ratio: 50}}``). Flat keys and
    sections mix; a field given twice is refused. A setting's former name reads as today's.
    """
    paths = {part for s in SETTINGS.values() for part in _prefixes(s.section)} | set(FORMER_SECTIONS)
    out: dict = {}
    for key, value in values.items():
        path = f"{within}.{key}" if within else key
        # ``scoring:`` with nothing under it is an empty section (YAML reads it as null), not an unknown field
        empty = value is None and key not in SETTINGS
        if isinstance(key, str) and (isinstance(value, dict) or empty) and path in paths:
            items = flatten_sections(value or {}, path)
        elif within and key not in _grouped(within):
            mine = ", ".join(sorted(_grouped(within)))
            raise InputError(f"config section {within}: {key!r} is not one of its fields ({mine})")
        else:
            items = {key: value}
        for name, item in items.items():
            if name in out:
                raise InputError(f"config field {name} is given twice (in a section and at its top level)")
            out[name] = item
    return out if within else current_names(out)


def current_names(values: dict) -> dict:
    """``values`` with settings given by a former name (``ablation``) under today's (``fault``)."""
    out, given = {}, {}
    for key, value in values.items():
        name = FORMER_NAMES.get(key, key) if isinstance(key, str) else key
        if name in out:
            former = given[name] if key == name else key
            raise InputError(f"config field {name} is given twice (once by its former name {former})")
        out[name], given[name] = value, key
    return out


def _prefixes(section: str) -> list[str]:
    parts = section.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def make_config(values: dict) -> ExperimentConfig:
    """Build and validate a config from a mapping, flat or in sections; unknown and missing keys are named."""
    values = flatten_sections(values)
    known = set(names(ExperimentConfig))
    for key in values:
        if key not in known:
            raise InputError(f"unknown config field {key!r}; known fields: {', '.join(sorted(known))}")
    for required in ("model", "images"):
        if values.get(required) is None:
            raise InputError(f"config field {required} is required")
    return compose(ExperimentConfig, values)
