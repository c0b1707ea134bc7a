"""Image sets: the folder-per-category layout every command reads (the organisms' scenes are drawn
by ``canprobe.organisms.scenes``).

An image set is a folder with one sub-folder per category holding image files, plus an optional
``captions.jsonl`` (one ``{"file": "car/0003.png", "caption": "..."}`` per line). Images placed
directly in the folder belong to the category ``uncategorized``.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from canprobe.checks import printable, read_text_file
from canprobe.errors import InputError
from canprobe.runfolder import CAPTIONS_FILE

if TYPE_CHECKING:
    from canprobe.config import Data

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
UNCATEGORIZED = "uncategorized"
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: larger images are skipped


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    category: str
    caption: str | None = None
    name: str = ""  # path relative to the image set's root, the image's identity in every output


@dataclass
class ImageSet:
    """The readable images of a folder, with what was skipped and why."""

    root: Path
    records: list[ImageRecord]
    images: list[Image.Image]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    unmatched_captions: list[str] = field(default_factory=list)  # captions.jsonl entries naming no image file

    @property
    def categories(self) -> list[str]:
        return sorted({r.category for r in self.records})

    def __len__(self) -> int:
        return len(self.records)


def _read_captions(root: Path) -> dict[str, str | None]:
    """file -> caption; ``"caption": null`` means no reference caption for that image."""
    path = root / CAPTIONS_FILE
    if not path.exists():
        return {}
    captions: dict[str, str | None] = {}
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            file, caption = entry["file"], entry["caption"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f'{path}:{n}: expected {{"file": ..., "caption": ...}} ({exc})') from None
        if not isinstance(file, str) or not (caption is None or isinstance(caption, str)):
            raise InputError(f'{path}:{n}: "file" must be a string and "caption" a string or null')
        if file in captions and captions[file] != caption:
            raise InputError(f"{path}:{n}: a second, different caption for {file}; keep one line per image")
        captions[file] = caption
    return captions


def open_image(path: Path) -> Image.Image:
    """Decode one image as RGB, turned upright by its EXIF orientation; raises ValueError/OSError for
    unreadable or oversized files."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{im.width}x{im.height} exceeds the {MAX_IMAGE_PIXELS} pixel limit")
            ImageOps.exif_transpose(im, in_place=True)  # upright as the camera meant, as transformers' load_image
            return _to_rgb(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel, scaling 16-bit and float images instead of clipping them.

    Pillow's own conversion clips: a 16-bit grey image becomes all white and a float image in
    [0, 1] all black. 16-bit values are scaled by 255/65535; floats in [0, 1] by 255. Integer
    images deeper than 16 bits and floats outside [0, 1] have no faithful 8-bit reading and raise.
    """
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N") or (im.mode == "I" and _bits(im) == 16):
        values = np.asarray(im, dtype=np.float64) / 257.0
    elif im.mode == "I":
        raise ValueError(f"{_bits(im) or 32}-bit integer image; convert it to 8 or 16 bits per channel")
    elif im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ValueError("float image with values outside [0, 1]; convert it to 8 or 16 bits per channel")
        values = values * 255.0
    else:
        return im.convert("RGB")
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def _bits(im: Image.Image) -> int | None:
    """Bits per sample as the file states it (TIFF tag 258; PNG stores 16-bit grey as mode I)."""
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 258 in tags:
        value = tags[258]
        return int(value[0] if isinstance(value, tuple) else value)
    return 16 if im.format == "PNG" else None


def _visible(folder: Path) -> list[Path]:
    """A folder's entries, sorted, without hidden ones (.ipynb_checkpoints, .git, ._ files): ignored everywhere."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def category_folders(root: Path) -> list[Path]:
    """The category folders of a folder-per-category image set."""
    return [p for p in _visible(root) if p.is_dir()]


def folder_candidates(root: Path, nested: list[tuple[Path, str]] | None = None) -> list[tuple[Path, str]]:
    """(image path, category) for every image file of a folder-per-category image set.

    A folder inside a category folder is not read (a category is one level deep); each is appended
    to ``nested`` with the reason, so it is listed as skipped rather than left out unseen.
    """
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist or is not a folder")
    candidates: list[tuple[Path, str]] = []
    for p in _visible(root):
        if p.is_dir():
            for f in _visible(p):
                if f.is_dir() and nested is not None:
                    nested.append((f, "a folder inside a category folder: not read (one folder level per category)"))
                elif f.suffix.lower() in IMAGE_EXTENSIONS:
                    candidates.append((f, p.name))
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            candidates.append((p, UNCATEGORIZED))
    return candidates


def coco_candidates(annotations: Path, image_dir: Path) -> tuple[list[tuple[Path, str]], dict[str, str]]:
    """(image path, category) pairs and captions from a COCO-style annotation file.

    The file has ``images`` (id, file_name), ``categories`` (id, name) and ``annotations``
    (image_id with category_id and/or caption). An image with objects of several categories
    belongs to each of them.
    """
    annotations, image_dir = Path(annotations), Path(image_dir)
    if not annotations.is_file():
        raise InputError(f"annotation file {annotations} does not exist")
    if not image_dir.is_dir():
        raise InputError(f"image folder {image_dir} does not exist or is not a folder")
    try:
        coco = json.loads(read_text_file(annotations))
        files = {img["id"]: img["file_name"] for img in coco["images"]}
        names = {c["id"]: c["name"] for c in coco.get("categories", [])}
        pairs, captions = {}, {}
        for ann in coco["annotations"]:
            file = files[ann["image_id"]]
            if "category_id" in ann:
                pairs[(file, names[ann["category_id"]])] = None
            if "caption" in ann:
                captions.setdefault(file, str(ann["caption"]).strip())
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{annotations}: not a COCO-style annotation file ({type(exc).__name__}: {exc})") from None
    if not pairs:
        pairs = {(file, UNCATEGORIZED): None for file in files.values()}
    return [(image_dir / file, cat) for file, cat in sorted(pairs)], captions


def load_image_set(
    root: Path | str,
    categories: list[str] | None = None,
    limit: int | None = None,
    annotations: Path | str | None = None,
) -> ImageSet:
    """Read an image set (folder per category, or COCO annotations + image folder).

    ``limit`` caps the images per category. Unreadable files are skipped and counted, not fatal.
    """
    root = Path(root)
    unmatched: list[str] = []
    skipped: list[tuple[Path, str]] = []
    if annotations is not None:
        candidates, captions = coco_candidates(Path(annotations), root)
    else:
        candidates, captions = folder_candidates(root, skipped), _read_captions(root)
        files = {p.relative_to(root).as_posix() for p, _ in candidates}
        unmatched = sorted(name for name in captions if name not in files)
    if categories is not None:
        candidates = [(p, c) for p, c in candidates if c in categories]
        skipped = [(p, why) for p, why in skipped if p.parent.name in categories]
    if limit is not None:
        if limit <= 0:
            raise InputError(f"the number of images per category must be positive, got {limit}")
        seen: dict[str, int] = {}
        capped = []
        for path, category in candidates:
            seen[category] = seen.get(category, 0) + 1
            if seen[category] <= limit:
                capped.append((path, category))
        candidates = capped
    records, images = [], []
    for path, category in candidates:
        rel = path.relative_to(root).as_posix()
        try:
            rel.encode("utf-8")
            images.append(open_image(path))
        except UnicodeEncodeError:
            skipped.append((path, "the file name is not valid UTF-8; rename the file"))
            continue
        except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            skipped.append((path, str(exc) or type(exc).__name__))
            log.warning("skipping unreadable image %s: %s", printable(path), exc)
            continue
        records.append(ImageRecord(path, category, captions.get(rel), rel))
    if not records:
        what = f"categories {categories}" if categories else "image files"
        extra = f" ({len(skipped)} unreadable)" if skipped else ""
        raise InputError(f"no readable {what} in {root}{extra}; expected one folder per category of images")
    return ImageSet(root, records, images, skipped, unmatched)


def check_image_source(config: Data) -> dict[str, int]:
    """Images per category, counted from file names (no decoding), before any model loads."""
    root = Path(config.images)
    if config.annotations is not None:
        if not Path(config.annotations).is_file():
            raise InputError(f"config field annotations: {config.annotations} does not exist")
        if not root.is_dir():
            raise InputError(f"config field images: folder {root} does not exist")
        candidates, _ = coco_candidates(Path(config.annotations), root)
    else:
        if not root.is_dir():
            raise InputError(f"config field images: folder {root} does not exist")
        candidates = folder_candidates(root)
    counts: dict[str, int] = {}
    for _, category in candidates:
        counts[category] = counts.get(category, 0) + 1
    if root.is_dir() and config.annotations is None:
        for sub in category_folders(root):
            counts.setdefault(sub.name, 0)
    wanted = config.categories if config.categories is not None else sorted(counts)
    if not wanted:
        raise InputError(f"config field images: no images in {root}")
    for category in wanted:
        if counts.get(category, 0) == 0:
            raise InputError(f"config field categories: category {category!r} has no images in {root}")
    return {c: counts[c] for c in wanted}
