"""Stage A's text: long packed sequences over the organisms' vocabulary, drawn fresh on the device every step.

A row is one BOS at position 0, then segments of 12 tokens (11 words and ``</s>``) with no other BOS:
* scene captions in random order (every attribute drawn independently, so attention has little to
  retrieve inside a caption beyond its place in the template);
* with probability ``noise_share``, a segment of a fixed random Markov "language" with trigger
  words: after a trigger the next word is a copy of the word before the trigger (Guo et al.'s
  bigram-backcopy task, arXiv 2410.13835). Heads that copy have work at a few positions and must
  do nothing at all the others, the condition under which dormant heads and a first-token sink are
  reported to emerge.

Everything is tensor work on the stream's device (no Python per token), so a GPU draws hundreds of
millions of tokens in seconds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from canprobe.errors import InputError
from canprobe.organisms.build import BOS_ID, EOS_ID, SPECIAL_TOKENS, build_tokenizer
from canprobe.organisms.scenes import BACKGROUNDS, CATEGORIES, COLORS, POSITIONS, SIZES, Scene

SEGMENT = 12  # 11 words and </s>: every scene caption is 11 words
TRIGGER_WORDS = ("?", ",", "for")  # never in a caption nor in the organisms' prompt


@dataclass(frozen=True)
class StreamConfig:
    segments: int = 22  # 1 + 22 x 12 = 265 tokens a row
    noise_share: float = 0.25  # share of segments drawn from the trigger-and-copy language
    trigger_rate: float = 0.15  # chance that a noise word is a trigger (its next word is then a copy)
    language_seed: int = 0  # the Markov language is one fixed language for every run

    def __post_init__(self):
        if self.segments <= 0 or not 0 <= self.noise_share <= 1 or not 0 <= self.trigger_rate < 1:
            raise InputError("segments must be positive, noise share in [0, 1] and trigger rate in [0, 1)")

    @property
    def length(self) -> int:
        return 1 + SEGMENT * self.segments


def caption_table(tokenizer) -> torch.Tensor:
    """Token ids of every possible scene caption followed by ``</s>``: [captions, SEGMENT]."""
    scenes = itertools.product(CATEGORIES, COLORS, SIZES, POSITIONS, BACKGROUNDS)
    rows = [
        tokenizer(Scene(*attrs).caption, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for attrs in scenes
    ]
    if {len(r) for r in rows} != {SEGMENT}:
        raise ValueError(f"scene captions must be {SEGMENT - 1} words long to pack")
    return torch.tensor(rows, dtype=torch.long)


class TextStream:
    """Packed rows of ``config.length`` tokens; ``batch(n)`` draws ``n`` fresh rows from the stream's generator."""

    def __init__(self, config: StreamConfig = StreamConfig(), seed: int = 0, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        tokenizer = build_tokenizer()
        self.vocab_size = len(tokenizer)
        self.captions = caption_table(tokenizer).to(self.device)
        self.triggers = torch.tensor(tokenizer.convert_tokens_to_ids(list(TRIGGER_WORDS)), device=self.device)
        special = len(SPECIAL_TOKENS)
        words = [i for i in range(special, self.vocab_size) if i not in set(self.triggers.tolist())]
        self.words = torch.tensor(words, device=self.device)
        language = torch.Generator().manual_seed(config.language_seed)
        # one sparse next-word distribution per token id (rows of non-words are never read)
        logits = 3.0 * torch.randn(self.vocab_size, len(words), generator=language)
        self.next_cdf = logits.softmax(-1).cumsum(-1).to(self.device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.device)

    def _pick(self, table: torch.Tensor, *shape: int) -> torch.Tensor:
        return table[torch.randint(len(table), shape, generator=self.generator, device=self.device)]

    def noise(self, n: int) -> torch.Tensor:
        """``n`` segments of the trigger-and-copy language, each ending in ``</s>``: [n, SEGMENT]."""
        out = torch.empty(n, SEGMENT, dtype=torch.long, device=self.device)
        out[:, -1] = EOS_ID
        out[:, 0] = self._pick(self.words, n)
        is_trigger = torch.zeros(n, dtype=torch.bool, device=self.device)
        for t in range(1, SEGMENT - 1):
            u = self._rand(n, 1)
            index = torch.searchsorted(self.next_cdf[out[:, t - 1]], u).squeeze(1).clamp(max=len(self.words) - 1)
            word = self.words[index]
            # a trigger needs room for its copy inside the segment, and never follows a trigger
            trigger = (self._rand(n) < self.config.trigger_rate) & ~is_trigger & (t < SEGMENT - 2)
            word = torch.where(trigger, self._pick(self.triggers, n), word)
            out[:, t] = torch.where(is_trigger, out[:, t - 2], word)  # the copy of the word before the trigger
            is_trigger = trigger
        return out

    def batch(self, n: int) -> torch.Tensor:
        """[n, length] token ids: BOS, then captions and noise segments in random order."""
        slots = n * self.config.segments
        segments = self._pick(self.captions, slots)
        noisy = self._rand(slots) < self.config.noise_share
        segments = torch.where(noisy[:, None], self.noise(slots), segments)
        bos = torch.full((n, 1), BOS_ID, dtype=torch.long, device=self.device)
        return torch.cat([bos, segments.reshape(n, -1)], dim=1)
