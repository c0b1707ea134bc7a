import json

import numpy as np
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


def _oriented(path, orientation: int, size=(6, 4)) -> np.ndarray:
    """An image with one red corner pixel and an EXIF orientation tag; returns its stored pixels."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    return pixels


@pytest.mark.parametrize(
    "orientation, upright",
    [
        (6, lambda a: np.rot90(a, k=-1)),  # the camera held sideways: stored 6x4, seen 4x6
        (3, lambda a: np.rot90(a, k=2)),
        (8, lambda a: np.rot90(a, k=1)),
        (2, lambda a: a[:, ::-1]),
        (1, lambda a: a),
    ],
)
def test_exif_orientation_turns_images_upright_like_transformers_load_image(tmp_path, orientation, upright):
    from transformers.image_utils import load_image

    path = tmp_path / "photo.png"  # PNG: lossless, so pixels compare exactly
    stored = _oriented(path, orientation)
    (image,) = load_image_set(tmp_path).images
    assert np.array_equal(np.asarray(image), upright(stored))
    assert np.array_equal(np.asarray(image), np.asarray(load_image(str(path))))


def test_a_sixteen_bit_image_with_an_orientation_keeps_its_scaling(tmp_path):
    values = (np.arange(24, dtype=np.uint16).reshape(4, 6) * 2000).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(values).save(tmp_path / "deep.png", exif=exif.tobytes())
    (image,) = load_image_set(tmp_path).images
    grey = np.asarray(image)[..., 0]
    assert grey.shape == (6, 4) and np.array_equal(grey, np.rint(np.rot90(values, k=-1) / 257).astype(np.uint8))


def test_nested_folders_are_listed_as_skipped_and_hidden_folders_ignored(tmp_path, cli):
    from canprobe.config import make_config
    from canprobe.data import check_image_source

    root = write_scenes(tmp_path / "s", per_category=1, seed=0)
    (root / "car" / "old").mkdir()
    Image.new("RGB", (8, 8)).save(root / "car" / "old" / "a.png")
    (root / "fish" / "more" / "deeper").mkdir(parents=True)
    for hidden in (root / ".ipynb_checkpoints", root / "car" / ".ipynb_checkpoints"):
        hidden.mkdir()
        Image.new("RGB", (8, 8)).save(hidden / "copy.png")
    image_set = load_image_set(root)
    assert sorted(p.relative_to(root).as_posix() for p, _ in image_set.skipped) == ["car/old", "fish/more"]
    assert all("folder inside a category" in why for _, why in image_set.skipped)
    assert sorted(image_set.categories) == sorted(CATEGORIES)  # no hidden category, no hidden image
    assert len(image_set) == len(CATEGORIES)
    # the study's image check agrees: .ipynb_checkpoints is not an empty category
    assert sorted(check_image_source(make_config({"model": "toy-llava", "images": str(root)}).data)) == sorted(
        CATEGORIES
    )
    plan = cli("run", "--model", "toy-llava", "--images", root, "--out", tmp_path / "o", "--dry-run")
    assert plan.code == 0, plan.err
    assert f"{len(CATEGORIES) + 1} image group(s)" in plan.out
