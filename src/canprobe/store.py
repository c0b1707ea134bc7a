"""Crash-safe files: whole files appear atomically, JSON lines survive a kill mid-write.

Long runs (scoring, the k* search) must be resumable after ``kill -9`` or a power cut. Whole files
are written to a temporary file in the same folder, fsynced, then renamed over the target, so a
reader sees the old file or the new one, never half of one. Logs of results are JSON lines appended
one at a time with flush + fsync; a kill can tear only the last line, and the reader drops it.
An output folder is held by one live process at a time through a lock file (``RunLock``): two runs
appending to the same ``curve.jsonl`` would interleave their points.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from canprobe.errors import CanprobeError

log = logging.getLogger(__name__)


LOCK_FILE = ".canprobe.lock"
ARTIFACT_FILES = (
    "run.json",
    "scores.safetensors",
    "ranking.parquet",
    "curve.jsonl",
    "summary.json",
    "controls.json",
    "report.html",
    "captions.jsonl",
)


class StoreError(CanprobeError):
    """A results file that is damaged beyond a torn last line."""


class RunLockedError(CanprobeError):
    """An output folder that another live process is writing to."""


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
        os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _file_mode(path: Path) -> int:
    """The mode the file would have if opened normally: mkstemp's 0600 would hide reports from other users."""
    try:
        return path.stat().st_mode & 0o777  # replacing a file keeps its permissions
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """JSON with a trailing newline; non-finite floats are written as Infinity/NaN (Python's reading)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content, or None when it is absent; a damaged file raises StoreError naming it.

    canprobe writes its JSON files atomically, so a file that does not parse was damaged or
    replaced by something else: it is never silently treated as missing.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is not valid JSON ({exc}); the file is damaged, move it away") from None
    except OSError as exc:
        raise StoreError(f"{path} cannot be read ({exc.strerror or exc})") from None


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


def remove_stray_temporaries(folder: Path) -> None:
    """Delete the temporary files that killed atomic writes of canprobe's files left in ``folder`` and below.

    Called by the process that holds the folder, so no live write of another process owns them.
    Only ``.<canprobe file name>.*.tmp`` is touched: the lock's own temporaries (another process may
    be about to link one) and other programs' files are left alone.
    """
    for tmp in folder.rglob(".*.tmp"):
        if tmp.is_file() and any(tmp.name.startswith(f".{name}.") for name in ARTIFACT_FILES):
            log.warning("removing %s, left by an interrupted write", tmp)
            tmp.unlink(missing_ok=True)


class RunLock:
    """Hold an output folder for this process: ``with RunLock(out): ...``.

    The lock file holds the holder's pid and host. It is created with ``os.link`` of a complete
    temporary file, so it never exists half-written and only one process can create it. A lock
    whose pid is dead on this host (a run killed with SIGKILL leaves one) is taken over with a
    warning; a live holder makes ``__enter__`` raise RunLockedError. Re-entering in the process that
    holds it is allowed (the CLI holds the folder while the library's search takes it again), and
    only the outermost holder removes the file, on exit or exception.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self.owned = False
        self._me = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_FILE}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._me, f)
                f.flush()
                os.fsync(f.fileno())
            while not self._take(tmp):
                pass
        finally:
            Path(tmp).unlink(missing_ok=True)
        remove_stray_temporaries(self.path.parent)
        return self

    def _take(self, tmp: str) -> bool:
        """One attempt: True when this process holds the lock; False to retry (the file changed meanwhile)."""
        try:
            os.link(tmp, self.path)
            self.owned = True
            return True
        except FileExistsError:
            pass
        raw = _read_or_none(self.path)
        if raw is None:
            return False  # released between link and read
        holder = _parse_holder(raw)
        if holder == self._me:
            return True  # nested use in the holding process
        if holder is not None and (holder["host"] != self._me["host"] or _pid_alive(holder["pid"])):
            raise RunLockedError(
                f"{self.path.parent} is in use by another canprobe run (pid {holder['pid']} on {holder['host']}); "
                f"wait for it or use another output folder (delete {self.path} if no such run exists)"
            )
        what = "unreadable lock" if holder is None else f"lock of dead process {holder['pid']}"
        log.warning("%s: taking over the %s", self.path.parent, what)
        if _read_or_none(self.path) == raw:  # still the stale file (another taker may have replaced it)
            self.path.unlink(missing_ok=True)
        return False

    def __exit__(self, *exc_info: object) -> None:
        if self.owned and _parse_holder(_read_or_none(self.path) or b"") == self._me:
            self.path.unlink(missing_ok=True)
        self.owned = False


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _parse_holder(raw: bytes) -> dict | None:
    try:
        holder = json.loads(raw)
        return {"pid": int(holder["pid"]), "host": str(holder["host"])}
    except (ValueError, KeyError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (signal 0 checks without signalling)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True
