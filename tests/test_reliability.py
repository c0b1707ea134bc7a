"""Reliability: run locks, kill -9 at many moments, same answer twice, hostile models, images and checkpoints."""

import json
import logging
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from canprobe.config import make_config
from canprobe.errors import InputError
from canprobe.experiment import Experiment
from canprobe.organisms.scenes import write_scenes
from canprobe.runfolder import LOCK_FILE, RUN_FILE, RunLock, RunLockedError, atomic_write_text, read_jsonl

SRC = Path(__file__).parents[1] / "src"
TIMING = ("seconds",)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _one_line_error(result, *needles: str) -> str:
    assert result.code == 2, (result.code, result.out, result.err)
    lines = [x for x in result.err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("canprobe: error:"), result.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- the run lock


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def _write_lock(folder: Path, pid: int, host: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process (not even a zombie)
    return proc.pid


def test_live_holder_is_refused_and_other_hosts_are_never_taken_over(tmp_path, sleeper):
    _write_lock(tmp_path, sleeper.pid)
    with pytest.raises(RunLockedError, match=f"pid {sleeper.pid} on {socket.gethostname()}"):
        with RunLock(tmp_path):
            pass
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == sleeper.pid  # untouched
    _write_lock(tmp_path, _dead_pid(), host="another-machine")
    with pytest.raises(RunLockedError, match="on another-machine"):
        with RunLock(tmp_path):
            pass


def test_dead_holder_is_taken_over_with_a_warning_and_released_on_exception(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, dead)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="body failed"):
        with RunLock(tmp_path):
            holder = json.loads((tmp_path / LOCK_FILE).read_text())
            assert holder == {"pid": os.getpid(), "host": socket.gethostname()}
            with RunLock(tmp_path):  # nested in the holding process: allowed, and keeps the outer lock
                pass
            assert (tmp_path / LOCK_FILE).exists()
            raise ValueError("body failed")
    assert f"taking over the lock of dead process {dead}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # lock and its temporary file gone


def test_search_and_run_refuse_a_folder_that_a_live_run_holds(cli, scene_dir, tmp_path, sleeper):
    out = tmp_path / "held"
    _write_lock(out, sleeper.pid)
    search = cli("search", "--model", "toy-llava", "--images", scene_dir, "--out", out, "--max-k", 2)
    _one_line_error(search, "in use by another canprobe run", f"pid {sleeper.pid}")
    run = cli("run", "--model", "toy-llava", "--images", scene_dir, "--out", out)
    _one_line_error(run, "in use by another canprobe run", f"pid {sleeper.pid}")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written into the held folder


def test_run_folder_of_another_config_refuses_to_resume_unless_restarted(cli, scene_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    values = {"model": "toy-llava", "images": str(scene_dir), "out": str(out), "seed": 1}
    ran = []
    monkeypatch.setattr(Experiment, "_run", lambda self, *prepared: ran.append(self.config.scoring.seed) or {})
    Experiment(make_config(values), progress=False).run()
    (out / "summary.json").write_text("{}")
    Experiment(make_config(values), progress=False).run()  # same config: resumes
    assert ran == [1, 1]
    result = cli("run", "--model", "toy-llava", "--images", scene_dir, "--out", out, "--seed", 2, "--max-new-tokens", 9)
    _one_line_error(result, "another config (config.max_new_tokens (was 24, now 9); config.seed (was 1, now 2))")
    with pytest.raises(InputError, match=r"another config \(config.seed \(was 1, now 2\)\)"):
        Experiment(make_config({**values, "seed": 2}), progress=False).run()
    assert ran == [1, 1]
    Experiment(make_config({**values, "seed": 2}), progress=False, restart=True).run()
    assert ran == [1, 1, 2]
    assert json.loads((out / RUN_FILE).read_text())["config"]["seed"] == 2
    assert sorted(p.name for p in out.iterdir()) == [RUN_FILE]
    (aside,) = tmp_path.glob("run.replaced-*")
    assert json.loads((aside / RUN_FILE).read_text())["config"]["seed"] == 1 and (aside / "summary.json").exists()


# ---------------------------------------------------------------- atomic writes keep normal permissions


def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.html", "<html>")
        assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
        os.chmod(tmp_path / "report.html", 0o640)
        atomic_write_text(tmp_path / "report.html", "<html>2")  # a replaced file keeps its mode
        assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# ---------------------------------------------------------------- kill -9 at six moments, and the same answer twice

# Runs the CLI with a kill switch: KILL_MODE picks where the process SIGKILLs itself, so the kills land
# exactly mid-write (a torn JSON line, a half-written temporary file) where an outside timer cannot aim.
DRIVER = """
import json, os, signal, sys, tempfile
from pathlib import Path
import canprobe.search as search
from canprobe import runfolder
mode, at = os.environ.get("KILL_MODE", ""), int(os.environ.get("KILL_AT", "0"))
appended = 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def half_temp(path):
    fd, _ = tempfile.mkstemp(prefix="." + Path(path).name + ".", suffix=".tmp", dir=Path(path).parent)
    os.write(fd, b'{"k_star": ')
    os.fsync(fd)
    die()

def append(path, obj):
    global appended
    appended += 1
    if mode == "mid_line" and appended == at:
        line = json.dumps(obj, separators=(",", ":")).encode()
        with open(path, "ab") as f:
            f.write(line[: len(line) // 2])
            f.flush()
            os.fsync(f.fileno())
        die()
    runfolder.append_jsonl(path, obj)
    if mode == "after_line" and appended == at:
        die()

def write_json(path, obj, **kwargs):
    if mode == "mid_summary" and Path(path).name == "summary.json":
        half_temp(path)
    runfolder.atomic_write_json(path, obj, **kwargs)

def write_files(files):
    for path in files:
        if mode == "mid_ranking" and Path(path).name == "ranking.parquet":
            half_temp(path)
    real_files(files)

real_files = runfolder.atomic_write_files
search.append_jsonl, search.atomic_write_json, runfolder.atomic_write_files = append, write_json, write_files
sys.argv = ["canprobe", *sys.argv[1:]]
from canprobe.cli import run
run()
"""


@pytest.fixture(scope="module")
def four_scenes(tmp_path_factory) -> Path:
    images = write_scenes(tmp_path_factory.mktemp("rel") / "scenes", per_category=1, seed=7)
    for category in ("house", "tree"):
        shutil.rmtree(images / category)
    return images


def _search_args(images: Path, out: Path) -> list[str]:
    return [
        "search",
        "--model",
        "toy-llava",
        "--images",
        str(images),
        "--out",
        str(out),
        "--scope",
        "language.down_proj",
        "--collapse-clip-ratio",
        "0.6",
        "--grid-per-octave",
        "0",
        "--max-new-tokens",
        "14",
    ]


def _start(images: Path, out: Path, mode: str = "", at: int = 0) -> subprocess.Popen:
    env = {**_env(), "KILL_MODE": mode, "KILL_AT": str(at)}
    cmd = [sys.executable, "-c", DRIVER, *_search_args(images, out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _without_timing(summary: dict) -> dict:
    summary = json.loads(json.dumps(summary))
    summary.pop("seconds")
    for field in ("this_run", "resumed"):
        summary["evaluations"].pop(field)
    return summary


def _safetensors(out: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(out / "scores.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


def _curve(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(out / "curve.jsonl")]


@pytest.fixture(scope="module")
def reference(four_scenes, tmp_path_factory) -> Path:
    """One uninterrupted search (scoring included) in a subprocess, like every run it is compared with."""
    out = tmp_path_factory.mktemp("rel") / "reference"
    code, err = _finish(_start(four_scenes, out))
    assert code == 0, err
    return out


def test_same_seed_gives_identical_ranking_curve_and_summary(four_scenes, reference, tmp_path):
    again = tmp_path / "again"
    code, err = _finish(_start(four_scenes, again))
    assert code == 0, err
    assert (again / "ranking.parquet").read_bytes() == (reference / "ranking.parquet").read_bytes()
    # safetensors writes its metadata keys in hash order, so the scores compare by content, not bytes
    (first_scores, first_meta), (second_scores, second_meta) = (_safetensors(d) for d in (reference, again))
    assert first_meta == second_meta and first_scores.keys() == second_scores.keys()
    assert all(torch.equal(first_scores[name], second_scores[name]) for name in first_scores)
    assert _curve(again) == _curve(reference)
    first, second = (json.loads((d / "summary.json").read_text()) for d in (reference, again))
    assert _without_timing(first) == _without_timing(second)
    assert first["k_star"] is not None and len(_curve(reference)) >= 10  # a real search, not a trivial one


def test_sigkill_at_six_moments_then_rerun_ends_like_an_uninterrupted_run(four_scenes, reference, tmp_path):
    out, curve = tmp_path / "killed", tmp_path / "killed" / "curve.jsonl"
    expected = _curve(reference)
    seen: list[int] = []
    for mode, at in [
        ("mid_ranking", 0),  # half-written ranking.parquet temp file: the rerun scores again
        ("mid_line", 1),  # torn baseline line
        ("after_line", 3),  # right after a line is fsynced, before the search goes on
        ("timer", 0),  # from outside, while a point is being generated
        ("mid_line", 3),  # torn line in the bisection
        ("mid_summary", 0),  # every point done, summary.json half-written to its temporary file
    ]:
        if mode == "timer":
            proc = _start(four_scenes, out)
            while proc.poll() is None and len(read_jsonl(curve)) < seen[-1] + 2:
                time.sleep(0.05)
            time.sleep(0.3)
            os.kill(proc.pid, signal.SIGKILL)
        else:
            proc = _start(four_scenes, out, mode, at)
        code, err = _finish(proc)
        assert code == -signal.SIGKILL, (mode, at, code, err)
        assert not (out / "summary.json").exists()
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == proc.pid  # the killed run's stale lock, which the rerun takes over
        points = read_jsonl(curve)
        keys = [(r["control"], r["k"]) for r in points]
        assert len(keys) == len(set(keys)) and keys == [(r["control"], r["k"]) for r in expected[: len(keys)]]
        seen.append(len(points))
    assert seen[0] == 0 and seen[-1] == len(expected) and len(set(seen)) >= 5, seen  # distinct moments
    code, err = _finish(_start(four_scenes, out))
    assert code == 0, err
    assert f"taking over the lock of dead process {proc.pid}" in err
    assert _curve(out) == expected  # every point once, same values, same order: nothing lost or duplicated
    summary = json.loads((out / "summary.json").read_text())
    assert _without_timing(summary) == _without_timing(json.loads((reference / "summary.json").read_text()))
    assert summary["evaluations"]["this_run"] == 0 and summary["evaluations"]["resumed"] == len(expected)
    assert not (out / LOCK_FILE).exists()
    print(f"\nkilled with {seen} of {len(expected)} curve points on disk; the rerun evaluated none twice")


# ---------------------------------------------------------------- collapsed models: NaN logits, only the end token


@pytest.fixture(scope="module")
def llava_and_clip():
    from canprobe.models import load_model

    return load_model("toy-llava"), load_model("toy-clip")


def _scope_addresses(lm, scope: str) -> list[str]:
    from canprobe.sites import SiteRegistry

    return [f"{site.name}:{i}" for site in SiteRegistry(lm.model).select(scope) for i in range(site.size)]


def _search_with_logits(llava_and_clip, four_scenes, out: Path, fill) -> dict:
    from canprobe.config import SearchConfig
    from canprobe.data import load_image_set
    from canprobe.search import find_k_star

    lm, clip = llava_and_clip
    image_set = load_image_set(four_scenes)
    head = lm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: fill(output))
    try:
        config = SearchConfig.of(max_k=4, grid_per_octave=0, max_new_tokens=6, control="random", control_at="k_star")
        ranking = _scope_addresses(lm, config.scope)
        names = [r.name for r in image_set.records]
        result = find_k_star(lm, image_set.images, ranking, clip, config, out, names)
    finally:
        handle.remove()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k_star"] == result.k_star
    assert [p["k"] for p in read_jsonl(out / "curve.jsonl")] == [0, 1, 2, 4]
    return summary


def test_nan_logits_go_through_search_to_recorded_nan_values(llava_and_clip, four_scenes, tmp_path):
    summary = _search_with_logits(llava_and_clip, four_scenes, tmp_path, lambda out: torch.full_like(out, math.nan))
    base = summary["baseline"]
    assert math.isnan(base["ppl_median"]) and base["ppl_nonfinite"] == 4 and base["n_images"] == 4
    assert summary["k_star"] is None  # NaN never counts as collapsed
    assert summary["stage1_k"] is None and summary["monotone"] is True


def test_a_model_that_only_emits_the_end_token_records_empty_captions(llava_and_clip, four_scenes, tmp_path):
    lm = llava_and_clip[0]
    eos = lm.model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos

    def only_eos(out: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros_like(out)
        logits[..., eos] = 30.0
        return logits

    summary = _search_with_logits(llava_and_clip, four_scenes, tmp_path, only_eos)
    assert summary["baseline"]["length_mean"] == 0 and summary["baseline"]["distinct_mean"] == 0
    for point in read_jsonl(tmp_path / "curve.jsonl"):
        assert {c["caption"] for c in point["captions"]} == {""}
        assert math.isfinite(point["ppl_median"]) and point["ppl_median"] == pytest.approx(1.0, abs=1e-6)
    assert summary["k_star"] is None


# ---------------------------------------------------------------- metrics in float32 for a bfloat16 model


def test_bfloat16_model_gets_float32_perplexities_close_to_the_float32_model(llava_and_clip, four_scenes):
    from canprobe.data import load_image_set
    from canprobe.evaluation import caption_ppl
    from canprobe.models import load_model

    images = load_image_set(four_scenes).images
    captions = ["a large orange boat in the middle", "a small green fish", "house house house", ""]
    full = caption_ppl(llava_and_clip[0], images, captions)
    half = caption_ppl(load_model("toy-llava", dtype="bfloat16"), images, captions)
    assert full.dtype == half.dtype == torch.float32
    assert torch.isfinite(half).all() and (half >= 1).all()
    assert torch.allclose(half.log(), full.log(), rtol=0.1, atol=0.1), (half, full)
    assert full[0] < full[2]  # a sensible caption is likelier than word salad


# ---------------------------------------------------------------- hostile files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _huge_png(path: Path, side: int = 20000) -> None:
    """A valid 1-bit PNG of side x side black pixels, compressed row by row (about 60 KB, never 400 MB in memory)."""
    packer, row = zlib.compressobj(9), b"\x00" * (1 + side // 8)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    path.write_bytes(png)


def test_truncated_fake_and_huge_images_are_reported_and_skipped(cli, four_scenes, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(four_scenes, images)
    good = next((images / "boat").glob("*.png"))
    (images / "boat" / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (images / "car" / "notes.jpg").write_text("these are my notes, not a JPEG\n")
    _huge_png(images / "fish" / "huge.png")
    assert (images / "fish" / "huge.png").stat().st_size < 200_000
    out = tmp_path / "captions.jsonl"
    result = cli("caption", "--model", "toy-llava", "--images", images, "--out", out, "--max-new-tokens", 6)
    assert result.code == 0, result.err
    assert "skipped 3 unreadable image(s) or nested folder(s):" in result.err
    reported = {line.strip().split(":")[0] for line in result.err.splitlines() if line.startswith("  ")}
    assert reported == {str(images / p) for p in ("boat/truncated.png", "car/notes.jpg", "fish/huge.png")}
    assert "20000x20000" in result.err or "decompression bomb" in result.err.lower()
    assert len(read_jsonl(out)) == 4 and "wrote 4 captions" in result.out


def test_checkpoint_needing_remote_code_is_refused_without_running_it(cli, scene_dir, tmp_path):
    ckpt = tmp_path / "custom-vlm"
    ckpt.mkdir()
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"}
    (ckpt / "config.json").write_text(json.dumps({"model_type": "canprobe_custom_vlm", "auto_map": auto_map}))
    marker = tmp_path / "EXECUTED"
    for module in ("configuration_custom", "modeling_custom"):
        (ckpt / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    result = cli("caption", "--model", ckpt, "--images", scene_dir, "--out", tmp_path / "c.jsonl")
    _one_line_error(result, "needs custom code", "--trust-remote-code")
    assert not marker.exists()
