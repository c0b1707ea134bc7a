"""Crash-safe files: whole files appear atomically, JSON lines survive a kill mid-write.

Long runs (scoring, the k* search) must be resumable after ``kill -9`` or a power cut. Whole files
are written to a temporary file in the same folder, fsynced, then renamed over the target, so a
reader sees the old file or the new one, never half of one. Logs of results are JSON lines appended
one at a time with flush + fsync; a kill can tear only the last line, and the reader drops it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from canprobe.errors import CanprobeError

log = logging.getLogger(__name__)


class StoreError(CanprobeError):
    """A results file that is damaged beyond a torn last line."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the folder entry (POSIX only; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """JSON with a trailing newline; non-finite floats are written as Infinity/NaN (Python's reading)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON object as one line and force it to disk before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(obj, separators=(",", ":"))
    if "\n" in line:
        raise ValueError("a JSON line must not contain a newline")
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[Any]:
    """All records of a JSON-lines file; a missing file reads as empty.

    An unterminated last line that does not parse is what a kill during ``append_jsonl`` leaves: it
    is dropped with a warning (and with ``repair=True`` cut from the file, so later appends start on
    a clean line). A bad newline-terminated line means other damage and raises StoreError.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail is b"" when the file ends with a newline
    records = []
    for n, raw in enumerate(complete, 1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path}:{n} is not valid JSON ({exc}); the file is damaged, move it away") from None
    if tail.strip():
        try:
            records.append(json.loads(tail))
            if repair:
                with open(path, "ab") as f:
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.warning("%s: dropping torn last line %d (%s)", path, len(lines), exc)
            if repair:
                _truncate(path, len(data) - len(tail))
    return records


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())
