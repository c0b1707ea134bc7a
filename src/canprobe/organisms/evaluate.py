"""Held-out checks that the organisms learned their task (scenes from seeds never used in training)."""

from __future__ import annotations

import random

import torch

from canprobe.captions import generate_captions
from canprobe.config import Generation
from canprobe.models import LoadedModel
from canprobe.organisms.scenes import CATEGORIES, Scene, make_scenes

HELD_OUT_SEED = 7  # training uses seed 1234 (organisms.train.TrainConfig)


def caption_exact_match(lm: LoadedModel, n: int = 200, seed: int = HELD_OUT_SEED) -> float:
    """Fraction of ``n`` held-out scenes whose greedy caption equals the true caption."""
    scenes = make_scenes(n, seed)
    captions = generate_captions(lm, [im for im, _ in scenes], Generation(batch_size=50))
    return sum(c == s.caption for c, (_, s) in zip(captions, scenes)) / n


def _other_category(scene: Scene, rng: random.Random) -> Scene:
    other = rng.choice([c for c in CATEGORIES if c != scene.category])
    return Scene(other, scene.color, scene.size, scene.position, scene.background)


@torch.no_grad()
def clip_category_accuracy(lm: LoadedModel, n: int = 200, seed: int = HELD_OUT_SEED) -> float:
    """Fraction of held-out images whose true caption outscores the same caption with another category."""
    scenes = make_scenes(n, seed)
    rng = random.Random(seed)
    true = [s.caption for _, s in scenes]
    wrong = [_other_category(s, rng).caption for _, s in scenes]
    images = [im for im, _ in scenes]
    enc = lm.processor(images=images, text=true + wrong, return_tensors="pt", padding=True).to(lm.device)
    out = lm.model(**enc)
    img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    sim_true = (img * txt[:n]).sum(-1)
    sim_wrong = (img * txt[n:]).sum(-1)
    return float((sim_true > sim_wrong).float().mean())


def held_out(name: str, n: int = 200, seed: int = HELD_OUT_SEED) -> str:
    """``canprobe organisms eval``: one line, the held-out accuracy of a captioning or CLIP model."""
    from canprobe.models import load_model

    lm = load_model(name, "float32")
    if not lm.family.generates:
        return f"{name}: true caption beats other-category caption on {clip_category_accuracy(lm, n, seed):.1%}"
    return f"{name}: exact-match captions on {caption_exact_match(lm, n, seed):.1%} of {n} scenes"
