import json

import pytest

from canprobe.captions import CaptionRecord, exact_match_rate, generate_captions, read_captions, write_captions
from canprobe.config import Generation
from canprobe.errors import CanprobeError, InputError
from canprobe.models import load_model
from canprobe.organisms.scenes import make_scenes
from canprobe.runfolder import FORMAT


@pytest.fixture(scope="module")
def llava():
    return load_model("toy-llava")


def test_batching_does_not_change_captions(llava):
    images = [im for im, _ in make_scenes(7, seed=9)]
    one = generate_captions(llava, images, Generation(batch_size=1))
    many = generate_captions(llava, images, Generation(batch_size=4))
    assert one == many
    assert all(c and "<" not in c for c in one)


def test_max_new_tokens_bounds_the_caption(llava):
    images = [im for im, _ in make_scenes(2, seed=9)]
    short = generate_captions(llava, images, Generation(max_new_tokens=3))
    assert all(len(c.split()) <= 3 for c in short)
    with pytest.raises(InputError):
        generate_captions(llava, images, Generation(max_new_tokens=0))


def test_write_and_score_captions(tmp_path):
    recs = [CaptionRecord("car/0.png", "car", "a b", "a b"), CaptionRecord("car/1.png", "car", "x", "y")]
    write_captions(recs, tmp_path / "c.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert lines[1] == {"format": FORMAT, "image": "car/1.png", "category": "car", "caption": "x", "reference": "y"}
    assert read_captions(tmp_path / "c.jsonl") == recs
    assert exact_match_rate(recs) == 0.5
    assert exact_match_rate([CaptionRecord("a", "b", "c")]) is None


def compile_on_cpu(lm):
    """Let transformers compile the decoding step on this CPU too, traced by dynamo without codegen."""
    from transformers import CompileConfig

    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    lm.model.generation_config.compile_config = config


def test_every_decoding_gives_the_same_captions_masked_or_not():
    from canprobe.ablation import ablate

    lm = load_model("toy-llava")
    compile_on_cpu(lm)
    images = [im for im, _ in make_scenes(3, seed=4)]
    mask = {f"language.layers.{layer}.mlp.down_proj": list(range(128)) for layer in range(3)}
    plain = generate_captions(lm, images, Generation(max_new_tokens=10))
    with ablate(lm, mask):
        masked = generate_captions(lm, images, Generation(max_new_tokens=10))
    assert masked != plain
    # compiled first without hooks, then with: the step traced unmasked must not run under the mask
    for decoding in ("static", "compiled"):
        assert generate_captions(lm, images, Generation(max_new_tokens=10, decoding=decoding)) == plain
        with ablate(lm, mask):
            assert generate_captions(lm, images, Generation(max_new_tokens=10, decoding=decoding)) == masked
    with pytest.raises(InputError, match="decoding: 'fast' is not one of eager"):
        generate_captions(lm, images, Generation(decoding="fast"))


def test_caption_files_of_earlier_formats_read_and_newer_ones_are_refused(tmp_path):
    """A line without a format is format 1 (canprobe 0.1, whose lines had no reference either when none was
    known); a line of a newer format is refused in one line naming it."""
    old = tmp_path / "old.jsonl"
    old.write_text(
        json.dumps({"image": "car/0.png", "category": "car", "caption": "a car", "reference": "a car"})
        + "\n"
        + json.dumps({"image": "fish/0.png", "category": "fish", "caption": "a boat"})
        + "\n"
    )
    assert read_captions(old) == [
        CaptionRecord("car/0.png", "car", "a car", "a car"),
        CaptionRecord("fish/0.png", "fish", "a boat", None),
    ]
    newer = tmp_path / "newer.jsonl"
    write_captions([CaptionRecord("car/0.png", "car", "a car")], newer)
    newer.write_text(newer.read_text().replace(f'"format": {FORMAT}', f'"format": {FORMAT + 1}'))
    with pytest.raises(CanprobeError, match=f"newer.jsonl:1 was written in artifact format {FORMAT + 1}") as caught:
        read_captions(newer)
    assert "upgrade canprobe" in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"format": 1, "caption": "x"}) + "\n")
    with pytest.raises(InputError, match="bad.jsonl:1 is not a caption record"):
        read_captions(tmp_path / "bad.jsonl")
