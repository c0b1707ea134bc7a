"""The sink recipe: toy-llava's language model pretrained on text first, as Vicuna was, then aligned to images.

Small models trained from scratch grow a first-token attention sink, and the massive activation
that carries it, only after about 10^9 tokens of long sequences with a fixed first token, Adam at
a high learning rate (Guo et al. 2024, arXiv 2410.13835; Gu et al. ICLR 2025, arXiv 2410.10781).
The scene recipe (``organisms.train``) sees about 4M tokens and lets the image tokens, entering at
|h| near 100, serve as the sink instead. So:

* Stage A (``pretrain_text``): a Llama language model of the organism's shape on ``TextStream``'s
  packed rows (one BOS, fresh data every step), AdamW at a high learning rate, a token budget
  and an optional wall-clock limit (the GPU call has minutes);
* Stage B (``align_llava``): toy-llava built around that language model; the language model frozen
  while the vision tower and projector learn to caption, then trained at a low learning rate with
  packed text rows mixed into every step. The image tokens are held near the text embeddings' scale
  by a hinge on their RMS (HF's LLaVA projector has no norm to put there), so they offer no
  substitute sink.

Both stages measure the model every ``measure_every`` steps and at the powers of two below it
(``organisms.probe.measure_sink``) and append one JSON line per measurement to the curve.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from canprobe.errors import InputError
from canprobe.families import named
from canprobe.organisms.build import IMAGE_ID, SPECIAL_TOKENS, OrganismShape, _text_config, build_llava
from canprobe.organisms.probe import measure_sink
from canprobe.organisms.scenes import make_scenes
from canprobe.organisms.textstream import StreamConfig, TextStream
from canprobe.organisms.train import ScenePool, warmup_cosine

log = logging.getLogger(__name__)

CURVE_FILE = "sink_curve.jsonl"
TEXT_LM_DIR = "text-lm"  # Stage A's language model, saved beside the aligned organism
MEASURE_SEED = 99  # the fixed rows every measurement reads (training streams use other seeds)


@dataclass(frozen=True)
class PretrainConfig:
    tokens: int = 300_000_000
    batch_size: int = 256
    lr: float = 3e-3
    warmup: int = 200
    weight_decay: float = 0.1  # the usual value in LM pretraining; Gu et al. report it strengthening the sink
    measure_every: int = 200
    measure_rows: int = 16
    seed: int = 1234
    max_seconds: float | None = None  # stop earlier when the wall clock runs out (a GPU lease)
    stream: StreamConfig = StreamConfig()

    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch_size * self.stream.length))


@dataclass(frozen=True)
class AlignConfig:
    frozen_steps: int = 600  # the language model frozen: vision tower and projector learn
    joint_steps: int = 900  # then everything, the language model at lm_lr
    batch_size: int = 48
    lr: float = 2e-3
    lm_lr: float = 1e-4
    text_rows: int = 8  # packed text rows in every joint step's loss
    image_scale_weight: float = 1.0  # 0 leaves the image tokens' scale free
    warmup: int = 100
    pool_size: int = 6000
    measure_every: int = 200
    measure_scenes: int = 16
    seed: int = 1234


@dataclass
class StageResult:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)


def text_shape(shape: OrganismShape, stream: StreamConfig) -> OrganismShape:
    """``shape`` with a context that holds a packed row."""
    return replace(shape, context=max(shape.context, stream.length))


def _record(result: StageResult, row: dict, curve_path: Path | None) -> None:
    result.curve.append(row)
    if curve_path is not None:
        with open(curve_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    peak = row["layers"][row["peak_layer"]]
    log.info(
        "stage %s step %d tokens %.3g: loss %.3f, first-token ratio %.1f at layer %d dim %d (rest %.1f), "
        "attention to it %.2f",
        row["stage"],
        row["step"],
        row["tokens"],
        row["loss"],
        peak["first_ratio"],
        row["peak_layer"],
        row["peak_dim"],
        peak["rest_ratio"],
        max(peak["first_attention"]),
    )


def measured_at(step: int, every: int) -> bool:
    """Every ``every`` steps, and at the powers of two below it (the curve's early part on a log scale)."""
    return step % every == 0 or (step < every and step & (step - 1) == 0)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def pretrain_text(
    config: PretrainConfig = PretrainConfig(),
    shape: OrganismShape = OrganismShape(),
    device: str = "cpu",
    curve_path: Path | None = None,
) -> tuple[LlamaForCausalLM, StageResult]:
    """Stage A: train the organism's language model on packed text; measure every ``measure_every`` steps."""
    if config.tokens <= 0 or config.batch_size <= 0 or config.measure_every <= 0:
        raise InputError("tokens, batch size and measure-every must be positive")
    device = torch.device(device)
    torch.manual_seed(config.seed)
    stream = TextStream(config.stream, seed=config.seed, device=device)
    model = LlamaForCausalLM(_text_config(text_shape(shape, config.stream), stream.vocab_size)).to(device)
    held_out = TextStream(config.stream, seed=MEASURE_SEED, device=device).batch(config.measure_rows)
    probe_inputs = {"input_ids": held_out, "labels": held_out}
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",  # one kernel for the whole update: a step of this small model is launch-bound
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / config.warmup))
    result = StageResult()
    steps, per_step = config.steps(), config.batch_size * config.stream.length
    start, cpu_start = time.perf_counter(), time.process_time()
    pending: list[torch.Tensor] = []  # losses still on the device: reading each one would sync every step

    def measure(step: int) -> None:
        result.losses += torch.stack(pending).tolist() if pending else []
        pending.clear()
        model.eval()
        row = {"stage": "A", "step": step, "tokens": step * per_step, "seconds": time.perf_counter() - start}
        row["cpu_seconds"] = time.process_time() - cpu_start  # on a shared CPU, wall time says little
        row["train_loss"] = sum(result.losses[-20:]) / max(1, len(result.losses[-20:]))
        _record(result, {**row, **measure_sink(model, probe_inputs).to_dict()}, curve_path)
        model.train()

    model.train()
    for step in range(steps):
        if measured_at(step, config.measure_every):
            measure(step)
        ids = stream.batch(config.batch_size)
        with _autocast(device):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        pending.append(loss.detach().float())
        result.steps = step + 1
        if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
            break
    result.tokens = result.steps * per_step
    measure(result.steps)
    result.seconds = time.perf_counter() - start
    model.eval()
    return model, result


def _image_scale_penalty(projected: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """How far the image tokens' mean RMS exceeds the word embeddings' (squared hinge, 0 below it)."""
    image_rms = projected.float().pow(2).mean(-1).sqrt().mean()
    text_rms = embeddings.detach().float().pow(2).mean(-1).sqrt().mean()
    return torch.relu(image_rms / text_rms - 1).pow(2)


def align_llava(
    text_lm: LlamaForCausalLM,
    config: AlignConfig = AlignConfig(),
    shape: OrganismShape = OrganismShape(),
    stream: StreamConfig = StreamConfig(),
    device: str = "cpu",
    curve_path: Path | None = None,
):
    """Stage B: toy-llava around ``text_lm``, the language model frozen first, then trained at ``lm_lr``.

    Returns the model, its processor and the stage's result.
    """
    if config.frozen_steps < 0 or config.joint_steps < 0 or config.batch_size <= 0:
        raise InputError("align steps must be non-negative and the batch size positive")
    device = torch.device(device)
    torch.manual_seed(config.seed)
    model, processor = build_llava(text_shape(shape, stream))
    model.model.language_model.load_state_dict(text_lm.model.state_dict())
    model.lm_head.load_state_dict(text_lm.lm_head.state_dict())
    model.to(device)
    family = named("llava")
    pool = ScenePool(processor, family, make_scenes(config.pool_size, seed=config.seed))
    texts = TextStream(stream, seed=config.seed + 2, device=device)
    probe = ScenePool(processor, family, make_scenes(config.measure_scenes, seed=MEASURE_SEED))
    probe_inputs = probe.batch(list(range(config.measure_scenes)), device)
    language = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    owned = {id(p) for p in language}
    rest = [p for p in model.parameters() if id(p) not in owned]
    opt = torch.optim.AdamW([{"params": rest, "lr": config.lr}, {"params": language, "lr": config.lm_lr}])
    steps = config.frozen_steps + config.joint_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(config.warmup, steps))
    words = model.get_input_embeddings().weight[len(SPECIAL_TOKENS) :]
    projected: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _a, out: projected.append(out))
    rng = random.Random(config.seed + 1)
    result = StageResult()
    start = time.perf_counter()

    def measure(step: int) -> None:
        model.eval()
        row = {"stage": "B", "step": step, "tokens": result.tokens, "seconds": time.perf_counter() - start}
        row["train_loss"] = sum(result.losses[-20:]) / max(1, len(result.losses[-20:]))
        _record(result, {**row, **measure_sink(model, probe_inputs, image_token=IMAGE_ID).to_dict()}, curve_path)
        projected.clear()
        model.train()

    try:
        model.train()
        for step in range(steps):
            joint = step >= config.frozen_steps
            for p in language:
                p.requires_grad_(joint)
            if measured_at(step, config.measure_every):
                measure(step)
            batch = pool.batch(pool.sample(rng, config.batch_size), device)
            projected.clear()
            with _autocast(device):
                loss = model(**batch).loss
                penalty = _image_scale_penalty(projected[0], words) if config.image_scale_weight else 0.0
                total = loss + config.image_scale_weight * penalty
                result.tokens += int(batch["attention_mask"].sum())
                if joint and config.text_rows:
                    ids = texts.batch(config.text_rows)
                    total = total + model(input_ids=ids, labels=ids).loss
                    result.tokens += ids.numel()
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            result.losses.append(float(loss.detach()))
            result.steps = step + 1
        measure(result.steps)
    finally:
        hook.remove()
    result.seconds = time.perf_counter() - start
    model.eval()
    return model, processor, result


def train_sink_recipe(
    out_dir: Path,
    pretrain: PretrainConfig = PretrainConfig(),
    align: AlignConfig = AlignConfig(),
    shape: OrganismShape = OrganismShape(),
    device: str = "cpu",
) -> tuple[StageResult, StageResult]:
    """Both stages: the aligned toy-llava saved to ``out_dir``, Stage A's model to ``out_dir/text-lm``,
    the curves of both to ``out_dir/sink_curve.jsonl``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = out_dir / CURVE_FILE
    curve.unlink(missing_ok=True)
    text_lm, stage_a = pretrain_text(pretrain, shape, device, curve)
    text_lm.to("cpu").save_pretrained(out_dir / TEXT_LM_DIR)
    model, processor, stage_b = align_llava(text_lm.to(device), align, shape, pretrain.stream, device, curve)
    model.to("cpu").save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return stage_a, stage_b
