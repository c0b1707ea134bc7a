"""The ``canprobe`` command: a thin layer over the library that prints results.

Every error a user can fix ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import math
import sys
import traceback
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import click

from canprobe.checks import check_device, check_output_dir, check_output_file
from canprobe.config import SETTINGS
from canprobe.errors import CanprobeError
from canprobe.runfolder import CAPTIONS_FILE, check_run_folder

POSITIVE = click.IntRange(min=1)
SEED = click.IntRange(min=0, max=SETTINGS["seed"].high)


class FiniteFloat(click.FloatRange):
    """A float in a range that is a number: click's FloatRange lets nan (and inf when unbounded) through."""

    name = "float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def _click_type(name: str):
    s = SETTINGS[name]
    if s.choices is not None:
        return click.Choice(list(s.choices))
    bounded = s.low is not None or s.high is not None
    if s.kind is int:
        return click.IntRange(min=s.low, max=s.high) if bounded else click.INT
    if s.kind is float:
        return FiniteFloat(s.low, s.high, min_open=s.low_open, max_open=s.high_open)
    return None


def option(name: str, *flags: str, **overrides):
    """The command-line option of setting ``name`` (canprobe.config.SETTINGS): its type, choices, default, help.

    ``flags`` replace the flag derived from the name (``max_new_tokens`` -> ``--max-new-tokens``);
    ``overrides`` are passed to click (e.g. ``required=True``).
    """
    s = SETTINGS[name]
    flag = flags or ("--" + name.replace("_", "-"),)
    kwargs = {"default": s.default, "help": s.help, "show_default": s.default is not None}
    if s.kind is bool:
        if s.default:
            flag = (f"{flag[0]}/--no-{flag[0][2:]}",)
        else:
            kwargs.update(is_flag=True, show_default=False)
    else:
        kwargs["type"] = _click_type(name)
    kwargs.update(overrides)
    return click.option(*flag, name, **kwargs)


def _load(
    model: str,
    dtype: str,
    device: str | None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    sites: Path | None = None,
):
    from canprobe.models import load_model

    return load_model(
        model, dtype=dtype, device=device, device_map=device_map, trust_remote_code=trust_remote_code, sites=sites
    )


def _join_world(device: str | None):
    """Under torchrun / accelerate launch: join the process group; (world, device to use)."""
    from canprobe.distributed import init_from_env

    return init_from_env(device)


def _check_context(lm, image_set, prompt: str | None, max_new_tokens: int) -> None:
    """Refuse a prompt that leaves no room for the caption in the model's context, before any work."""
    if lm.family.takes_images:
        from canprobe.inputs import check_context

        check_context(lm, image_set.images[0], prompt, max_new_tokens)


def _print_plan(lines: Iterable[str]) -> None:
    for line in lines:
        click.echo(line)
    click.echo("dry run: nothing was loaded or written")


def _report_skipped(image_set) -> None:
    from canprobe.checks import printable
    from canprobe.runfolder import CAPTIONS_FILE

    if image_set.skipped:
        click.echo(f"skipped {len(image_set.skipped)} unreadable image(s) or nested folder(s):", err=True)
        for path, why in image_set.skipped:
            click.echo(f"  {printable(path)}: {why}", err=True)
    if image_set.unmatched_captions:
        names = image_set.unmatched_captions
        click.echo(
            f"ignored {len(names)} caption(s) of {CAPTIONS_FILE} naming no image file of the set, e.g. {names[0]}",
            err=True,
        )


model_option = option("model", required=True)
images_option = option("images", type=click.Path(path_type=Path), required=True)
dtype_option = option("dtype")
device_option = option("device", callback=lambda _ctx, _param, value: check_device(value))
device_map_option = option("device_map")
checkpointing_option = option("gradient_checkpointing")
reuse_option = option("reuse_features")
trust_option = option("trust_remote_code")
sites_option = option("sites", type=click.Path(path_type=Path, dir_okay=False))
dry_run_option = click.option("--dry-run", is_flag=True, help="Print what would run and the memory it needs; stop.")


def _compose(*decorators):
    """One decorator applying ``decorators`` in order (the options of several commands, declared once)."""

    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


runtime_options = _compose(
    dtype_option, device_option, device_map_option, checkpointing_option, reuse_option, dry_run_option
)
source_options = _compose(sites_option, trust_option)
# how a mask is evaluated (search, ablate): the fault, the metrics' models, the captions
evaluation_options = _compose(
    *(option(name) for name in ("ablation", "ppl_scorer", "clip_model", "prompt", "max_new_tokens", "batch_size"))
)


def _versions() -> list[str]:
    """canprobe, torch and transformers versions, and the devices torch sees."""
    import torch
    import transformers

    from canprobe import __version__

    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return [
        f"canprobe {__version__}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
        f"devices: {', '.join(devices)}",
    ]


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        for line in _versions():
            click.echo(line)
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress of the library.")
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print canprobe, torch and transformers versions and the devices seen; exit.",
)
def main(verbose: bool) -> None:
    """canprobe: find the neurons whose removal collapses a vision-language model (CAN)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not verbose:  # stderr is for errors (one line each); --verbose brings transformers' progress bars back
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@main.command("env")
def env_command() -> None:
    """canprobe, torch and transformers versions, and the devices torch sees (for bug reports)."""
    for line in _versions():
        click.echo(line)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write the image set to.")
@click.option("--per-category", type=POSITIVE, default=20, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--resolution", type=click.IntRange(min=16, max=1024), default=96, show_default=True)
def scenes(out: Path, per_category: int, seed: int, resolution: int) -> None:
    """Draw synthetic scenes: one folder per category plus captions.jsonl."""
    from canprobe.organisms.scenes import CATEGORIES, write_scenes

    check_run_folder(out)
    write_scenes(out, per_category, seed, resolution)
    click.echo(f"wrote {per_category * len(CATEGORIES)} scenes ({len(CATEGORIES)} categories) to {out}")


@main.command()
@model_option
@images_option
@click.option("--out", type=click.Path(path_type=Path), default=Path(CAPTIONS_FILE), show_default=True)
@option("prompt")
@option("max_new_tokens")
@option("batch_size")
@dtype_option
@device_option
@trust_option
def caption(model, images, out, prompt, max_new_tokens, batch_size, dtype, device, trust_remote_code) -> None:
    """Caption every image of an image set (JSON lines)."""
    from canprobe.captions import caption_image_set, exact_match_rate, write_captions
    from canprobe.data import load_image_set

    check_output_file(out, inputs=(images,))
    image_set = load_image_set(images)
    _report_skipped(image_set)
    lm = _load(model, dtype, device, trust_remote_code)
    _check_context(lm, image_set, prompt, max_new_tokens)
    records = caption_image_set(lm, image_set, prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size)
    write_captions(records, out)
    for r in records[:5]:
        click.echo(f"{r.image}: {r.caption}")
    rate = exact_match_rate(records)
    tail = f"; exact match with reference captions {rate:.1%}" if rate is not None else ""
    click.echo(f"wrote {len(records)} captions to {out}{tail}")


@main.group()
def organisms() -> None:
    """The small trained vision-language models shipped with canprobe."""


@organisms.command("train")
@click.argument("name", type=click.Choice(["toy-llava", "toy-instructblip", "toy-clip"]))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Defaults to the shipped location.")
@click.option("--steps", type=POSITIVE, default=None, help="Optimizer steps (default per organism).")
@click.option("--batch-size", type=POSITIVE, default=None)
@click.option("--seed", type=SEED, default=None)
@click.option(
    "--recipe",
    type=click.Choice(["scenes", "sink"]),
    default="scenes",
    show_default=True,
    help="scenes: captioning from scratch (the shipped weights). sink (toy-llava, needs --out): the language "
    "model pretrained on packed text first (Stage A), then aligned to images with it frozen, then at a low "
    "learning rate (Stage B); curves in sink_curve.jsonl. Its default budget is a GPU job (minutes on an H200, "
    "days on 2 CPU cores).",
)
@click.option("--text-tokens", type=POSITIVE, default=None, help="sink recipe: Stage A's token budget.")
@device_option
def organisms_train(name, out, steps, batch_size, seed, recipe, text_tokens, device) -> None:
    """Train organism NAME on drawn scenes and save it as a Hugging Face checkpoint."""
    import dataclasses

    from canprobe.errors import InputError
    from canprobe.models import ORGANISM_DIR
    from canprobe.organisms.train import DEFAULT_CONFIGS, train_organism

    if recipe == "sink":
        if name != "toy-llava" or out is None or steps is not None:
            raise InputError(
                "--recipe sink trains toy-llava into a folder given with --out (no --steps: --text-tokens)"
            )
        _train_sink(check_output_dir(out), batch_size, seed, text_tokens, device or "cpu")
        return
    if text_tokens is not None:
        raise InputError("--text-tokens belongs to --recipe sink")
    config = DEFAULT_CONFIGS[name]
    changes = {k: v for k, v in dict(steps=steps, batch_size=batch_size, seed=seed).items() if v is not None}
    config = dataclasses.replace(config, **changes)
    out = check_output_dir(out or ORGANISM_DIR / name)
    logging.getLogger("canprobe").setLevel(logging.INFO)
    result = train_organism(name, out, config, device=device or "cpu")
    click.echo(
        f"trained {name} ({result.parameters:,} parameters) in {result.seconds:.0f} s: "
        f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; saved to {out}"
    )


def _train_sink(out: Path, batch_size: int | None, seed: int | None, text_tokens: int | None, device: str) -> None:
    import dataclasses

    from canprobe.organisms.sink import CURVE_FILE, AlignConfig, PretrainConfig, train_sink_recipe

    changes = dict(batch_size=batch_size, seed=seed, tokens=text_tokens)
    pretrain = dataclasses.replace(PretrainConfig(), **{k: v for k, v in changes.items() if v is not None})
    align = AlignConfig() if seed is None else dataclasses.replace(AlignConfig(), seed=seed)
    logging.getLogger("canprobe").setLevel(logging.INFO)
    stage_a, stage_b = train_sink_recipe(out, pretrain, align, device=device)
    last = stage_a.curve[-1]
    peak = last["layers"][last["peak_layer"]]
    click.echo(
        f"Stage A: {stage_a.tokens:,} tokens in {stage_a.seconds:.0f} s ({stage_a.tokens / stage_a.seconds:,.0f}/s); "
        f"first-token max|h|/median {peak['first_ratio']:.0f}x at layer {last['peak_layer']} "
        f"(other tokens {peak['rest_ratio']:.0f}x)"
    )
    click.echo(
        f"Stage B: {stage_b.steps} steps in {stage_b.seconds:.0f} s; saved to {out}, curves in {out / CURVE_FILE}"
    )


@organisms.command("eval")
@click.argument("name")
@click.option("--n", "count", type=POSITIVE, default=200, show_default=True)
@click.option("--seed", type=SEED, default=7, show_default=True, help="Scene seed; training uses 1234.")
def organisms_eval(name, count, seed) -> None:
    """Held-out accuracy of a captioning or CLIP model on drawn scenes."""
    from canprobe.organisms.evaluate import caption_exact_match, clip_category_accuracy

    lm = _load(name, "float32", None)
    if not lm.family.generates:
        click.echo(
            f"{name}: true caption beats other-category caption on {clip_category_accuracy(lm, count, seed):.1%}"
        )
    else:
        click.echo(f"{name}: exact-match captions on {caption_exact_match(lm, count, seed):.1%} of {count} scenes")


# --- inspect and score: neuron sites and CAN scoring ---


@main.command("inspect")
@click.argument("model")
@dtype_option
@device_option
@click.option(
    "--activations",
    is_flag=True,
    help="Also measure the language model's residual stream on --images: massive activations.",
)
@option("images", type=click.Path(path_type=Path))
@option("images_per_category", "--per-category")
@click.option(
    "--ratio",
    type=FiniteFloat(min=1.0, min_open=True),
    default=100.0,
    show_default=True,
    help="An activation is massive at this many times its sequence's median |h|.",
)
@option("prompt")
@option("batch_size")
@source_options
def inspect_command(
    model: str,
    dtype: str,
    device: str | None,
    activations: bool,
    images: Path | None,
    images_per_category: int | None,
    ratio: float,
    prompt: str | None,
    batch_size: int,
    sites: Path | None,
    trust_remote_code: bool,
) -> None:
    """Neuron sites of MODEL per component and kind, and the memory scoring needs.

    MODEL is a shipped config (llava-1.5-7b, instructblip-vicuna-7b), a local folder or a hub id:
    built on the meta device from its config.json alone (no weights read, a folder may hold only
    the config). With --activations --images DIR it also lists
    the massive activations of the language model's residual stream (layer, position, token, dim,
    value, ratio to the median) and the down_proj channels that write them.
    """
    from canprobe.errors import InputError
    from canprobe.inventory import format_inventory, inspect_model, inventory

    if activations != (images is not None):
        raise InputError("--activations and --images go together: --activations --images DIR")
    if not activations:
        inv = inspect_model(model, dtype=dtype, sites=sites, trust_remote_code=trust_remote_code)
        for line in format_inventory(inv):
            click.echo(line)
        return
    from canprobe.massive import format_activations, massive_activations

    image_set = _image_subset(images, images_per_category)
    lm = _load(model, dtype, device, trust_remote_code, sites=sites)
    for line in format_inventory(inventory(lm.model, model, dtype)):
        click.echo(line)
    report = massive_activations(lm, image_set.images, prompt=prompt, ratio=ratio, batch_size=batch_size)
    for line in format_activations(report):
        click.echo(line)


@main.command("score")
@model_option
@images_option
@option("scope")
@option("method")
@option("alpha")
@option("reduction")
@option("loss_text", "--captions")
@option("prompt")
@option("batch_size")
@option("max_new_tokens")
@option("seed")
@click.option("--out", type=click.Path(path_type=Path), default=Path("canprobe-scores"), show_default=True)
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True, help="Rows of the ranking to print.")
@runtime_options
@source_options
def score_command(images, out, top, dry_run, **options) -> None:
    """Score every neuron in SCOPE over an image set; write scores.safetensors and ranking.parquet.

    Under torchrun each process scores its shard of the images; rank 0 writes the files.
    """
    import dataclasses

    from canprobe.config import Generation, Model, Scoring, compose
    from canprobe.data import load_image_set
    from canprobe.errors import InputError
    from canprobe.scoring import score_sections

    scope, options["sites"] = options.pop("scope"), _str(options["sites"])
    machine, scoring, generation = (compose(cls, options) for cls in (Model, Scoring, Generation))
    check_run_folder(out, inputs=(images,))
    world, device = _join_world(machine.device)
    machine = dataclasses.replace(machine, device=device)
    image_set = load_image_set(images)
    captions = None
    if scoring.loss_text == "reference":
        missing = [r.name for r in image_set.records if r.caption is None]
        if missing:
            raise InputError(f"--captions reference: no caption for {len(missing)} image(s), e.g. {missing[0]}")
        captions = [r.caption for r in image_set.records]
    if dry_run:
        from canprobe.plan import make_plan

        rows = generation.batch_size
        plan = make_plan(
            machine.model,
            len(image_set),
            scope,
            machine.dtype,
            rows,
            rows,
            generation.max_new_tokens,
            world.size,
            machine.gradient_checkpointing,
        )
        _print_plan(plan.lines)
        return
    if world.main:
        _report_skipped(image_set)
    from canprobe.runfolder import RunLock

    with RunLock(out) if world.main else nullcontext():  # a folder in use is refused before any work
        from canprobe.models import load

        lm = load(machine)
        _check_context(lm, image_set, generation.prompt, generation.max_new_tokens)
        inputs = _generation_inputs(lm, image_set)
        result = score_sections(lm, inputs, scope, scoring, generation, machine, captions)
        if world.main:
            result.save(out)
    if not world.main:
        return
    ranking = result.ranking()
    for row in ranking.head(top).itertuples():
        click.echo(f"{row.rank:6d}  {row.score:12.6g}  {row.address}")
    click.echo(
        f"scored {len(ranking):,} neurons in {len(result.sites)} sites over {len(image_set)} images "
        f"({scoring.method}, reduction {scoring.reduction}, {scoring.loss_text} captions, {world.size} process(es)); "
        f"wrote {out}"
    )
    nan = int(ranking["score"].isna().sum())
    if nan:  # kept on disk as computed; search, ablate and run refuse to use them
        click.echo(
            f"warning: {nan} neuron(s) have NaN scores (an overflow, or NaN from the model): search, ablate and "
            "run refuse this ranking; try --dtype float32",
            err=True,
        )


# --- search and ablate: masking, collapse metrics and the k* search ---


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _load_ranking(path: Path):
    from canprobe.scoring import load_ranking

    return load_ranking(path)


def _generation_inputs(lm, image_set) -> list:
    """What the model generates from: the images, or, for a text-only model, the texts of the set's captions.jsonl."""
    from canprobe.errors import InputError

    if lm.family.takes_images:
        return image_set.images
    missing = [r.name for r in image_set.records if r.caption is None]
    if missing:
        raise InputError(
            f"{lm.source} is a text-only model: it continues the texts of captions.jsonl, "
            f"and {len(missing)} record(s) have none, e.g. {missing[0]}"
        )
    return [r.caption for r in image_set.records]


def _image_subset(images: Path, per_category: int | None, report: bool = True):
    from canprobe.data import load_image_set

    image_set = load_image_set(images, limit=per_category)
    if report:
        _report_skipped(image_set)
    return image_set


@main.command("search")
@model_option
@images_option
@option("scope")
@click.option("--ranking", type=click.Path(path_type=Path), default=None, help="ranking.parquet (or its folder).")
@option("method")
@option("alpha")
@option("out", type=click.Path(path_type=Path), required=True, default=None)
@option("control")
@option("control_at")
@option("seed")
@option("stage1_ppl_ratio")
@option("stage1_clip_ratio")
@option("collapse_ppl_ratio")
@option("collapse_clip_ratio")
@option("growth")
@option("k_per_round")
@option("grid_per_octave")
@option("max_k")
@evaluation_options
@option("n_samples", "--samples")
@option("images_per_category", "--per-category")
@option("decoding")
@runtime_options
@source_options
def search_command(images, ranking, out, images_per_category, dry_run, **options) -> None:
    """Find k*: the fewest top-ranked neurons of SCOPE whose masking collapses the captions.

    Without --ranking, the neurons are scored with --method and --alpha first, and the ranking is saved in --out.
    """
    import dataclasses

    from canprobe.config import Model, Scoring, SearchConfig, compose, names
    from canprobe.evaluation import default_clip_model, load_scorers
    from canprobe.faults import check_fault
    from canprobe.models import load
    from canprobe.runfolder import RANKING_FILE, RunLock
    from canprobe.scoring import check_ranking_model, folder_ranking
    from canprobe.search import find_k_star

    options["sites"] = _str(options["sites"])
    options["clip_model"] = options["clip_model"] or default_clip_model(options["model"])
    machine, scoring = compose(Model, options), compose(Scoring, options)
    config = SearchConfig.of(**{k: v for k, v in options.items() if k in names(SearchConfig)})
    check_fault(config.evaluation.ablation, machine.dtype)
    check_run_folder(out, inputs=(images,))
    world, device = _join_world(machine.device)
    machine = dataclasses.replace(machine, device=device)
    image_set = _image_subset(images, images_per_category, report=world.main)
    table = _load_ranking(ranking) if ranking is not None else None  # a bad file fails before any work
    if dry_run:
        from canprobe.plan import make_plan

        rows = config.generation.batch_size
        plan = make_plan(
            machine.model,
            len(image_set),
            config.scope,
            machine.dtype,
            rows,
            rows,
            config.generation.max_new_tokens,
            world.size,
            machine.gradient_checkpointing,
            searches=1,
            growth=config.search.growth,
        )
        _print_plan(plan.lines)
        return
    # rank 0 holds the folder before the model loads, and while the search appends to it
    with RunLock(out) if world.main else nullcontext():
        lm = load(machine)
        inputs = _generation_inputs(lm, image_set)
        _check_context(lm, image_set, config.generation.prompt, config.generation.max_new_tokens)
        if table is not None:
            check_ranking_model(table, lm)
        else:
            if world.main and not (out / RANKING_FILE).exists():
                what = f"{config.scope} with {scoring.method} (alpha {scoring.alpha}) over {len(image_set)} images"
                click.echo(f"no --ranking: scoring {what}")
            table = folder_ranking(lm, inputs, out, config.scope, scoring, config.generation, machine)
        clip, ppl_lm = load_scorers(lm, machine, config.evaluation)
        image_names = [r.name for r in image_set.records]
        reuse = machine.reuse_features
        result = find_k_star(lm, inputs, table, clip, config, out, image_names, ppl_lm=ppl_lm, reuse_features=reuse)
    if world.main:
        _print_search(result, out)


def _print_search(result, out: Path) -> None:
    from canprobe.metrics import METRICS

    s, base = result.summary, result.baseline
    click.echo(
        f"unmasked: median PPL {_fmt(base.ppl_median)}, mean CLIP {_fmt(base.clip_mean)} over {base.n_images} images"
    )
    click.echo(f"criterion: {s['criterion']['text']}")
    widths = {name: max(len(metric.label), 7) for name, metric in METRICS.items()}
    labels = " ".join(f"{metric.label:>{widths[name]}}" for name, metric in METRICS.items())
    click.echo(f"{'k':>7} {'control':>7} {'phase':>8} {'stage':>9} {labels}  sample caption")
    for control in ("top", "random"):
        for p in result.curve(control):
            values = " ".join(f"{m.format(getattr(p.metrics, n)):>{widths[n]}}" for n, m in METRICS.items())
            sample = p.captions[0]["caption"] if p.captions else ""
            click.echo(f"{p.k:7d} {p.control:>7} {p.phase:>8} {p.stage:>9} {values}  {sample[:40]}")
    ev = s["evaluations"]
    click.echo(
        f"evaluated {ev['this_run']} point(s) now, {ev['resumed']} resumed from {out}; "
        f"the search itself took {ev['search']} (baseline, growth, bisection)"
    )
    click.echo(f"stage 1 (degraded) from k = {s['stage1_k']}")
    if result.k_star is None:
        click.echo(f"k* = none: no collapse up to k = {s['max_k']} of {s['scope']}")
    else:
        click.echo(f"k* = {result.k_star} ({s['scope']}, {s['scope_size']} neurons in scope)")
        if not s["monotone"]:
            click.echo("note: collapse is not monotone in k here; see every point in curve.jsonl")
    if s["random"] is not None and s["random"]["at_k_star"] is not None:
        r = s["random"]["at_k_star"]
        click.echo(
            f"random control at k* = {result.k_star}: {r['stage']} "
            f"(median PPL {_fmt(r['ppl_median'])}, mean CLIP {_fmt(r['clip_mean'])})"
        )


@main.command("ablate")
@model_option
@images_option
@click.option("--neurons", default=None, help="Comma-separated addresses, e.g. language.layers.1.mlp.down_proj:7.")
@click.option("--top", "top_k", type=click.IntRange(min=0), default=None, help="Mask the top K of --ranking.")
@click.option("--ranking", type=click.Path(path_type=Path), default=None, help="ranking.parquet (or its folder).")
@option("scope", default=None, show_default=False, help="With --top: count only the ranking's neurons in this scope.")
@evaluation_options
@option("images_per_category", "--per-category")
@option("decoding")
@dtype_option
@device_option
@source_options
def ablate_command(model, images, neurons, top_k, ranking, scope, ablation, ppl_scorer, clip_model, prompt, **rest):
    """Captions and metrics with one mask, side by side with the unmasked model."""
    from canprobe.ablation import fault_stats, group_by_site
    from canprobe.config import Evaluation, Generation, Model
    from canprobe.errors import InputError
    from canprobe.evaluation import MaskEvaluator, load_scorers
    from canprobe.faults import check_fault
    from canprobe.metrics import METRICS, MetricSummary
    from canprobe.sites import SiteRegistry, parse_address

    fault = check_fault(ablation, rest["dtype"])
    if (neurons is None) == (top_k is None):
        raise InputError("give exactly one of --neurons ADDR,ADDR,... and --top K (with --ranking)")
    if top_k is not None and ranking is None:
        raise InputError("--top K needs --ranking ranking.parquet from `canprobe score`")
    addresses = [a.strip() for a in neurons.split(",") if a.strip()] if neurons is not None else []
    if neurons is not None and not addresses:
        raise InputError(f"--neurons {neurons!r} names no neuron; give e.g. language.layers.1.mlp.down_proj:7")
    unique = list(dict.fromkeys(str(parse_address(a)) for a in addresses))
    if len(unique) < len(addresses):
        click.echo(f"note: --neurons names {len(unique)} distinct neuron(s) in {len(addresses)} addresses")
    addresses = unique
    table = _load_ranking(ranking) if top_k is not None else None  # a bad file fails before the model loads
    image_set = _image_subset(images, rest["images_per_category"])
    lm = _load(model, rest["dtype"], rest["device"], rest["trust_remote_code"], sites=rest["sites"])
    inputs = _generation_inputs(lm, image_set)
    _check_context(lm, image_set, prompt, rest["max_new_tokens"])
    registry = SiteRegistry.of(lm.model)
    if top_k is not None:
        from canprobe.scoring import check_ranking_model
        from canprobe.search import ranked_in_scope

        check_ranking_model(table, lm)
        ranked = ranked_in_scope(registry, table, scope or "all")
        if top_k > len(ranked):
            where = f"scope {scope}" if scope else "the ranking"
            raise InputError(f"--top {top_k} is larger than the {len(ranked)} ranked neurons in {where}")
        mask = ranked.prefix(top_k)
        label = f"top {top_k}"
    else:
        mask = group_by_site(registry, addresses)
        label = f"{len(addresses)} neuron(s)"
    generation = Generation(
        prompt=prompt, max_new_tokens=rest["max_new_tokens"], batch_size=rest["batch_size"], decoding=rest["decoding"]
    )
    sites = [registry.by_name[n] for n in mask]
    stats = fault_stats(lm, inputs, sites, [ablation], generation) if mask else None
    machine = Model(model=model, device=rest["device"])
    clip, ppl_lm = load_scorers(
        lm, machine, Evaluation(ablation=ablation, ppl_scorer=ppl_scorer, clip_model=clip_model)
    )
    evaluator = MaskEvaluator(
        lm,
        inputs,
        clip,
        ppl_scorer=ppl_scorer,
        prompt=prompt,
        max_new_tokens=rest["max_new_tokens"],
        batch_size=rest["batch_size"],
        kind=fault,
        stats=stats,
        ppl_lm=ppl_lm,
        decoding=rest["decoding"],
    )
    unmasked = evaluator.evaluate_baseline()
    (masked,) = evaluator.evaluate([mask])
    for record, u, m in zip(image_set.records, unmasked, masked):
        click.echo(f"{record.name}")
        click.echo(f"  unmasked  PPL {_fmt(u.ppl):>8}  CLIP {u.clip:6.2f}  {u.caption}")
        click.echo(f"  masked    PPL {_fmt(m.ppl):>8}  CLIP {m.clip:6.2f}  {m.caption}")
    for name, metrics in (("unmasked", unmasked), (f"masked ({label}, {ablation})", masked)):
        s = MetricSummary.of(metrics)
        click.echo(f"{name}: " + ", ".join(f"{m.label} {m.format(getattr(s, n))}" for n, m in METRICS.items()))


# --- run, report, compare, demo: the whole study ---


def _config_flags(func):
    """One flag per ExperimentConfig field, from the settings table; no default, so a config file's value stands.

    Help text and the default shown are the setting's, as in every other command. Lists are
    comma-separated (their choices are checked by the config), booleans are --x/--no-x.
    """
    from canprobe.config import config_fields

    for name, annotation in reversed(list(config_fields().items())):
        s = SETTINGS[name]
        flag = "--" + name.replace("_", "-")
        shown = {"show_default": str(s.default)} if s.default is not None else {}
        if s.kind is bool:
            decl = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=s.help, **shown)
        elif "list" in str(annotation):
            decl = click.option(flag, name, default=None, metavar="A,B,...", help=s.help, **shown)
        else:  # plain types: the config validates the value and names the field, as for a config file
            plain = {int: click.INT, float: click.FLOAT}.get(s.kind)
            decl = click.option(flag, name, type=plain, default=None, help=s.help, **shown)
        func = decl(func)
    return func


def _print_summary(summaries: list[dict]) -> None:
    click.echo(
        f"{'model':18s} {'scope':22s} {'category':10s} {'k*':>6s} {'of':>7s} {'stage 1':>8s} {'random':>8s} "
        f"{'mean abl':>8s}"
    )
    control = {None: "-", True: "collapse", False: "healthy"}
    for summary in summaries:
        for r in summary["results"]:
            k_star = "none" if r["k_star"] is None else str(r["k_star"])
            stage1 = "-" if r["stage1_k"] is None else str(r["stage1_k"])
            click.echo(
                f"{summary['model']:18s} {r['scope']:22s} {r['category']:10s} {k_star:>6s} {r['n_neurons']:>7d} "
                f"{stage1:>8s} {control[r['random_collapsed']]:>8s} {control[r['mean_ablation_collapsed']]:>8s}"
            )
        for entry in summary.get("robustness", []):
            from canprobe.report import fault_headline

            click.echo(f"{summary['model']} {entry['scope']} ({entry['category']}): {fault_headline(entry)}")


@main.command("run")
@click.argument("config_file", required=False, type=click.Path(path_type=Path))
@click.option("--restart", is_flag=True, help="Start over when --out holds a run of another config (moved aside).")
@dry_run_option
@_config_flags
def run_command(config_file: Path | None, restart: bool, dry_run: bool, **flags) -> None:
    """Run a whole CAN study from CONFIG_FILE (YAML) and/or flags; rerunning resumes."""
    from canprobe.config import config_fields, make_config, read_config_file
    from canprobe.distributed import launched
    from canprobe.errors import InputError
    from canprobe.experiment import Experiment
    from canprobe.runfolder import REPORT_FILE

    if launched():
        raise InputError(
            "canprobe run is one process per study (its stages resume from files); launch "
            "`canprobe score` and `canprobe search` under torchrun for data parallelism, or one run per GPU"
        )

    values = read_config_file(config_file) if config_file else {}
    for name, value in flags.items():
        if value is None:
            continue
        annotation = str(config_fields()[name])
        if "list" in annotation:
            value = [v.strip() for v in value.split(",") if v.strip()]
            if "list[int]" in annotation:
                if not all(v.lstrip("-").isdigit() for v in value):
                    raise InputError(f"--{name.replace('_', '-')}: give comma-separated whole numbers")
                value = [int(v) for v in value]
        values[name] = value
    experiment = Experiment(make_config(values), restart=restart)
    if dry_run:
        _print_plan(experiment.plan())
        return
    summary = experiment.run()
    _print_summary([summary])
    click.echo(f"report: {Path(experiment.out) / REPORT_FILE}")


@main.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: report.html in the first run.")
def report_command(runs: tuple[Path, ...], out: Path | None) -> None:
    """(Re)build the HTML report of one or more run folders."""
    from canprobe.report import build_report
    from canprobe.runfolder import REPORT_FILE

    check_output_file(out if out is not None else runs[0] / REPORT_FILE, inputs=runs, suffix=".html")
    click.echo(f"report: {build_report(list(runs), out)}")


@main.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("compare.html"), show_default=True)
def compare_command(runs: tuple[Path, ...], out: Path) -> None:
    """k* of several runs (models) side by side: a table here and a figure in --out."""
    from canprobe.report import compare_runs

    check_output_file(out, inputs=runs, suffix=".html")
    table, path = compare_runs(list(runs), out)
    click.echo(table.to_string(index=False))
    click.echo(f"figure: {path}")


@main.command("neurons")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--top", type=POSITIVE, default=None, help="Top N neurons of each scope [default: its k* set, at most 16]."
)
@click.option("--images", type=click.Path(path_type=Path), default=None, help="Image set folder [default: the run's].")
@option("device", callback=lambda _ctx, _param, value: check_device(value))
def neurons_command(folder: Path, top: int | None, images: Path | None, device: str | None) -> None:
    """Where each critical neuron of a run or search FOLDER fires: per position, image patch and image.

    Writes neurons.parquet (neuron, image, position, value) and neurons.json into FOLDER, and the
    neurons section of its report (a search folder: neurons.html).
    """
    from canprobe.neurons import folder_view
    from canprobe.report import build_report, neurons_page
    from canprobe.runfolder import NEURONS_FILE, NEURONS_PAGE, REPORT_FILE

    check_output_file(folder / REPORT_FILE, "FOLDER")
    view, kind = folder_view(folder, top, images, device)
    for s in view.stats:
        click.echo(
            f"{s['neuron']}: rank {s['rank']}, mean {_fmt(s['mean'])} +- {_fmt(s['std'])}, largest {_fmt(s['max'])} "
            f"({s['max_kind']}, position {s['max_position']}), among the {view.most_active} most active of its site "
            f"on {s['consistency']:.0%} of {len(view.images)} images"
        )
    path = build_report([folder]) if kind == "run" else neurons_page(folder, folder / NEURONS_PAGE)
    click.echo(f"table: {folder / NEURONS_FILE}; figures: {path}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("canprobe-demo"), show_default=True)
@click.option("--per-category", type=POSITIVE, default=4, show_default=True, help="Scenes per category.")
def demo(out: Path, per_category: int) -> None:
    """The paper's study on toy-llava and toy-instructblip with built-in scenes, ending in report.html.

    Language and vision scopes, stage 1 and k*, random and mean-ablation controls, and the
    language model's massive activations; one summary line per model at the end.
    """
    from canprobe.demo import ORGANISMS, run_story, story_line
    from canprobe.massive import format_activations
    from canprobe.organisms.scenes import write_scenes
    from canprobe.report import build_report
    from canprobe.runfolder import REPORT_FILE

    check_run_folder(out)
    images = write_scenes(out / "scenes", per_category, seed=11)
    stories = []
    for name in ORGANISMS:
        click.echo(f"== {name}")
        stories.append(run_story(name, images, out))
    path = build_report([d for s in stories for d in s.run_dirs], out / REPORT_FILE)
    _print_summary([summary for s in stories for summary in s.summaries])
    for story in stories:
        click.echo(f"== {story.name}: massive activations on the demo scenes")
        for line in format_activations(story.activations, limit=5):
            click.echo(line)
    click.echo(f"report: {path}")
    for story in stories:
        click.echo(story_line(story))


def run() -> None:
    """Entry point: click's usage errors and canprobe's own errors become one line and exit 2.

    Under torchrun the ranks end together (``distributed.Ending``): every rank meets the others
    before tearing its group down, and a failure on one rank ends all of them with its line and code.
    """
    from canprobe.distributed import Ending

    ending = Ending.start()
    try:
        main.main(standalone_mode=False)
    except click.exceptions.Abort:
        _leave(ending, 130, "canprobe: aborted")
    except click.ClickException as exc:
        _leave(ending, 2, f"canprobe: error: {exc.format_message()}")
    except CanprobeError as exc:
        _leave(ending, 2, f"canprobe: error: {exc}")
    except Exception as exc:
        if ending is not None:  # a bug on this rank: the others stop too, not at the collective's timeout
            traceback.print_exc()
            _leave(ending, 1, f"canprobe: rank {ending.rank} stopped: {type(exc).__name__}: {exc}")
        raise
    if ending is not None:
        ending.succeed()


def _leave(ending, code: int, line: str) -> None:
    if ending is None:
        click.echo(line, err=True)
        sys.exit(code)
    ending.fail(code, line)


if __name__ == "__main__":
    run()
