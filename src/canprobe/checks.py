"""Checks that run before any work starts: output locations and devices.

A command that scores for an hour and then cannot write its results has wasted the hour, so every
output location is checked first: of the right kind (a folder where a folder is written, a file
where a file is) and writable. Writability is tried with a real temporary file, because permission
bits do not tell the whole story (root, read-only mounts, pseudo file systems). The probe leaves
nothing behind and creates no folder.

An output never destroys something: canprobe writes only regular files or new paths (never a
device, a pipe, a socket or a folder, even as root), never inside a folder the same command reads
(an image set, a run folder being reported), and a symlink is written through (its target gets the
new content; the link stays).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
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


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def not_regular(path: str | os.PathLike) -> str | None:
    """What ``path`` (through symlinks) is when it is neither a regular file nor absent: "a pipe", ...; else None."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return f"not usable ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str | os.PathLike, what: str) -> None:
    """Refuse to write over anything but a regular file: replacing a device or a pipe destroys it."""
    kind = not_regular(path)
    if kind is not None:
        raise InputError(
            f"{what} {printable(path)} is {kind}; canprobe writes only regular files or new paths, give another"
        )


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def _check_not_inside(path: Path, inputs: Iterable[str | os.PathLike], what: str, allowed: str) -> None:
    for folder in inputs:
        if folder is not None and Path(folder).is_dir() and _inside(path, Path(folder)):
            raise InputError(
                f"{what} {printable(path)} is inside {printable(folder)}, which this command reads; "
                f"give {allowed} outside it"
            )


def check_output_dir(
    path: str | os.PathLike, what: str = "--out", inputs: Iterable[str | os.PathLike] = (), files: Iterable[str] = ()
) -> Path:
    """``path`` is a folder (or can become one) that this process can write into, outside the folders in
    ``inputs``; the ``files`` it will write there (``runfolder.check_run_folder``) are regular files or absent."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {printable(path)} is a file; give a folder (new or existing)")
    _check_not_inside(path, inputs, what, "a folder")
    if path.is_dir():
        for name in files:
            check_regular(path / name, f"{what} {printable(path)}: its")
    _probe_writable(_nearest_existing(path, what, path), what, path)
    return path


def check_output_file(
    path: str | os.PathLike, what: str = "--out", inputs: Iterable[str | os.PathLike] = (), suffix: str | None = None
) -> Path:
    """``path`` names a regular file (new or existing) that this process can write, outside the folders
    in ``inputs`` (inside them only a file ending in ``suffix``, e.g. a report among the runs it reads)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {printable(path)} is a folder; give a file name inside it")
    check_regular(path, what)
    if suffix is None or path.suffix.lower() != suffix:
        _check_not_inside(path, inputs, what, "a file" if suffix is None else f"a {suffix} file there, or a file")
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
