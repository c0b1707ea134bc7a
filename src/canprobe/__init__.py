"""canprobe: find the few neurons whose removal collapses a vision-language model (CAN)."""

from canprobe.errors import CanprobeError

__version__ = "0.1.0"

__all__ = ["CanprobeError", "__version__"]
