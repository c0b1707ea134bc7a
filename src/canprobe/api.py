"""One call per command: what ``canprobe`` caption, score, search, ablate, inspect, neurons and run do.

Each call takes the model (a name or a ``Model`` section) and the image set folder, then its
settings: section objects of ``canprobe.config`` (``Generation(max_new_tokens=10)``) and/or plain
keywords named as in ``SETTINGS`` (``max_k=64``); every setting left out keeps the table's
default. ``notes`` receives the lines a command prints on its way (skipped images, what it is
about to do), each with whether it is a warning; by default they are logged. Under torchrun each
process makes the same call; rank 0 writes the files and says the notes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from canprobe import console
from canprobe.checks import check_output_file
from canprobe.config import (
    SETTINGS,
    Evaluation,
    Generation,
    Model,
    Scoring,
    SearchConfig,
    compose,
    current_names,
    flat,
    make_config,
    names,
    read_config_file,
)
from canprobe.data import ImageSet, load_image_set
from canprobe.errors import InputError
from canprobe.runfolder import RANKING_FILE, RunLock, check_run_folder
from canprobe.sites import SiteRegistry

log = logging.getLogger(__name__)

Notes = Callable[[str, bool], None]


def _log(line: str, warning: bool) -> None:
    (log.warning if warning else log.info)("%s", line)


def settings(model, *sections, **values) -> dict:
    """Flat setting values from ``model`` (a name or a Model), section objects and keywords (which win)."""
    out: dict = {}
    for obj in (model, *sections) if isinstance(model, Model) else sections:
        out.update(flat(obj))
    if not isinstance(model, Model):
        out["model"] = model
    values = current_names(values)
    unknown = sorted(values.keys() - SETTINGS.keys())
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}; see canprobe.config.SETTINGS")
    return {**out, **values}


def generation_inputs(lm, image_set: ImageSet) -> list:
    """What the model generates from: the images, or, for a text-only model, the texts of the set's captions.jsonl."""
    if lm.family.takes_images:
        return image_set.images
    missing = [r.name for r in image_set.records if r.caption is None]
    if missing:
        raise InputError(
            f"{lm.source} is a text-only model: it continues the texts of captions.jsonl, "
            f"and {len(missing)} record(s) have none, e.g. {missing[0]}"
        )
    return [r.caption for r in image_set.records]


def _images(images, per_category: int | None, notes: Notes, say: bool = True) -> ImageSet:
    image_set = load_image_set(images, limit=per_category)
    for line in console.skipped(image_set) if say else ():
        notes(line, True)
    return image_set


def _check_context(lm, image_set: ImageSet, generation: Generation) -> None:
    """Refuse a prompt that leaves no room for the caption in the model's context, before any work."""
    if lm.family.takes_images:
        from canprobe.inputs import check_context

        check_context(lm, image_set.images[0], generation.prompt, generation.max_new_tokens)


def _joined(machine: Model):
    """Under torchrun / accelerate launch: join the process group; (world, the Model on this rank's device)."""
    from canprobe.distributed import init_from_env

    world, device = init_from_env(machine.device)
    return world, dataclasses.replace(machine, device=device)


def _plan(machine: Model, image_set: ImageSet, scope: str, generation: Generation, processes: int, **search):
    from canprobe.plan import make_plan

    return make_plan(machine, len(image_set), scope, generation, processes, **search)


def caption(model, images, out=None, *sections, notes: Notes = _log, **values):
    """Greedy captions of every image of a set (``CaptionRecord``s), written to ``out`` (JSON lines) when given."""
    from canprobe.captions import caption_image_set, write_captions
    from canprobe.models import load

    v = settings(model, *sections, **values)
    machine, generation = compose(Model, v), compose(Generation, v)
    if out is not None:
        check_output_file(out, inputs=(images,))
    image_set = _images(images, None, notes)
    lm = load(machine)
    _check_context(lm, image_set, generation)
    records = caption_image_set(lm, image_set, generation)
    if out is not None:
        write_captions(records, out)
    return records


def score(model, images, out=None, *sections, dry_run: bool = False, notes: Notes = _log, **values):
    """Score every neuron of ``scope`` over an image set (a ``ScoreResult``), saved in ``out`` when given.

    ``dry_run``: the ``Plan`` (what would run, the memory it needs) instead, from the model's config alone.
    """
    from canprobe.models import load
    from canprobe.scoring import score_neurons

    v = settings(model, *sections, **values)
    scope = v.get("scope", SETTINGS["scope"].default)
    machine, scoring, generation = (compose(cls, v) for cls in (Model, Scoring, Generation))
    if out is not None:
        check_run_folder(out, inputs=(images,))
    world, machine = _joined(machine)
    image_set = load_image_set(images)
    captions = None
    if scoring.loss_text == "reference":
        missing = [r.name for r in image_set.records if r.caption is None]
        if missing:
            raise InputError(f"--captions reference: no caption for {len(missing)} image(s), e.g. {missing[0]}")
        captions = [r.caption for r in image_set.records]
    if dry_run:
        return _plan(machine, image_set, scope, generation, world.size)
    for line in console.skipped(image_set) if world.main else ():
        notes(line, True)
    with RunLock(out) if world.main and out is not None else nullcontext():  # a folder in use: refused first
        lm = load(machine)
        _check_context(lm, image_set, generation)
        inputs = generation_inputs(lm, image_set)
        result = score_neurons(lm, inputs, scope, scoring, generation, captions, machine.gradient_checkpointing)
        if world.main and out is not None:
            result.save(out)
    return result


def search(model, images, out, *sections, ranking=None, dry_run: bool = False, notes: Notes = _log, **values):
    """Find k* (a ``SearchResult``): the fewest top-ranked neurons of ``scope`` whose masking collapses the captions.

    ``ranking``: a ranking.parquet (or its folder); without one, the neurons are scored with the
    Scoring settings and the ranking is saved in ``out``, or read back from there when it was
    scored the same way. A rerun resumes. ``dry_run``: the ``Plan`` instead.
    """
    from canprobe.evaluation import default_clip_model, load_scorers
    from canprobe.faults import check_fault
    from canprobe.models import load
    from canprobe.scoring import check_ranking_model, folder_ranking, load_ranking
    from canprobe.search import find_k_star

    v = settings(model, *sections, **values)
    v["clip_model"] = v.get("clip_model") or default_clip_model(v["model"])
    machine, scoring = compose(Model, v), compose(Scoring, v)
    config = SearchConfig.of(**{k: x for k, x in v.items() if k in names(SearchConfig)})
    check_fault(config.evaluation.fault, machine.dtype)
    out = check_run_folder(out, inputs=(images,))
    world, machine = _joined(machine)
    image_set = _images(images, v.get("images_per_category"), notes, say=world.main)
    table = load_ranking(ranking) if ranking is not None else None  # a bad file fails before any work
    if dry_run:
        return _plan(
            machine, image_set, config.scope, config.generation, world.size, searches=1, growth=config.search.growth
        )
    with RunLock(out) if world.main else nullcontext():  # held before the model loads, while the search appends
        lm = load(machine)
        inputs = generation_inputs(lm, image_set)
        _check_context(lm, image_set, config.generation)
        if table is not None:
            check_ranking_model(table, lm)
        else:
            if world.main and not (out / RANKING_FILE).exists():
                how = f"{config.scope} with {scoring.method} (alpha {scoring.alpha}) over {len(image_set)} images"
                notes(f"no --ranking: scoring {how}", False)
            table = folder_ranking(lm, inputs, out, config.scope, scoring, config.generation, machine)
        clip, ppl_lm = load_scorers(lm, machine, config.evaluation)
        image_names = [r.name for r in image_set.records]
        return find_k_star(lm, inputs, table, clip, config, out, image_names, ppl_lm=ppl_lm)


@dataclass
class Ablated:
    """Each image's metrics (captions included) without and with one mask (``canprobe.ablate``)."""

    images: list[str]
    unmasked: list
    masked: list
    label: str  # which neurons: "top K" or "N neuron(s)"
    fault: str


def ablate(
    model,
    images,
    *sections,
    neurons: str | Sequence[str] | None = None,
    top: int | None = None,
    ranking=None,
    notes: Notes = _log,
    **values,
) -> Ablated:
    """Captions and metrics with one mask, beside the unmasked model's.

    The mask: ``neurons`` (addresses, or one comma-separated string), or the ``top`` K of ``ranking``
    (counting only its neurons in ``scope`` when that is given).
    """
    from canprobe.ablation import fault_stats
    from canprobe.evaluation import MaskEvaluator, load_scorers
    from canprobe.faults import check_fault
    from canprobe.models import load
    from canprobe.scoring import load_ranking

    v = settings(model, *sections, **values)
    machine, generation, evaluation = (compose(cls, v) for cls in (Model, Generation, Evaluation))
    check_fault(evaluation.fault, machine.dtype)
    if (neurons is None) == (top is None):
        raise InputError("give exactly one of --neurons ADDR,ADDR,... and --top K (with --ranking)")
    if top is not None and ranking is None:
        raise InputError("--top K needs --ranking ranking.parquet from `canprobe score`")
    addresses = _addresses(neurons, notes) if neurons is not None else []
    table = load_ranking(ranking) if top is not None else None  # a bad file fails before the model loads
    image_set = _images(images, v.get("images_per_category"), notes)
    lm = load(machine)
    inputs = generation_inputs(lm, image_set)
    _check_context(lm, image_set, generation)
    mask, label = _mask(lm, addresses, table, top, v.get("scope"))
    sites = [SiteRegistry.of(lm.model).by_name[n] for n in mask]
    stats = fault_stats(lm, inputs, sites, [evaluation.fault], generation) if mask else None
    clip, ppl_lm = load_scorers(lm, machine, evaluation)
    evaluator = MaskEvaluator(lm, inputs, clip, generation, evaluation, ppl_lm=ppl_lm, stats=stats)
    unmasked = evaluator.evaluate_baseline()
    (masked,) = evaluator.evaluate([mask])
    return Ablated([r.name for r in image_set.records], unmasked, masked, label, evaluation.fault)


def _addresses(neurons: str | Sequence[str], notes: Notes) -> list[str]:
    """The distinct neuron addresses given (a list, or one comma-separated string), each checked."""
    from canprobe.sites import parse_address

    given = neurons.split(",") if isinstance(neurons, str) else list(neurons)
    addresses = [a.strip() for a in given if a.strip()]
    if not addresses:
        raise InputError(f"--neurons {neurons!r} names no neuron; give e.g. language.layers.1.mlp.down_proj:7")
    unique = list(dict.fromkeys(str(parse_address(a)) for a in addresses))
    if len(unique) < len(addresses):
        notes(f"note: --neurons names {len(unique)} distinct neuron(s) in {len(addresses)} addresses", False)
    return unique


def _mask(lm, addresses: list[str], ranking, top: int | None, scope: str | None) -> tuple[dict, str]:
    """(the mask, what it holds): the given addresses, or the top K of the ranking (in ``scope`` when given)."""
    from canprobe.ablation import group_by_site
    from canprobe.scoring import check_ranking_model
    from canprobe.search import ranked_in_scope

    registry = SiteRegistry.of(lm.model)
    if top is None:
        return group_by_site(registry, addresses), f"{len(addresses)} neuron(s)"
    check_ranking_model(ranking, lm)
    ranked = ranked_in_scope(registry, ranking, scope or "all")
    if top > len(ranked):
        where = f"scope {scope}" if scope else "the ranking"
        raise InputError(f"--top {top} is larger than the {len(ranked)} ranked neurons in {where}")
    return ranked.prefix(top), f"top {top}"


def inspect(model, images=None, *sections, ratio: float | None = None, notes: Notes = _log, **values):
    """(Inventory, ActivationReport or None): the sites of a model per component and kind, and the memory scoring
    needs, from its config alone; with ``images`` the model loads and its massive activations are measured too."""
    from canprobe.inventory import inspect_model, inventory

    v = settings(model, *sections, **values)
    machine, generation = compose(Model, v), compose(Generation, v)
    if images is None:
        return inspect_model(machine.model, machine.dtype, machine.sites, machine.trust_remote_code), None
    from canprobe.massive import DEFAULT_RATIO, massive_activations
    from canprobe.models import load

    image_set = _images(images, v.get("images_per_category"), notes)
    lm = load(machine)
    inv = inventory(lm.model, machine.model, machine.dtype)
    report = massive_activations(lm, image_set.images, generation=generation, ratio=ratio or DEFAULT_RATIO)
    return inv, report


def neurons(folder, top: int | None = None, images=None, device: str | None = None):
    """(NeuronView, its page): where each critical neuron of a run or search ``folder`` fires (``canprobe.neurons``),
    saved in ``folder`` and drawn in its report (a search folder: neurons.html)."""
    from canprobe.neurons import folder_view
    from canprobe.report import build_report, neurons_page
    from canprobe.runfolder import NEURONS_PAGE, REPORT_FILE

    folder = Path(folder)
    check_output_file(folder / REPORT_FILE, "FOLDER")
    view, kind = folder_view(folder, top, images, device)
    return view, build_report([folder]) if kind == "run" else neurons_page(folder, folder / NEURONS_PAGE)


def experiment(config_file=None, *sections, restart: bool = False, progress: bool = True, **values):
    """The ``Experiment`` of a whole CAN study (``canprobe run``): a study YAML file, then section objects and
    keywords over it (a section object replaces the file's settings of its section). ``restart``: start
    over when ``out`` holds a run of another config (moved aside). ``.run()`` runs or resumes it, ``.plan()``
    says what it would run.
    """
    from canprobe.distributed import launched
    from canprobe.experiment import Experiment

    if launched():
        raise InputError(
            "canprobe run is one process per study (its stages resume from files); launch "
            "`canprobe score` and `canprobe search` under torchrun for data parallelism, or one run per GPU"
        )
    given = read_config_file(config_file) if config_file else {}
    for obj in sections:
        given.update(flat(obj))
    return Experiment(make_config({**given, **values}), progress=progress, restart=restart)


def study(config_file=None, *sections, restart: bool = False, progress: bool = True, **values) -> dict:
    """Run (or resume) a whole CAN study (``experiment``); its summary, also in ``out``/summary.json."""
    return experiment(config_file, *sections, restart=restart, progress=progress, **values).run()
