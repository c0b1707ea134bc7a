"""The prepared GPU call (benchmarks/gpu_all.py): gpu.json's ratios from the benchmarks' figures, and a
rehearsal of the whole call on CPU at the tiny shape, so the one device call a session gets runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import canprobe

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from gpu_all import KEYS, figures, gpu_json  # noqa: E402

META = {"device": "NVIDIA H200", "torch": "2.11.0", "transformers": "5.17.0", "date": "2026-12-04T20:00:00+00:00"}


def scale(bare_s: float, score_s: float, bare_gb: float, score_gb: float) -> dict:
    """bench_scale --json figures at batch 1 (the given ones) and 8 (four times the time, memory +10%)."""
    batch = {}
    for size, factor in (("1", 1.0), ("8", 4.0)):
        batch[size] = {
            "bare": {"seconds": bare_s * factor, "peak_gb": bare_gb * (1.1 if size == "8" else 1.0), "tflops": 1.0},
            "score": {"seconds": score_s * factor, "peak_gb": score_gb * (1.1 if size == "8" else 1.0), "tflops": 1.0},
        }
    return {"arch": "x", "batch": batch}


def evaluation(floor: float, seconds: dict[str, tuple[float, float]], compiled_same: float) -> dict:
    """bench_evaluation --json figures: per decoding (full, cached) evaluated-k seconds."""
    return {
        "floor_s": {"total": floor, "generation": floor / 2},
        "evaluated_k_s": {mode: {"full": full, "cached": cached} for mode, (full, cached) in seconds.items()},
        "captions_as_eager": {"eager": 1.0, "static": 1.0, "compiled": compiled_same},
        "graphs_after_warmup": {"eager": 0, "static": 0, "compiled": 0},
    }


def test_gpu_json_takes_llava_ratios_to_their_floors_and_the_best_decoding():
    raw = {
        "scale/llava-1.5-7b": scale(0.040, 0.044, 14.0, 14.28),
        "evaluation/llava-1.5-7b": evaluation(
            0.30, {"eager": (1.7, 1.3), "static": (1.2, 0.8), "compiled": (0.9, 0.36)}, 0.75
        ),
        "scale/instructblip-vicuna-7b": scale(0.020, 0.030, 16.0, 16.0),
        "evaluation/instructblip-vicuna-7b": {"failed": "exit 1"},
    }
    gpu = gpu_json(raw, META)
    assert set(KEYS) | set(META) <= set(gpu)
    assert gpu["device"] == "NVIDIA H200"
    assert gpu["scoring_over_floor_b1"] == pytest.approx(1.1) and gpu["scoring_over_floor_b8"] == pytest.approx(1.1)
    assert gpu["scoring_memory_over_floor"] == pytest.approx(1.02)
    assert gpu["evaluated_k_over_floor"] == pytest.approx(1.2)  # compiled, cached-prefix PPL
    assert gpu["evaluated_k_over_floor_eager"] == pytest.approx(1.3 / 0.3)
    assert gpu["compiled_captions_identical"] == 0.75
    llava, blip = gpu["llava-1.5-7b"], gpu["instructblip-vicuna-7b"]
    assert llava["best_decoding"] == "compiled" and llava["scoring_floor_s"] == {"b1": 0.040, "b8": 0.160}
    assert blip["scoring_over_floor_b1"] == pytest.approx(1.5) and blip["evaluated_k_over_floor"] is None


def test_memory_ratio_is_none_where_no_peak_was_measured():
    assert figures(scale(1.0, 1.2, float("nan"), float("nan")), None)["scoring_memory_over_floor"] is None


def test_the_gpu_call_rehearses_on_cpu_and_writes_every_key(tmp_path):
    """Both architectures at the tiny shape, one language layer, 2 images of 2 tokens: every step runs."""
    env = {**os.environ, "PYTHONPATH": f"{Path(canprobe.__file__).parents[1]}{os.pathsep}{BENCHMARKS}"}
    cmd = [sys.executable, str(BENCHMARKS / "gpu_all.py"), "--out", str(tmp_path), "--device", "cpu", "--tiny"]
    cmd += ["--dtype", "float32", "--layers", "1", "--images", "2", "--new-tokens", "2", "--repeats", "1"]
    subprocess.run([*cmd, "--no-profile"], check=True, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json", "log.txt", "raw.json"]
    gpu = json.loads((tmp_path / "gpu.json").read_text())
    assert gpu["device"] == "CPU" and gpu["dtype"] == "float32"
    for arch in ("llava-1.5-7b", "instructblip-vicuna-7b"):
        got = gpu[arch]
        for key in ("scoring_over_floor_b1", "scoring_over_floor_b8", "evaluated_k_over_floor"):
            assert got[key] > 0, (arch, key)
        assert got["scoring_memory_over_floor"] is None  # no peak-memory counter on a CPU
        assert got["compiled_captions_identical"] == 1.0  # on a CPU compiled decodes with the static cache
        assert got["graphs_after_warmup"]["compiled"] == 0
        assert set(got["evaluated_k_s"]) == {"eager", "static", "compiled"}
