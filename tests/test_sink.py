"""The sink recipe: Stage A's text pretraining and its curve, Stage B's frozen-then-joint alignment."""

import functools
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from canprobe.models import load_model
from canprobe.organisms.build import build_llava
from canprobe.organisms.sink import (
    CURVE_FILE,
    TEXT_LM_DIR,
    AlignConfig,
    PretrainConfig,
    _image_scale_penalty,
    align_llava,
    pretrain_text,
    text_shape,
    train_sink_recipe,
)
from canprobe.organisms.textstream import StreamConfig
from tests.conftest import TINY

STREAM = StreamConfig(segments=3)  # 37-token rows
PRETRAIN = PretrainConfig(tokens=8 * 37 * 30, batch_size=8, lr=3e-3, warmup=3, measure_every=10, measure_rows=4)
ALIGN = AlignConfig(
    frozen_steps=3, joint_steps=3, batch_size=4, text_rows=2, warmup=1, pool_size=16, measure_every=3, measure_scenes=2
)


@pytest.fixture(scope="module")
def stage_a(tmp_path_factory):
    curve = tmp_path_factory.mktemp("a") / CURVE_FILE
    model, result = pretrain_text(PretrainConfig(**{**PRETRAIN.__dict__, "stream": STREAM}), TINY, curve_path=curve)
    return model, result, curve


def test_stage_a_counts_tokens_and_measures_on_schedule(stage_a):
    model, result, curve = stage_a
    assert result.steps == 30 and result.tokens == 30 * 8 * 37
    assert [row["step"] for row in result.curve] == [0, 1, 2, 4, 8, 10, 20, 30]
    assert [row["tokens"] for row in result.curve][-3:] == [2960, 5920, 8880]
    assert [json.loads(line)["step"] for line in curve.read_text().splitlines()] == [0, 1, 2, 4, 8, 10, 20, 30]
    row = result.curve[-1]
    assert len(row["layers"]) == TINY.text_layers and len(row["layers"][0]["first_attention"]) == TINY.heads
    assert set(row["ablation"]) == {"zero", "mean_position", "random"}
    assert model.config.max_position_embeddings >= STREAM.length


def test_stage_a_learns_the_stream(stage_a):
    _, result, _ = stage_a
    assert len(result.losses) == 30
    assert sum(result.losses[-5:]) / 5 < 0.8 * sum(result.losses[:5]) / 5
    assert result.curve[-1]["loss"] < result.curve[0]["loss"]


def test_stage_a_stops_at_its_wall_clock_limit():
    config = PretrainConfig(
        tokens=10**9, batch_size=2, measure_every=100, measure_rows=2, max_seconds=0.0, stream=STREAM
    )
    _, result = pretrain_text(config, TINY)
    assert result.steps == 1 and result.tokens == 2 * STREAM.length


def test_image_scale_penalty_is_a_hinge_on_rms():
    text = torch.ones(10, 4)  # rms 1
    assert float(_image_scale_penalty(0.5 * torch.ones(3, 6, 4), text)) == 0.0
    assert float(_image_scale_penalty(3.0 * torch.ones(3, 6, 4), text)) == pytest.approx(4.0)


def test_stage_b_keeps_the_language_model_frozen_then_trains_it(stage_a):
    text_lm = stage_a[0]
    frozen, _, result = align_llava(text_lm, AlignConfig(**{**ALIGN.__dict__, "joint_steps": 0}), TINY, STREAM)
    for (name, a), b in zip(text_lm.model.state_dict().items(), frozen.model.language_model.state_dict().values()):
        assert torch.equal(a, b), name
    torch.manual_seed(ALIGN.seed)
    untrained, _ = build_llava(text_shape(TINY, STREAM))
    projector = untrained.model.multi_modal_projector.linear_2.weight
    assert not torch.equal(frozen.model.multi_modal_projector.linear_2.weight, projector)
    joint, _, result = align_llava(text_lm, ALIGN, TINY, STREAM)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(text_lm.model.state_dict().values(), joint.model.language_model.state_dict().values())
    ]
    assert any(changed)
    assert [row["stage"] for row in result.curve] == ["B"] * 5 and [r["step"] for r in result.curve] == [0, 1, 2, 3, 6]
    assert set(result.curve[-1]["input_rms"]) == {"text", "image"}
    assert result.curve[-1]["layers"][0]["image_attention"] is not None


def test_recipe_saves_both_models_and_one_curve(tmp_path):
    pretrain = PretrainConfig(**{**PRETRAIN.__dict__, "tokens": 8 * 37 * 2, "stream": STREAM})
    train_sink_recipe(tmp_path, pretrain, ALIGN, TINY)
    lm = load_model(str(tmp_path))
    assert lm.family.name == "llava"
    text_lm = LlamaForCausalLM.from_pretrained(tmp_path / TEXT_LM_DIR)
    assert text_lm.config.vocab_size == lm.model.config.text_config.vocab_size
    stages = [json.loads(line)["stage"] for line in (tmp_path / CURVE_FILE).read_text().splitlines()]
    assert stages == ["A", "A", "A", "B", "B", "B", "B", "B"]  # A: steps 0, 1, 2; B: 0, 1, 2, 3, 6


@pytest.mark.parametrize(
    "args",
    [
        ["toy-clip", "--recipe", "sink", "--out", "x"],
        ["toy-llava", "--recipe", "sink"],
        ["toy-llava", "--recipe", "sink", "--out", "x", "--steps", "3"],
        ["toy-llava", "--text-tokens", "1000", "--out", "x"],
    ],
)
def test_cli_refuses_misplaced_sink_options_in_one_line(cli, tmp_path, args):
    result = cli("organisms", "train", *[str(tmp_path / a) if a == "x" else a for a in args])
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_sink_recipe_trains_and_reports(cli, tmp_path, monkeypatch):
    from canprobe.organisms import sink

    small = {**PRETRAIN.__dict__, "batch_size": 2, "stream": STREAM, "measure_rows": 2}
    monkeypatch.setattr(sink, "PretrainConfig", functools.partial(PretrainConfig, **small))
    monkeypatch.setattr(sink, "AlignConfig", functools.partial(AlignConfig, **ALIGN.__dict__))
    result = cli("organisms", "train", "toy-llava", "--recipe", "sink", "--out", tmp_path, "--text-tokens", 200)
    assert result.code == 0, result.err
    assert "Stage A: 222 tokens" in result.out  # 3 steps of 2 rows of 37 tokens
    assert load_model(str(tmp_path)).family.name == "llava"
    assert len((tmp_path / CURVE_FILE).read_text().splitlines()) == 4 + 5  # A: steps 0, 1, 2, 3; B: 0, 1, 2, 3, 6
