"""Checks that run before any work starts: output locations and devices.

A command that scores for an hour and then cannot write its results has wasted the hour, so every
output location is checked first: of the right kind (a folder where a folder is written, a file
where a file is) and writable. Writability is tried with a real temporary file, because permission
bits do not tell the whole story (root, read-only mounts, pseudo file systems). The probe leaves
nothing behind and creates no folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from canprobe.errors import InputError


def printable(path: str | os.PathLike) -> str:
    """A path as text that can always be printed (undecodable bytes of a file name as escapes)."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def _nearest_existing(path: Path, what: str, target: Path) -> Path:
    """The closest ancestor of ``path`` (or itself) that exists; it must be a folder."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{what} {printable(target)}: {printable(probe)} is a file, not a folder")
    return probe


def _probe_writable(folder: Path, what: str, target: Path) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".canprobe-probe-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise InputError(
            f"{what} {printable(target)} is not writable ({exc.strerror or exc}); give another location"
        ) from None


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` is a folder (or can become one) that this process can write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {printable(path)} is a file; give a folder (new or existing)")
    _probe_writable(_nearest_existing(path, what, path), what, path)
    return path


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` names a file (new or existing, not a folder) that this process can write."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {printable(path)} is a folder; give a file name inside it")
    _probe_writable(_nearest_existing(path.parent, what, path), what, path)
    return path


def check_device(device: str | None, what: str = "--device") -> str | None:
    """A torch device string that names hardware this machine has (None: the default)."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{what} {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{what} {device}: this machine has no usable CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{what} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{what} {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise InputError(f"{what} {device}: canprobe runs on cpu, cuda or mps devices")
    return device
