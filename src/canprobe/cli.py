"""The ``canprobe`` command: options from the settings table, one ``canprobe.api`` call, its lines printed.

Every error a user can fix ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import click

from canprobe import api, config, console
from canprobe.checks import check_output_dir, check_output_file
from canprobe.errors import CanprobeError, InputError
from canprobe.options import NOT_RUN, POSITIVE, REQUIRED, SEED, FiniteFloat, dry_run_option, option, options
from canprobe.runfolder import CAPTIONS_FILE, REPORT_FILE, check_run_folder


def _echo(lines, err: bool = False) -> None:
    for line in lines:
        click.echo(line, err=err)


def _note(line: str, warning: bool) -> None:
    click.echo(line, err=warning)


def _print_plan(lines) -> None:
    _echo([*lines, "dry run: nothing was loaded or written"])


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        _echo(console.versions())
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
    _echo(console.versions())


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
@options("model", "images", **REQUIRED)
@click.option("--out", type=click.Path(path_type=Path), default=Path(CAPTIONS_FILE), show_default=True)
@options(config.Model, config.Generation, without=("model", "sites", *NOT_RUN, "decoding"))
def caption(images, out, **settings) -> None:
    """Caption every image of an image set (JSON lines)."""
    _echo(console.captions(api.caption(settings.pop("model"), images, out, notes=_note, **settings), out))


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
@click.option("--text-tokens", "tokens", type=POSITIVE, default=None, help="sink recipe: Stage A's token budget.")
@option("device")
def organisms_train(name, out, recipe, device, **changes) -> None:
    """Train organism NAME on drawn scenes and save it as a Hugging Face checkpoint."""
    from canprobe.models import ORGANISM_DIR
    from canprobe.organisms.recipes import train_recipe

    if recipe == "sink" and (name != "toy-llava" or out is None or changes["steps"] is not None):
        raise InputError("--recipe sink trains toy-llava into a folder given with --out (no --steps: --text-tokens)")
    if recipe != "sink" and changes["tokens"] is not None:
        raise InputError("--text-tokens belongs to --recipe sink")
    out = check_output_dir(out or ORGANISM_DIR / name)
    logging.getLogger("canprobe").setLevel(logging.INFO)
    _echo(train_recipe(name, out, recipe, device or "cpu", **changes))


@organisms.command("eval")
@click.argument("name")
@click.option("--n", "count", type=POSITIVE, default=200, show_default=True)
@click.option("--seed", type=SEED, default=7, show_default=True, help="Scene seed; training uses 1234.")
def organisms_eval(name, count, seed) -> None:
    """Held-out accuracy of a captioning or CLIP model on drawn scenes."""
    from canprobe.organisms.evaluate import held_out

    click.echo(held_out(name, count, seed))


@main.command("inspect")
@click.argument("model")
@click.option(
    "--activations",
    is_flag=True,
    help="Also measure the language model's residual stream on --images: massive activations.",
)
@options("images", "images_per_category")
@click.option(
    "--ratio",
    type=FiniteFloat(min=1.0, min_open=True),
    default=100.0,
    show_default=True,
    help="An activation is massive at this many times its sequence's median |h|.",
)
@options(config.Model, config.Generation, without=("model", *NOT_RUN, "max_new_tokens", "decoding"))
def inspect_command(model: str, activations: bool, images: Path | None, ratio: float, **settings) -> None:
    """Neuron sites of MODEL per component and kind, and the memory scoring needs.

    MODEL is a shipped config (llava-1.5-7b, instructblip-vicuna-7b), a local folder or a hub id:
    built on the meta device from its config.json alone (no weights read, a folder may hold only
    the config). With --activations --images DIR it also lists
    the massive activations of the language model's residual stream (layer, position, token, dim,
    value, ratio to the median) and the down_proj channels that write them.
    """
    from canprobe.inventory import format_inventory
    from canprobe.massive import format_activations

    if activations != (images is not None):
        raise InputError("--activations and --images go together: --activations --images DIR")
    inv, report = api.inspect(model, images, ratio=ratio, notes=_note, **settings)
    _echo(format_inventory(inv) + (format_activations(report) if report is not None else []))


@main.command("score")
@options("model", "images", "scope", config.Scoring, **REQUIRED)
@click.option("--out", type=click.Path(path_type=Path), default=Path("canprobe-scores"), show_default=True)
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True, help="Rows of the ranking to print.")
@options(config.Generation, config.Model, without=("decoding", "model"))
@dry_run_option
def score_command(images, out, top, dry_run, **settings) -> None:
    """Score every neuron in SCOPE over an image set; write scores.safetensors and ranking.parquet.

    Under torchrun each process scores its shard of the images; rank 0 writes the files.
    """
    from canprobe.distributed import world

    result = api.score(settings.pop("model"), images, out, dry_run=dry_run, notes=_note, **settings)
    if dry_run:
        _print_plan(result.lines)
    elif world().main:
        _echo(console.scores(result, top, out))
        _echo(console.nan_scores(result), err=True)


@main.command("search")
@options("model", "images", "images_per_category", **REQUIRED)
@click.option("--ranking", type=click.Path(path_type=Path), default=None, help="ranking.parquet (or its folder).")
@options("method", "alpha", "out", out={"required": True, "default": None})
@options(config.SearchConfig, config.Model, without=("model",))
@dry_run_option
def search_command(images, ranking, out, dry_run, **settings) -> None:
    """Find k*: the fewest top-ranked neurons of SCOPE whose masking collapses the captions.

    Without --ranking, the neurons are scored with --method and --alpha first, and the ranking is saved in --out.
    """
    from canprobe.distributed import world

    result = api.search(settings.pop("model"), images, out, ranking=ranking, dry_run=dry_run, notes=_note, **settings)
    if dry_run:
        _print_plan(result.lines)
    elif world().main:
        _echo(console.search(result, out))


@main.command("ablate")
@options("model", "images", **REQUIRED)
@click.option("--neurons", default=None, help="Comma-separated addresses, e.g. language.layers.1.mlp.down_proj:7.")
@click.option("--top", "top_k", type=click.IntRange(min=0), default=None, help="Mask the top K of --ranking.")
@click.option("--ranking", type=click.Path(path_type=Path), default=None, help="ranking.parquet (or its folder).")
@option("scope", default=None, show_default=False, help="With --top: count only the ranking's neurons in this scope.")
@options(config.Evaluation, config.Generation, "images_per_category", config.Model, without=("model", *NOT_RUN))
def ablate_command(model, images, neurons, top_k, ranking, **settings):
    """Captions and metrics with one mask, side by side with the unmasked model."""
    result = api.ablate(model, images, neurons=neurons, top=top_k, ranking=ranking, notes=_note, **settings)
    _echo(console.ablation(result))


@main.command("run")
@click.argument("config_file", required=False, type=click.Path(path_type=Path))
@click.option("--restart", is_flag=True, help="Start over when --out holds a run of another config (moved aside).")
@dry_run_option
@options(config.ExperimentConfig, study=True)
def run_command(config_file: Path | None, restart: bool, dry_run: bool, **flags) -> None:
    """Run a whole CAN study from CONFIG_FILE (YAML) and/or flags; rerunning resumes."""
    experiment = api.experiment(config_file, restart=restart, **{k: v for k, v in flags.items() if v is not None})
    if dry_run:
        _print_plan(experiment.plan())
        return
    _echo([*console.study([experiment.run()]), f"report: {experiment.out / REPORT_FILE}"])


@main.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: report.html in the first run.")
def report_command(runs: tuple[Path, ...], out: Path | None) -> None:
    """(Re)build the HTML report of one or more run folders."""
    from canprobe.report import build_report

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
    _echo([table.to_string(index=False), f"figure: {path}"])


@main.command("neurons")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--top", type=POSITIVE, default=None, help="Top N neurons of each scope [default: its k* set, at most 16]."
)
@click.option("--images", type=click.Path(path_type=Path), default=None, help="Image set folder [default: the run's].")
@option("device")
def neurons_command(folder: Path, top: int | None, images: Path | None, device: str | None) -> None:
    """Where each critical neuron of a run or search FOLDER fires: per position, image patch and image.

    Writes neurons.parquet (neuron, image, position, value) and neurons.json into FOLDER, and the
    neurons section of its report (a search folder: neurons.html).
    """
    from canprobe.runfolder import NEURONS_FILE

    view, path = api.neurons(folder, top, images, device)
    _echo([*console.neurons(view), f"table: {folder / NEURONS_FILE}; figures: {path}"])


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("canprobe-demo"), show_default=True)
@click.option("--per-category", type=POSITIVE, default=4, show_default=True, help="Scenes per category.")
def demo(out: Path, per_category: int) -> None:
    """The paper's study on toy-llava and toy-instructblip with built-in scenes, ending in report.html.

    Language and vision scopes, stage 1 and k*, random and mean-ablation controls, and the
    language model's massive activations; one summary line per model at the end.
    """
    from canprobe.demo import demo as run_demo

    _echo(run_demo(check_run_folder(out), per_category))


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
