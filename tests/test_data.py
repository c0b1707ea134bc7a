import json

import numpy as np
import pytest
from PIL import Image

from canprobe.data import (
    BACKGROUNDS,
    CATEGORIES,
    COLORS,
    POSITION_PHRASES,
    SIZES,
    UNCATEGORIZED,
    load_image_set,
    make_scenes,
    write_scenes,
)
from canprobe.errors import InputError


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


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = write_scenes(tmp_path / "s", per_category=1, seed=0)
    (root / "car" / "fake.jpg").write_text("not an image")
    good = (root / "car" / "0000.png").read_bytes()
    (root / "car" / "truncated.png").write_bytes(good[: len(good) // 3])
    Image.new("RGB", (4, 4)).save(root / "loose.png")
    image_set = load_image_set(root)
    assert len(image_set.skipped) == 2
    assert {p.name for p, _ in image_set.skipped} == {"fake.jpg", "truncated.png"}
    assert len(image_set) == len(CATEGORIES) + 1
    assert UNCATEGORIZED in image_set.categories


def test_missing_and_empty_folders_are_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image_set(tmp_path / "nope")
    (tmp_path / "empty" / "car").mkdir(parents=True)
    with pytest.raises(InputError, match="no readable"):
        load_image_set(tmp_path / "empty")


def test_non_positive_counts_are_refused(tmp_path):
    with pytest.raises(InputError):
        make_scenes(0, seed=0)
    with pytest.raises(InputError):
        write_scenes(tmp_path, per_category=-1)


def test_limit_caps_images_per_category(tmp_path):
    root = write_scenes(tmp_path / "s", per_category=3, seed=0)
    image_set = load_image_set(root, limit=2, categories=["car", "fish"])
    assert [r.category for r in image_set.records] == ["car", "car", "fish", "fish"]
    with pytest.raises(InputError):
        load_image_set(root, limit=0)


def test_coco_style_annotations(tmp_path):
    root = write_scenes(tmp_path / "s", per_category=1, seed=0)
    coco = {
        "images": [{"id": 1, "file_name": "car/0000.png"}, {"id": 2, "file_name": "boat/0000.png"}],
        "categories": [{"id": 3, "name": "vehicle"}, {"id": 4, "name": "water"}],
        "annotations": [
            {"image_id": 1, "category_id": 3},
            {"image_id": 2, "category_id": 3},
            {"image_id": 2, "category_id": 4, "caption": "a boat"},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    image_set = load_image_set(root, annotations=tmp_path / "instances.json")
    assert sorted((r.path.parent.name, r.category) for r in image_set.records) == [
        ("boat", "vehicle"),
        ("boat", "water"),
        ("car", "vehicle"),
    ]
    assert {r.caption for r in image_set.records if r.path.parent.name == "boat"} == {"a boat"}
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match="COCO"):
        load_image_set(root, annotations=tmp_path / "bad.json")
