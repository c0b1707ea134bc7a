"""CLIP (``clip``): the image-text scorer of the CLIP score; it is loaded, never probed (no sites)."""

from __future__ import annotations

from canprobe.families.base import Family


class Clip(Family):
    name = "clip"
    model_types = ("clip",)
    auto_class = "AutoModel"
    generates = False
