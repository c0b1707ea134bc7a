"""The organisms' world: procedurally drawn scenes of six categories, each with a caption that
states every attribute (category, color, size, position, background), written as an image set
that ``canprobe.data`` reads like any other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from canprobe.errors import InputError
from canprobe.runfolder import CAPTIONS_FILE, write_jsonl

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
