"""The organisms' scenes: deterministic from a seed, captions that state every attribute, the
attributes visible in the pixels, and the image-set layout ``canprobe.data`` reads."""

import json

import numpy as np
import pytest

from canprobe.data import load_image_set
from canprobe.errors import InputError
from canprobe.organisms.scenes import (
    BACKGROUNDS,
    CATEGORIES,
    COLORS,
    POSITION_PHRASES,
    SIZES,
    make_scenes,
    write_scenes,
)


def test_scenes_are_deterministic_from_seed():
    a = make_scenes(6, seed=5)
    b = make_scenes(6, seed=5)
    c = make_scenes(6, seed=6)
    assert [s for _, s in a] == [s for _, s in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, c))


def test_caption_states_every_attribute():
    for _, scene in make_scenes(30, seed=1):
        cap = scene.caption
        assert scene.category in CATEGORIES and f" {scene.category} " in cap
        assert scene.color in COLORS and scene.color in cap
        assert scene.size in SIZES and cap.startswith(f"a {scene.size} ")
        assert POSITION_PHRASES[scene.position] in cap
        assert scene.background in BACKGROUNDS and cap.endswith(f"{scene.background} background")


def test_scenes_vary_and_cover_categories():
    scenes = [s for _, s in make_scenes(60, seed=2)]
    assert {s.category for s in scenes} == set(CATEGORIES)
    assert len({s.color for s in scenes}) > 3 and len({s.position for s in scenes}) == 3
    assert len({s.background for s in scenes}) == 3 and len({s.size for s in scenes}) == 2


def test_object_colour_is_in_the_pixels():
    # a large red object on a white background: many strongly red pixels, none on a blue scene
    for image, scene in make_scenes(40, seed=4):
        arr = np.asarray(image).astype(int)
        red = ((arr[..., 0] > 170) & (arr[..., 1] < 80) & (arr[..., 2] < 80)).mean()
        if scene.color == "red" and scene.size == "large":
            assert red > 0.04
        if scene.color == "blue":
            assert red < 0.01


def test_write_scenes_layout(tmp_path):
    root = write_scenes(tmp_path / "s", per_category=3, seed=0)
    for cat in CATEGORIES:
        assert len(list((root / cat).glob("*.png"))) == 3
    lines = [json.loads(x) for x in (root / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * len(CATEGORIES)
    image_set = load_image_set(root)
    assert len(image_set) == 18 and image_set.categories == sorted(CATEGORIES)
    first = image_set.records[0]
    assert first.caption is not None and first.category in first.caption


def test_non_positive_counts_are_refused(tmp_path):
    with pytest.raises(InputError):
        make_scenes(0, seed=0)
    with pytest.raises(InputError):
        write_scenes(tmp_path, per_category=-1)
