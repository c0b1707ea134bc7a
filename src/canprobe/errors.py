"""One error family: every failure a user can fix is a CanprobeError with a message saying how.

The CLI turns these into a single line on stderr and exit code 2.
"""


class CanprobeError(Exception):
    """Base class for errors caused by input the user can correct."""


class InputError(CanprobeError):
    """Bad images, folders, counts or other values given on the command line or API."""


class ModelLoadError(CanprobeError):
    """A model name or path that cannot be loaded."""


class UnsupportedModelError(CanprobeError):
    """An architecture canprobe has no adapter for."""
