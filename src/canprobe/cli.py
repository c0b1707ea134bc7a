"""The ``canprobe`` command: a thin layer over the library that prints results.

Every error a user can fix ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from canprobe.errors import CanprobeError

POSITIVE = click.IntRange(min=1)


def _load(model: str, dtype: str, device: str | None, trust_remote_code: bool = False):
    from canprobe.models import load_model

    return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _report_skipped(image_set) -> None:
    if image_set.skipped:
        click.echo(f"skipped {len(image_set.skipped)} unreadable image(s):", err=True)
        for path, why in image_set.skipped:
            click.echo(f"  {path}: {why}", err=True)


model_option = click.option("--model", required=True, help="Built-in name (toy-llava, ...), local folder or hub id.")
dtype_option = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32")
device_option = click.option("--device", default=None, help="torch device, e.g. cpu or cuda:0.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress of the library.")
def main(verbose: bool) -> None:
    """canprobe: find the neurons whose removal collapses a vision-language model (CAN)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write the image set to.")
@click.option("--per-category", type=POSITIVE, default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resolution", type=click.IntRange(min=16, max=1024), default=96, show_default=True)
def scenes(out: Path, per_category: int, seed: int, resolution: int) -> None:
    """Draw synthetic scenes: one folder per category plus captions.jsonl."""
    from canprobe.data import CATEGORIES, write_scenes

    write_scenes(out, per_category, seed, resolution)
    click.echo(f"wrote {per_category * len(CATEGORIES)} scenes ({len(CATEGORIES)} categories) to {out}")


@main.command()
@model_option
@click.option("--images", type=click.Path(path_type=Path), required=True, help="Image set folder.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("captions.jsonl"), show_default=True)
@click.option("--prompt", default=None, help="Instruction text; the model family's default when omitted.")
@click.option("--max-new-tokens", type=POSITIVE, default=24, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=16, show_default=True)
@dtype_option
@device_option
@click.option("--trust-remote-code", is_flag=True, help="Allow custom code shipped with a hub checkpoint.")
def caption(model, images, out, prompt, max_new_tokens, batch_size, dtype, device, trust_remote_code) -> None:
    """Caption every image of an image set (JSON lines)."""
    from canprobe.captions import caption_image_set, exact_match_rate, write_captions
    from canprobe.data import load_image_set

    image_set = load_image_set(images)
    _report_skipped(image_set)
    lm = _load(model, dtype, device, trust_remote_code)
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
@click.option("--seed", type=int, default=None)
@device_option
def organisms_train(name, out, steps, batch_size, seed, device) -> None:
    """Train organism NAME on drawn scenes and save it as a Hugging Face checkpoint."""
    import dataclasses

    from canprobe.models import ORGANISM_DIR
    from canprobe.organisms.train import DEFAULT_CONFIGS, train_organism

    config = DEFAULT_CONFIGS[name]
    changes = {k: v for k, v in dict(steps=steps, batch_size=batch_size, seed=seed).items() if v is not None}
    config = dataclasses.replace(config, **changes)
    out = out or ORGANISM_DIR / name
    logging.getLogger("canprobe").setLevel(logging.INFO)
    result = train_organism(name, out, config, device=device or "cpu")
    click.echo(
        f"trained {name} ({result.parameters:,} parameters) in {result.seconds:.0f} s: "
        f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; saved to {out}"
    )


@organisms.command("eval")
@click.argument("name")
@click.option("--n", "count", type=POSITIVE, default=200, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True, help="Scene seed; training uses 1234.")
def organisms_eval(name, count, seed) -> None:
    """Held-out accuracy of a captioning or CLIP model on drawn scenes."""
    from canprobe.organisms.evaluate import caption_exact_match, clip_category_accuracy

    lm = _load(name, "float32", None)
    if lm.kind == "clip":
        click.echo(
            f"{name}: true caption beats other-category caption on {clip_category_accuracy(lm, count, seed):.1%}"
        )
    else:
        click.echo(f"{name}: exact-match captions on {caption_exact_match(lm, count, seed):.1%} of {count} scenes")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("canprobe-demo"), show_default=True)
@click.option("--per-category", type=POSITIVE, default=8, show_default=True)
def demo(out: Path, per_category: int) -> None:
    """Caption built-in scenes with both organisms and compare with the true captions."""
    from canprobe.captions import caption_image_set, exact_match_rate, write_captions
    from canprobe.data import load_image_set, write_scenes

    images = write_scenes(out / "scenes", per_category, seed=11)
    image_set = load_image_set(images)
    for name in ("toy-llava", "toy-instructblip"):
        records = caption_image_set(_load(name, "float32", None), image_set)
        write_captions(records, out / f"captions-{name}.jsonl")
        click.echo(f"{name:18s} exact match {exact_match_rate(records):6.1%}   e.g. {records[0].caption!r}")
    click.echo(f"captions written to {out}")


# --- inspect and score: neuron sites and CAN scoring ---


def _quiet_loading() -> None:
    """Keep stderr for errors: transformers' weight-loading progress bar would add lines to it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@main.command("inspect")
@click.argument("model")
@dtype_option
@device_option
def inspect_command(model: str, dtype: str, device: str | None) -> None:
    """Neuron sites of MODEL per component and kind, and the memory scoring needs.

    MODEL is a shipped config (llava-1.5-7b, instructblip-vicuna-7b: built on the meta device,
    no weights, no network) or any loadable model.
    """
    from canprobe.inventory import format_inventory, inspect_model

    _quiet_loading()
    for line in format_inventory(inspect_model(model, dtype=dtype, device=device)):
        click.echo(line)


@main.command("score")
@model_option
@click.option("--images", type=click.Path(path_type=Path), required=True, help="Image set folder.")
@click.option("--scope", default="language.down_proj", show_default=True, help="Sites, e.g. language, vision.fc1,all.")
@click.option("--method", type=click.Choice(["can", "activation", "gradient", "random", "wanda"]), default="can")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True, help="Gradient exponent.")
@click.option("--reduction", type=click.Choice(["loss", "all"]), default="loss", show_default=True)
@click.option(
    "--captions",
    "caption_source",
    type=click.Choice(["self", "reference"]),
    default="self",
    show_default=True,
    help="Loss text: the model's own greedy captions, or the image set's captions.jsonl.",
)
@click.option("--prompt", default=None, help="Instruction text; the model family's default when omitted.")
@click.option("--batch-size", type=POSITIVE, default=8, show_default=True)
@click.option("--max-new-tokens", type=POSITIVE, default=24, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("canprobe-scores"), show_default=True)
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True, help="Rows of the ranking to print.")
@dtype_option
@device_option
@click.option("--trust-remote-code", is_flag=True, help="Allow custom code shipped with a hub checkpoint.")
def score_command(
    model,
    images,
    scope,
    method,
    alpha,
    reduction,
    caption_source,
    prompt,
    batch_size,
    max_new_tokens,
    seed,
    out,
    top,
    dtype,
    device,
    trust_remote_code,
) -> None:
    """Score every neuron in SCOPE over an image set; write scores.safetensors and ranking.parquet."""
    from canprobe.data import load_image_set
    from canprobe.errors import InputError
    from canprobe.scoring import score_neurons

    image_set = load_image_set(images)
    _report_skipped(image_set)
    captions = None
    if caption_source == "reference":
        missing = [r.name for r in image_set.records if r.caption is None]
        if missing:
            raise InputError(f"--captions reference: no caption for {len(missing)} image(s), e.g. {missing[0]}")
        captions = [r.caption for r in image_set.records]
    _quiet_loading()
    lm = _load(model, dtype, device, trust_remote_code)
    result = score_neurons(
        lm,
        image_set.images,
        scope=scope,
        method=method,
        alpha=alpha,
        reduction=reduction,
        captions=captions,
        prompt=prompt,
        batch_size=batch_size,
        seed=seed,
        max_new_tokens=max_new_tokens,
    )
    result.save(out)
    ranking = result.ranking()
    for row in ranking.head(top).itertuples():
        click.echo(f"{row.rank:6d}  {row.score:12.6g}  {row.address}")
    click.echo(
        f"scored {len(ranking):,} neurons in {len(result.sites)} sites over {len(image_set)} images "
        f"({method}, reduction {reduction}, {caption_source} captions); wrote {out}"
    )


# --- search and ablate: masking, collapse metrics and the k* search ---


def run() -> None:
    """Entry point: click's usage errors and canprobe's own errors become one line and exit 2."""
    try:
        main.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("canprobe: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"canprobe: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except CanprobeError as exc:
        click.echo(f"canprobe: error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
