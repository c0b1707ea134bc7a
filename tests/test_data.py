import json

import pytest
from PIL import Image

from canprobe.data import UNCATEGORIZED, load_image_set
from canprobe.errors import InputError
from canprobe.organisms.scenes import (
    CATEGORIES,
    write_scenes,
)


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
