"""Command-line options from the settings table (``canprobe.config.SETTINGS``).

One place decides how a setting becomes a click option: its flag, type, choices, default and help,
for the probing commands and for ``canprobe run`` (named as in study files). A new setting in the
table is an option of every command that takes its section, with no change here.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from canprobe import config
from canprobe.checks import check_device

POSITIVE = click.IntRange(min=1)
SEED = click.IntRange(min=0, max=config.SETTINGS["seed"].high)
# what a setting's option takes beyond its type in the table: paths, and a check as it is parsed
PATHS = {
    "images": click.Path(path_type=Path),
    "sites": click.Path(dir_okay=False),
    "out": click.Path(path_type=Path),
}
CHECKS = {"device": lambda _ctx, _param, value: check_device(value)}
FLAGS = {"images_per_category": "--per-category", "loss_text": "--captions", "n_samples": "--samples"}


class FiniteFloat(click.FloatRange):
    """A float in a range that is a number: click's FloatRange lets nan (and inf when unbounded) through."""

    name = "float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def _click_type(name: str):
    s = config.SETTINGS[name]
    if name in PATHS:
        return PATHS[name]
    if s.choices is not None:
        return click.Choice(list(s.choices))
    bounded = s.low is not None or s.high is not None
    if s.kind is int:
        return click.IntRange(min=s.low, max=s.high) if bounded else click.INT
    if s.kind is float:
        return FiniteFloat(s.low, s.high, min_open=s.low_open, max_open=s.high_open)
    return None


def option(name: str, study: bool = False, **overrides):
    """The command-line option of setting ``name`` (canprobe.config.SETTINGS): its type, choices, default, help.

    The flag is the name's (``max_new_tokens`` -> ``--max-new-tokens``) unless FLAGS names another; a
    setting's former names stay flags too (``--ablation`` for ``--fault``), so earlier scripts still run;
    ``overrides`` go to click (e.g. ``required=True``). ``study``: a flag of ``canprobe run`` (named as in
    study files), with no default, so a config file's value stands; the config checks the value.
    """
    s = config.SETTINGS[name]
    flag = "--" + name.replace("_", "-") if study else FLAGS.get(name, "--" + name.replace("_", "-"))
    kwargs = {"default": s.default, "help": s.help, "show_default": s.default is not None}
    if study:
        kwargs.update(
            default=None,
            callback=lambda _ctx, param, value: config.from_text(param.name, value),
            show_default=str(s.default) if s.default is not None else False,
        )
    if s.kind is bool:
        if s.default or study:
            flag = f"{flag}/--no-{flag[2:]}"
        else:
            kwargs.update(is_flag=True, show_default=False)
    elif study:
        kwargs.update({"metavar": "A,B,..."} if s.many else {"type": {int: click.INT, float: click.FLOAT}.get(s.kind)})
    else:
        kwargs.update(type=_click_type(name), **({"callback": CHECKS[name]} if name in CHECKS else {}))
    former = [] if s.kind is bool else ["--" + old.replace("_", "-") for old in s.former]
    return click.option(flag, *former, name, **{**kwargs, **overrides})


def options(*sources, without: tuple[str, ...] = (), study: bool = False, **overrides):
    """The options of the settings of ``sources`` (section classes or setting names), in their order.

    ``overrides``: setting -> click arguments.
    """
    settings = [
        n for src in sources for n in (config.names(src) if isinstance(src, type) else [src]) if n not in without
    ]

    def apply(func):
        for name in reversed(settings):
            func = option(name, study=study, **overrides.get(name, {}))(func)
        return func

    return apply


REQUIRED = {"model": {"required": True}, "images": {"required": True}}
NOT_RUN = ("device_map", "gradient_checkpointing", "reuse_features")  # what commands that run no scoring pass lack
dry_run_option = click.option("--dry-run", is_flag=True, help="Print what would run and the memory it needs; stop.")
