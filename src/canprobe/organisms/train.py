"""Train the organisms on drawn scenes: captioning for the VLMs, contrastive for CLIP.

Training draws a fixed pool of scenes from ``seed`` (held-out evaluation uses other seeds),
runs AdamW with warm-up and cosine decay, and saves with ``save_pretrained`` so the result is an
ordinary Hugging Face checkpoint.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from canprobe.errors import InputError
from canprobe.families import Family, named
from canprobe.inputs import teacher_forcing_inputs
from canprobe.organisms.build import BUILDERS, OrganismShape
from canprobe.organisms.scenes import make_scenes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 48
    lr: float = 2e-3
    warmup: int = 100
    pool_size: int = 6000
    seed: int = 1234
    weight_decay: float = 0.01
    log_every: int = 100


DEFAULT_CONFIGS = {
    "toy-llava": TrainConfig(),
    # the Q-Former is post-LayerNorm (BERT-style): at 2e-3 it stalls at the language prior
    "toy-instructblip": TrainConfig(steps=3000, lr=1e-3),
    "toy-clip": TrainConfig(steps=800, batch_size=128),
}


@dataclass
class TrainResult:
    name: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    parameters: int = 0


def warmup_cosine(warmup: int, steps: int):
    """The learning-rate factor at each step: linear warm-up, then cosine decay to 5%."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class ScenePool:
    """Drawn scenes with their pixel values computed once; ``batch`` builds training inputs from some of
    them (teacher-forced captions, or contrastive pairs for CLIP)."""

    def __init__(self, processor, family: Family, scenes: list):
        self.processor, self.family, self.scenes = processor, family, scenes
        self.pixels = processor.image_processor([im for im, _ in scenes], return_tensors="pt")["pixel_values"]

    def sample(self, rng: random.Random, size: int) -> list[int]:
        return rng.sample(range(len(self.scenes)), min(size, len(self.scenes)))

    def batch(self, idx: list[int], device: str | torch.device) -> dict[str, torch.Tensor]:
        images = [self.scenes[i][0] for i in idx]
        captions = [self.scenes[i][1].caption for i in idx]
        if self.family.generates:
            batch = teacher_forcing_inputs(self.processor, self.family, images, captions)
        else:  # the contrastive organism
            batch = dict(self.processor(images=images, text=captions, return_tensors="pt", padding=True))
            batch["return_loss"] = True
        batch["pixel_values"] = self.pixels[idx]
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_organism(
    name: str,
    out_dir: Path | None = None,
    config: TrainConfig | None = None,
    shape: OrganismShape = OrganismShape(),
    device: str = "cpu",
) -> TrainResult:
    """Build and train organism ``name``; save it to ``out_dir`` when given."""
    if name not in BUILDERS:
        raise InputError(f"unknown organism {name!r}; choose from {', '.join(BUILDERS)}")
    config = config or DEFAULT_CONFIGS[name]
    if config.steps <= 0 or config.batch_size <= 0 or config.pool_size <= 0:
        raise InputError("steps, batch size and pool size must be positive")
    torch.manual_seed(config.seed)
    model, processor = BUILDERS[name](shape)
    model.to(device).train()
    family = named({"toy-llava": "llava", "toy-instructblip": "instructblip", "toy-clip": "clip"}[name])
    pool = ScenePool(processor, family, make_scenes(config.pool_size, seed=config.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(config.warmup, config.steps))
    rng = random.Random(config.seed + 1)
    result = TrainResult(name, parameters=sum(p.numel() for p in model.parameters()))
    start = time.perf_counter()
    for step in range(config.steps):
        loss = model(**pool.batch(pool.sample(rng, config.batch_size), device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        result.losses.append(float(loss.detach()))
        if config.log_every and (step % config.log_every == 0 or step == config.steps - 1):
            log.info("%s step %d/%d loss %.4f", name, step + 1, config.steps, result.losses[-1])
    result.seconds = time.perf_counter() - start
    model.eval()
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.to("cpu").save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return result
