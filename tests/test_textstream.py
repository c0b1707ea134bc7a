"""Stage A's packed text: one BOS at position 0, captions and trigger-and-copy segments, fresh every batch."""

import pytest
import torch

from canprobe.errors import InputError
from canprobe.organisms.build import BOS_ID, EOS_ID, build_tokenizer
from canprobe.organisms.scenes import Scene
from canprobe.organisms.textstream import SEGMENT, StreamConfig, TextStream, caption_table


def test_caption_table_holds_every_scene_caption_once():
    table = caption_table(build_tokenizer())
    assert table.shape == (2 * 6 * 6 * 3 * 3, SEGMENT)
    assert len({tuple(r) for r in table.tolist()}) == len(table)
    assert (table[:, -1] == EOS_ID).all()
    words = build_tokenizer().convert_ids_to_tokens(table[0, :-1].tolist())
    assert " ".join(words) == Scene("car", "red", "small", "left", "white").caption


def test_rows_are_packed_with_one_bos_at_position_0():
    stream = TextStream(seed=1)
    rows = stream.batch(8)
    assert rows.shape == (8, 1 + SEGMENT * 22) and rows.shape[1] >= 256
    assert (rows[:, 0] == BOS_ID).all()
    assert int((rows == BOS_ID).sum()) == 8  # no other BOS anywhere
    assert (rows[:, SEGMENT::SEGMENT] == EOS_ID).all()  # every segment ends in </s>
    assert int((rows == EOS_ID).sum()) == 8 * 22


def test_segments_are_captions_or_copy_language_in_the_configured_share():
    stream = TextStream(StreamConfig(segments=50, noise_share=0.3, trigger_rate=0.2), seed=2)
    segments = stream.batch(40)[:, 1:].reshape(-1, SEGMENT)
    captions = {tuple(r) for r in stream.captions.tolist()}
    is_caption = torch.tensor([tuple(s) in captions for s in segments.tolist()])
    noise = segments[~is_caption]
    assert abs(len(noise) / len(segments) - 0.3) < 0.03  # 2,000 segments: the share within ~3 sd
    triggers = torch.isin(noise, stream.triggers)
    assert not triggers[:, 0].any() and not triggers[:, -2:].any()  # none first, and room for the copy
    rows, cols = triggers.nonzero(as_tuple=True)
    assert len(rows) > 0.1 * len(noise)
    assert torch.equal(noise[rows, cols + 1], noise[rows, cols - 1])  # the word after a trigger copies the one before
    assert not (triggers[:, 1:] & triggers[:, :-1]).any()
    assert not torch.isin(torch.tensor(list(captions)), stream.triggers).any()


def test_every_batch_is_fresh_and_a_seed_repeats_it():
    a, b = TextStream(seed=5), TextStream(seed=5)
    first = a.batch(4)
    assert torch.equal(first, b.batch(4))
    assert not torch.equal(first, a.batch(4))
    assert not torch.equal(first, TextStream(seed=6).batch(4))


def test_the_copy_language_is_fixed_across_seeds():
    assert torch.equal(TextStream(seed=1).next_cdf, TextStream(seed=2).next_cdf)


@pytest.mark.parametrize("bad", [dict(segments=0), dict(noise_share=1.5), dict(trigger_rate=1.0)])
def test_bad_stream_settings_are_refused(bad):
    with pytest.raises(InputError):
        StreamConfig(**bad)
