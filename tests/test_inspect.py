"""`canprobe inspect`: true counts for the paper's models from shipped configs, offline and fast."""

from __future__ import annotations

import re
import time

import pytest

from canprobe.inventory import SHIPPED_CONFIGS, build_shipped, inventory


def _row(out: str, site: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.split() and x.split()[0] == site)
    return line.split()


def test_shipped_configs():
    assert SHIPPED_CONFIGS == ("instructblip-vicuna-7b", "llava-1.5-7b")
    model = build_shipped("llava-1.5-7b")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_inspect_llava_prints_true_counts(cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    result = cli("inspect", "llava-1.5-7b", "--dtype", "bfloat16")
    elapsed = time.perf_counter() - start
    assert result.code == 0, result.err
    out = result.out
    assert "7,063,427,072 parameters" in out  # llava-1.5-7b's published size
    assert _row(out, "language.down_proj")[1:4] == ["32", "4,096", "131,072"]
    assert _row(out, "language.gate_proj")[1:4] == ["32", "11,008", "352,256"]
    assert _row(out, "language.down_proj.input")[1:4] == ["32", "11,008", "352,256"]
    assert _row(out, "vision.fc1")[1:4] == ["24", "4,096", "98,304"]
    assert _row(out, "vision.fc2")[1:4] == ["24", "1,024", "24,576"]
    assert _row(out, "projector.linear_1")[1:5] == ["1", "4,096", "4,096", "4,198,400"]
    assert _row(out, "projector.linear_2")[1:5] == ["1", "4,096", "4,096", "16,781,312"]
    # 32 layers x 3 x 4096 x 11008 weights per MLP
    assert _row(out, "language.down_proj")[4] == f"{32 * 4096 * 11008:,}"
    weights = float(re.search(r"weights ([\d.]+) GiB", out).group(1))
    assert weights == pytest.approx(7_063_427_072 * 2 / 1024**3, abs=0.01)
    assert "activations estimated" in out
    assert elapsed < 20, elapsed


def test_inspect_instructblip_prints_true_counts(cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("inspect", "instructblip-vicuna-7b")
    assert result.code == 0, result.err
    out = result.out
    assert "7,913,210,624 parameters" in out
    assert _row(out, "language.down_proj")[1:4] == ["32", "4,096", "131,072"]
    assert _row(out, "language.gate_proj")[1:4] == ["32", "11,008", "352,256"]
    assert _row(out, "vision.fc1")[1:4] == ["39", "6,144", "239,616"]
    assert _row(out, "vision.fc2")[1:4] == ["39", "1,408", "54,912"]
    for kind, per_layer, total in (("intermediate", "3,072", "36,864"), ("output", "768", "9,216")):
        assert _row(out, f"qformer.{kind}")[1:4] == ["12", per_layer, total]
        assert _row(out, f"qformer.{kind}_query")[1:4] == ["12", per_layer, total]
    assert "projector" not in out
    # float32 by default: 4 bytes per parameter
    assert float(re.search(r"weights ([\d.]+) GiB", out).group(1)) == pytest.approx(7_913_210_624 * 4 / 1024**3, 0.01)


def test_inventory_of_a_real_model_counts_its_modules():
    from canprobe.organisms.build import build_llava
    from tests.conftest import TINY

    model, _ = build_llava(TINY)
    inv = inventory(model, "tiny", "float32")
    rows = {f"{r.component}.{r.kind}": r for r in inv.sites}
    assert rows["language.down_proj"].neurons == TINY.text_layers * TINY.text_hidden
    mlp = model.model.language_model.layers[0].mlp
    assert rows["language.gate_proj"].parameters == TINY.text_layers * mlp.gate_proj.weight.numel()
    assert inv.parameters == sum(p.numel() for p in model.parameters())
    assert inv.weight_bytes == 4 * inv.parameters
    tokens = {c.component: c.tokens for c in inv.components}
    patches = (TINY.image_size // TINY.patch_size) ** 2
    assert tokens == {"language": patches + 40, "vision": patches + 1, "projector": patches}
    assert inv.activation_bytes > 0


def test_inspect_loadable_model(cli, tmp_path):
    from canprobe.organisms.build import build_instructblip
    from tests.conftest import TINY

    model, processor = build_instructblip(TINY)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    result = cli("inspect", str(tmp_path))
    assert result.code == 0, result.err
    assert _row(result.out, "qformer.output_query")[1:4] == ["1", str(TINY.text_hidden), str(TINY.text_hidden)]


def test_inspect_unknown_model_is_one_line(cli):
    result = cli("inspect", "llava-1.5-13b")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "llava-1.5-7b" in result.err and "toy-llava" in result.err
