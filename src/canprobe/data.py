"""Image sets: procedurally drawn scenes, and the folder-per-category layout every command reads.

An image set is a folder with one sub-folder per category holding image files, plus an optional
``captions.jsonl`` (one ``{"file": "car/0003.png", "caption": "..."}`` per line). Images placed
directly in the folder belong to the category ``uncategorized``.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from canprobe.checks import printable
from canprobe.errors import InputError
from canprobe.runfolder import CAPTIONS_FILE, write_jsonl

log = logging.getLogger(__name__)

CATEGORIES = ("car", "house", "tree", "boat", "fish", "flower")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (235, 235, 235), "black": (20, 20, 20), "gray": (128, 128, 128)}
SIZES = {"small": 0.36, "large": 0.62}
POSITIONS = {"left": 0.3, "middle": 0.5, "right": 0.7}
POSITION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
UNCATEGORIZED = "uncategorized"
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: larger images are skipped


@dataclass(frozen=True)
class Scene:
    """The attributes of one drawn scene; its caption states all of them."""

    category: str
    color: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return (
            f"a {self.size} {self.color} {self.category} {POSITION_PHRASES[self.position]} "
            f"with a {self.background} background"
        )


def caption_words() -> list[str]:
    """Every word a scene caption can contain (the organisms' vocabulary is built from it)."""
    fixed = "a on in the with background".split()
    return fixed + list(SIZES) + list(COLORS) + list(CATEGORIES) + list(POSITIONS) + list(BACKGROUNDS)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * factor))) for c in rgb)


def draw_scene(scene: Scene, rng: random.Random, resolution: int = 96) -> Image.Image:
    """Draw ``scene`` with random jitter of shade, placement, size and background texture."""
    bg = _jitter(BACKGROUNDS[scene.background], rng, 12)
    img = Image.new("RGB", (resolution, resolution), bg)
    d = ImageDraw.Draw(img)
    # background texture: a few faint blotches so that backgrounds are not flat
    for _ in range(rng.randint(2, 5)):
        x, y, r = rng.uniform(0, resolution), rng.uniform(0, resolution), rng.uniform(4, 14)
        d.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(bg, rng, 14))
    w = SIZES[scene.size] * resolution * rng.uniform(0.9, 1.1)
    cx = POSITIONS[scene.position] * resolution + rng.uniform(-0.04, 0.04) * resolution
    cy = resolution * rng.uniform(0.42, 0.58)
    col = _jitter(COLORS[scene.color], rng)
    dark = _shade(col, 0.55)
    x0, x1 = cx - w / 2, cx + w / 2
    y0, y1 = cy - w / 2, cy + w / 2
    draw = _DRAWERS[scene.category]
    draw(d, x0, y0, x1, y1, w, col, dark)
    return img


def _draw_car(d, x0, y0, x1, y1, w, col, dark):
    d.rectangle((x0, y0 + 0.45 * w, x1, y0 + 0.75 * w), fill=col)
    d.rectangle((x0 + 0.2 * w, y0 + 0.2 * w, x1 - 0.25 * w, y0 + 0.45 * w), fill=col)
    d.rectangle((x0 + 0.27 * w, y0 + 0.25 * w, x1 - 0.32 * w, y0 + 0.42 * w), fill=(200, 220, 240))
    r = 0.11 * w
    for wx in (x0 + 0.22 * w, x1 - 0.22 * w):
        d.ellipse((wx - r, y0 + 0.75 * w - r, wx + r, y0 + 0.75 * w + r), fill=(15, 15, 15))


def _draw_house(d, x0, y0, x1, y1, w, col, dark):
    d.rectangle((x0 + 0.1 * w, y0 + 0.45 * w, x1 - 0.1 * w, y1), fill=col)
    d.polygon([(x0, y0 + 0.48 * w), ((x0 + x1) / 2, y0), (x1, y0 + 0.48 * w)], fill=dark)
    d.rectangle((x0 + 0.42 * w, y0 + 0.7 * w, x0 + 0.58 * w, y1), fill=(90, 50, 20))


def _draw_tree(d, x0, y0, x1, y1, w, col, dark):
    cx = (x0 + x1) / 2
    d.rectangle((cx - 0.08 * w, y0 + 0.55 * w, cx + 0.08 * w, y1), fill=(110, 65, 25))
    d.ellipse((x0 + 0.1 * w, y0, x1 - 0.1 * w, y0 + 0.68 * w), fill=col)


def _draw_boat(d, x0, y0, x1, y1, w, col, dark):
    cx = (x0 + x1) / 2
    d.polygon([(x0, y0 + 0.65 * w), (x1, y0 + 0.65 * w), (x1 - 0.2 * w, y1), (x0 + 0.2 * w, y1)], fill=col)
    d.rectangle((cx - 0.03 * w, y0, cx + 0.03 * w, y0 + 0.65 * w), fill=(90, 50, 20))
    d.polygon([(cx + 0.04 * w, y0 + 0.05 * w), (cx + 0.04 * w, y0 + 0.6 * w), (x1 - 0.1 * w, y0 + 0.6 * w)], fill=dark)


def _draw_fish(d, x0, y0, x1, y1, w, col, dark):
    cy = (y0 + y1) / 2
    d.ellipse((x0 + 0.25 * w, cy - 0.22 * w, x1, cy + 0.22 * w), fill=col)
    d.polygon([(x0, cy - 0.22 * w), (x0 + 0.3 * w, cy), (x0, cy + 0.22 * w)], fill=dark)
    r = 0.05 * w
    ex = x1 - 0.18 * w
    d.ellipse((ex - r, cy - 0.08 * w - r, ex + r, cy - 0.08 * w + r), fill=(10, 10, 10))


def _draw_flower(d, x0, y0, x1, y1, w, col, dark):
    cx, cy = (x0 + x1) / 2, y0 + 0.35 * w
    d.rectangle((cx - 0.03 * w, cy, cx + 0.03 * w, y1), fill=(40, 120, 40))
    r = 0.13 * w
    for dx, dy in ((0, -1), (0.95, -0.31), (0.59, 0.81), (-0.59, 0.81), (-0.95, -0.31)):
        px, py = cx + dx * 0.2 * w, cy + dy * 0.2 * w
        d.ellipse((px - r, py - r, px + r, py + r), fill=col)
    d.ellipse((cx - 0.08 * w, cy - 0.08 * w, cx + 0.08 * w, cy + 0.08 * w), fill=dark)


_DRAWERS = {
    "car": _draw_car,
    "house": _draw_house,
    "tree": _draw_tree,
    "boat": _draw_boat,
    "fish": _draw_fish,
    "flower": _draw_flower,
}


def random_scene(rng: random.Random, category: str | None = None) -> Scene:
    return Scene(
        category=category or rng.choice(CATEGORIES),
        color=rng.choice(list(COLORS)),
        size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)),
        background=rng.choice(list(BACKGROUNDS)),
    )


def make_scenes(
    n: int, seed: int, resolution: int = 96, categories: tuple[str, ...] | None = None
) -> list[tuple[Image.Image, Scene]]:
    """``n`` scenes, deterministic from ``seed``; categories cycle so every one is represented."""
    if n <= 0:
        raise InputError(f"the number of scenes must be positive, got {n}")
    cats = categories or CATEGORIES
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng, cats[i % len(cats)])
        out.append((draw_scene(scene, rng, resolution), scene))
    return out


def write_scenes(out_dir: Path, per_category: int, seed: int = 0, resolution: int = 96) -> Path:
    """Write ``per_category`` scenes of every category as an image set; returns the folder."""
    if per_category <= 0:
        raise InputError(f"--per-category must be a positive number, got {per_category}")
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    lines = []
    for category in CATEGORIES:
        (out_dir / category).mkdir(parents=True, exist_ok=True)
        for i in range(per_category):
            scene = random_scene(rng, category)
            rel = f"{category}/{i:04d}.png"
            draw_scene(scene, rng, resolution).save(out_dir / rel)
            lines.append({"file": rel, "caption": scene.caption})
    write_jsonl(out_dir / CAPTIONS_FILE, lines)
    return out_dir


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


def read_text_file(path: Path, what: str = "") -> str:
    """A UTF-8 text file's content; other encodings and unreadable files are one clear error."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{printable(path)}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}){what}; "
            "save it as UTF-8"
        ) from None
    except OSError as exc:
        raise InputError(f"{printable(path)}: cannot be read ({exc.strerror or exc})") from None


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
    """Decode one image as RGB; raises ValueError/OSError for unreadable or oversized files."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{im.width}x{im.height} exceeds the {MAX_IMAGE_PIXELS} pixel limit")
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


def folder_candidates(root: Path) -> list[tuple[Path, str]]:
    """(image path, category) for every image file of a folder-per-category image set."""
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist or is not a folder")
    candidates: list[tuple[Path, str]] = []
    for p in sorted(root.iterdir()):
        if p.is_dir():
            candidates += [(f, p.name) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
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
    if annotations is not None:
        candidates, captions = coco_candidates(Path(annotations), root)
    else:
        candidates, captions = folder_candidates(root), _read_captions(root)
        files = {p.relative_to(root).as_posix() for p, _ in candidates}
        unmatched = sorted(name for name in captions if name not in files)
    if categories is not None:
        candidates = [(p, c) for p, c in candidates if c in categories]
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
    records, images, skipped = [], [], []
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
