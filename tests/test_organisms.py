"""The organisms: real HF classes that round-trip through the Auto classes, trainable, and trained."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

from canprobe.models import BUILTIN_MODELS, ORGANISM_DIR, load_model
from canprobe.organisms.build import BUILDERS, count_parameters
from canprobe.organisms.evaluate import caption_exact_match, clip_category_accuracy
from canprobe.organisms.train import TrainConfig, train_organism
from tests.conftest import TINY


@pytest.mark.parametrize("name", list(BUILDERS))
def test_build_save_and_load_through_auto_classes(tmp_path, name):
    model, processor = BUILDERS[name](TINY)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    auto = AutoModel if name == "toy-clip" else AutoModelForImageTextToText
    loaded = auto.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert type(AutoProcessor.from_pretrained(tmp_path)).__name__ == type(processor).__name__
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ["toy-llava", "toy-instructblip", "toy-clip"])
def test_short_training_lowers_the_loss(name):
    config = TrainConfig(steps=24, batch_size=8, pool_size=48, warmup=2, lr=3e-3, log_every=0)
    result = train_organism(name, None, config, shape=TINY)
    assert len(result.losses) == 24
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < 0.85 * first, (first, last)


def test_shipped_organisms_meet_the_spec():
    for name in BUILTIN_MODELS:
        assert (ORGANISM_DIR / name / "model.safetensors").exists(), name
    total = sum(f.stat().st_size for f in ORGANISM_DIR.rglob("*") if f.is_file())
    assert total <= 40 * 2**20, f"{total / 2**20:.1f} MB shipped"
    for name in ("toy-llava", "toy-instructblip"):
        lm = load_model(name)
        lang = lm.model.model.language_model if name == "toy-llava" else lm.model.language_model
        assert lang.config.num_hidden_layers >= 4
        assert lang.config.intermediate_size >= 512
        assert all(not p.requires_grad for p in lm.model.parameters())
        assert count_parameters(lm.model) > 1_000_000


@pytest.mark.parametrize("name, bar", [("toy-llava", 0.90), ("toy-instructblip", 0.90)])
def test_held_out_captions_are_exact(name, bar):
    rate = caption_exact_match(load_model(name), n=200)
    print(f"{name} held-out exact match: {rate:.3f}")
    assert rate >= bar


def test_clip_prefers_true_category():
    rate = clip_category_accuracy(load_model("toy-clip"), n=200)
    print(f"toy-clip held-out category accuracy: {rate:.3f}")
    assert rate >= 0.95


def test_builtins_load_and_caption_offline(tmp_path):
    """All three built-ins load, and both captioners caption 32 scenes, with the hub switched off."""
    code = f"""
from canprobe.models import load_model
from canprobe.data import load_image_set
from canprobe.organisms.scenes import write_scenes
from canprobe.captions import generate_captions
root = write_scenes({str(tmp_path)!r}, per_category=6, seed=21)
images = load_image_set(root).images[:32]
assert load_model("toy-clip").kind == "clip"
for name in ("toy-llava", "toy-instructblip"):
    captions = generate_captions(load_model(name), images)
    assert len(captions) == 32 and all(captions)
print("ok")
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
