"""Shared fixtures: tiny organism shapes, scene folders, and an in-process CLI runner."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from canprobe.organisms.build import OrganismShape

TINY = OrganismShape(
    image_size=16,
    patch_size=8,
    vision_hidden=32,
    vision_ffn=64,
    vision_layers=2,
    text_hidden=32,
    text_ffn=64,
    text_layers=2,
    heads=2,
    qformer_layers=1,
    num_query_tokens=4,
)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``canprobe ARGS`` through the real entry point, in process."""
    from canprobe.cli import run

    def invoke(*args: str) -> CliResult:
        capsys.readouterr()  # only what the command itself prints
        monkeypatch.setattr(sys, "argv", ["canprobe", *map(str, args)])
        code = 0
        try:
            run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture(scope="session")
def scene_dir(tmp_path_factory):
    from canprobe.organisms.scenes import write_scenes

    return write_scenes(tmp_path_factory.mktemp("scenes"), per_category=2, seed=3)
