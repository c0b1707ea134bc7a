"""The run folder: its file names, the run identity, versions, readers and crash-safe writers.

Every file canprobe writes goes through this module. A run folder holds::

    run.json             the identity of the run the folder belongs to (a resume must match it)
    scores.safetensors   importance per site and ``<site>/signed``; the scoring config in the metadata
    ranking.parquet      address, component, site, layer, index, score, rank; the config in the metadata
    curve.jsonl          one line per evaluated (control, k), appended as each point finishes
    summary.json         k*, stage 1, baseline, criterion, config, versions, seed
    controls.json        a study's controls at k* (activation-only ranking, mean ablation)
    faults/, protection.json   a study's robustness: k* per fault model; random faults per protection
    activations.json     a study's massive activations (``canprobe.massive``)
    neurons.parquet, neurons.json   the top neurons per position, patch and image (``canprobe.neurons``)
    report.html          figures and tables drawn from the files above
    captions.jsonl       ``canprobe caption``: one record per image

Long runs (scoring, the k* search) must be resumable after ``kill -9`` or a power cut. Whole files
are written to a temporary file in the same folder, fsynced, then renamed over the target, so a
reader sees the old file or the new one, never half of one. Logs of results are JSON lines appended
one at a time with flush + fsync; a kill can tear only the last line, and the reader drops it.
An output folder is held by one live process at a time through a lock file (``RunLock``): two runs
appending to the same ``curve.jsonl`` would interleave their points.

Every artifact records the format that wrote it (``FORMAT``, under ``"format"``: ``stamped``
records of run.json, summary.json, controls.json, protection.json, activations.json, neurons.json,
each line of curve.jsonl and captions.jsonl, and the metadata of the scores, ranking and neurons
files); files of canprobe 0.1 have none and read as format 1. Readers accept every earlier format:
a field added by a later format reads as missing, not as damage. A file of a newer format is
refused with a line that says to upgrade.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from canprobe.checks import check_output_dir, check_regular, printable
from canprobe.errors import CanprobeError, InputError
from canprobe.identity import differences

log = logging.getLogger(__name__)

LOCK_FILE = ".canprobe.lock"
RUN_FILE = "run.json"
SCORES_FILE = "scores.safetensors"
RANKING_FILE = "ranking.parquet"
CURVE_FILE = "curve.jsonl"
SUMMARY_FILE = "summary.json"
CONTROLS_FILE = "controls.json"
REPORT_FILE = "report.html"
CAPTIONS_FILE = "captions.jsonl"
FAULTS_DIR = "faults"  # a study's k* searches per fault model, one folder per (fault, ranking)
PROTECTION_FILE = "protection.json"  # a study's collapse rates under random faults, per protection
ACTIVATIONS_FILE = "activations.json"  # a study's massive activations of the language model
NEURONS_FILE = "neurons.parquet"  # the top neurons' activations per image and position (canprobe.neurons)
NEURON_STATS_FILE = "neurons.json"  # their statistics, the images and the scopes they come from
NEURONS_PAGE = "neurons.html"  # the neuron view of a search folder (a run's is a section of its report)
FORMAT = 2  # the artifact format this release writes; 1: canprobe 0.1, which recorded none
FORMAT_KEY = "format"
RANKING_COLUMNS = ("address", "component", "site", "layer", "index", "score", "rank")
PAIR_KEY = "canprobe_pair"  # metadata key: the id of the write that made a scores/ranking pair
ARTIFACT_FILES = (  # what canprobe writes atomically (see ``remove_stray_temporaries``)
    RUN_FILE,
    SCORES_FILE,
    RANKING_FILE,
    CURVE_FILE,
    SUMMARY_FILE,
    CONTROLS_FILE,
    REPORT_FILE,
    CAPTIONS_FILE,
    PROTECTION_FILE,
    ACTIVATIONS_FILE,
    NEURONS_FILE,
    NEURON_STATS_FILE,
    NEURONS_PAGE,
)


def check_run_folder(path: str | os.PathLike, what: str = "--out", inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """An output folder canprobe can write its files into (``checks.check_output_dir``), before any work."""
    return check_output_dir(path, what, inputs, ARTIFACT_FILES)


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
    atomic_write_files({path: data})


def atomic_write_files(files: Mapping[str | os.PathLike, bytes]) -> None:
    """Write several files so that each is old or new, never partial, and no target is replaced before
    every new content is on disk: a pair (scores and ranking) whose second file cannot be written keeps
    its first file too.

    A symlink is written through (its target gets the new content, the link stays); a target that is
    not a regular file (a device, a pipe, a folder) is refused before anything is written.
    """
    targets = {Path(os.path.realpath(path)): data for path, data in files.items()}
    for path in targets:
        check_regular(path, "output")
    staged: list[tuple[str, Path]] = []
    replaced: list[Path] = []
    current = next(iter(targets))
    try:
        for current, data in targets.items():
            current.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{current.name}.", suffix=".tmp", dir=current.parent)
            staged.append((tmp, current))
            os.fchmod(fd, _file_mode(current))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, current in staged:
            os.replace(tmp, current)
            replaced.append(current)
    except OSError as exc:
        done = ", ".join(printable(p) for p in replaced) or "nothing"
        raise StoreError(f"cannot write {printable(current)} ({exc.strerror or exc}); replaced: {done}") from None
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
    for folder in {path.parent for path in targets}:
        _fsync_dir(folder)


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


def stamped(obj: Any) -> Any:
    """An artifact's record with the format that writes it, first."""
    return {FORMAT_KEY: FORMAT, **obj}


def check_format(version: Any, where: object) -> int:
    """The format an artifact was written in (1 when it records none); a newer one is refused."""
    version = 1 if version is None else version
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT:
        raise StoreError(
            f"{where} was written in artifact format {version!r} by a newer canprobe (this one reads formats "
            f"up to {FORMAT}); upgrade canprobe to read it"
        )
    return version


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
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is not valid JSON ({exc}); the file is damaged, move it away") from None
    except OSError as exc:
        raise StoreError(f"{path} cannot be read ({exc.strerror or exc})") from None
    return data


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON object as one line and force it to disk before returning."""
    path = Path(path)
    check_regular(path, "output")
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


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """A whole JSON-lines file, one record a line, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def resolve_file(path: str | os.PathLike, name: str) -> Path:
    """``path`` itself, or the file ``name`` in the folder ``path``; it must exist."""
    path = Path(path)
    path = path / name if path.is_dir() else path
    if not path.exists():
        raise InputError(f"{path} does not exist; write it with `canprobe score --out DIR`")
    return path


def versions() -> dict[str, str]:
    """The package versions that decide a run's numbers, recorded in every summary."""
    import torch
    import transformers

    import canprobe

    return {"canprobe": canprobe.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_scores(
    folder: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, Any], ranking: Any = None
) -> str:
    """``scores.safetensors`` in ``folder``: the tensors, and each metadata value as JSON; with ``ranking``
    (a DataFrame) also ``ranking.parquet``, the two written together (``atomic_write_files``).

    Returns the file's pair id (a digest of its content, kept in the metadata under ``PAIR_KEY``),
    which the ranking written with it carries too (``write_ranking``): files of different writes
    (a crash between the two renames) have ids that differ.
    """
    import hashlib

    from safetensors.torch import save

    meta = {k: json.dumps(v) for k, v in stamped(dict(metadata)).items()}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(tensors[name].numpy().tobytes())
    pair = digest.hexdigest()[:16]  # same content, same id (and same bytes on disk)
    files = {Path(folder) / SCORES_FILE: save(dict(tensors), metadata={**meta, PAIR_KEY: pair})}
    if ranking is not None:
        files[Path(folder) / RANKING_FILE] = _ranking_bytes(ranking, metadata.get("config", {}), pair)
    atomic_write_files(files)
    return pair


def scores_pair(file: Path) -> str | None:
    """The pair id in a scores file's header (cheap: the tensors are not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get(PAIR_KEY)
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{printable(file)} is not a readable canprobe scores file ({_first_line(exc)})") from None


def read_scores(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, metadata) of ``scores.safetensors`` (the file or its folder); the pair id under ``PAIR_KEY``.

    Damaged and foreign files raise InputError naming the file.
    """
    from safetensors import SafetensorError, safe_open

    file = resolve_file(path, SCORES_FILE)
    where = printable(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            raw = f.metadata() or {}
            if "sites" not in raw:
                raise InputError(f"{where} is not a canprobe scores file (no site metadata)")
            meta = {k: v if k == PAIR_KEY else json.loads(v) for k, v in raw.items()}
            check_format(meta.get(FORMAT_KEY), where)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise InputError(f"{where} is not a readable canprobe scores file ({_first_line(exc)})") from None
    return tensors, meta


def write_ranking(folder: str | os.PathLike, ranking: Any, config: Mapping[str, Any], pair: str) -> None:
    """``ranking.parquet`` in ``folder``: the scoring config and the pair id of its scores in the schema metadata."""
    atomic_write_bytes(Path(folder) / RANKING_FILE, _ranking_bytes(ranking, config, pair))


def _ranking_bytes(ranking: Any, config: Mapping[str, Any], pair: str) -> bytes:
    frame = ranking.copy()
    frame.attrs = {}
    return parquet_bytes(frame, {"canprobe": json.dumps(config), PAIR_KEY: pair})


def parquet_bytes(frame: Any, metadata: Mapping[str, str] = {}) -> bytes:
    """A DataFrame as parquet, its schema metadata stamped with the format (``FORMAT_KEY``) and ``metadata``."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    extra = {k.encode(): v.encode() for k, v in {**metadata, FORMAT_KEY: str(FORMAT)}.items()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def parquet_format(metadata: Mapping[bytes, bytes] | None, where: object) -> int:
    """The format recorded in a parquet file's schema metadata (``check_format``: none is 1, newer is refused)."""
    raw = (metadata or {}).get(FORMAT_KEY.encode(), b"null")
    try:
        version = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        version = raw  # refused by check_format, naming it
    return check_format(version, where)


def read_ranking(path: str | os.PathLike, check_pair: bool = True):
    """``ranking.parquet`` (the file or its folder) as a DataFrame, checked to be a canprobe ranking.

    The scoring config is in ``df.attrs["config"]``, the file in ``df.attrs["path"]`` and its pair
    id in ``df.attrs["pair"]``. Damaged, empty and foreign files raise InputError naming the file;
    every address must parse; with ``check_pair``, a scores.safetensors beside it must come from
    the same write.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from canprobe.sites import is_address

    file = resolve_file(path, RANKING_FILE)
    where = printable(file)
    try:
        table = pq.read_table(file)
        frame = table.to_pandas()
    except (pa.ArrowException, OSError, ValueError) as exc:
        why = _first_line(exc)
        raise InputError(f"{where} is not a readable parquet file ({why}); write it with `canprobe score`") from None
    missing = [c for c in RANKING_COLUMNS if c not in frame.columns]
    metadata = table.schema.metadata or {}
    raw = metadata.get(b"canprobe")
    if missing or raw is None:
        what = f"missing columns {', '.join(missing)}" if missing else "no canprobe metadata"
        raise InputError(f"{where} is not a canprobe ranking ({what}); write one with `canprobe score`")
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{where}: its canprobe metadata is not valid JSON; the file is damaged") from None
    parquet_format(metadata, where)
    if frame.empty:
        raise InputError(f"{where} holds no neuron; rewrite it with `canprobe score`")
    addresses = frame["address"]
    bad = ~addresses.map(is_address).astype(bool)
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise InputError(
            f"{where}: row {row + 1} holds {addresses.iloc[row]!r}, not a neuron address "
            f"({int(bad.sum())} such row(s)); the file is damaged, rewrite it with `canprobe score`"
        )
    if addresses.duplicated().any():
        twice = addresses[addresses.duplicated()].iloc[0]
        raise InputError(f"{where}: neuron {twice} is ranked twice; the file is damaged")
    check_finite_scores(frame, where)
    frame.attrs["config"] = config if isinstance(config, dict) else {}
    frame.attrs["path"] = where
    frame.attrs["pair"] = (metadata.get(PAIR_KEY.encode()) or b"").decode() or None
    scores_file = file.with_name(SCORES_FILE)
    if check_pair and scores_file.exists() and scores_pair(scores_file) != frame.attrs["pair"]:
        raise InputError(
            f"{where} and the {SCORES_FILE} beside it come from different writes (an interrupted `canprobe score`?); "
            "rerun canprobe score"
        )
    return frame


def check_finite_scores(frame: Any, where: str) -> None:
    """A ranking whose scores hold NaN has no order to trust (a scoring pass that overflowed, e.g. in
    float16): it is refused where it would be used, with the count and an example."""
    if "score" not in frame.columns:
        return
    nan = frame["score"].isna()
    if nan.any():
        raise InputError(
            f"{where}: {int(nan.sum())} of {len(frame)} neuron(s) have NaN scores, e.g. "
            f"{frame['address'][nan].iloc[0]}; the scoring overflowed or the model gave NaN (try --dtype float32 "
            "and rescore)"
        )


def has_ranking(folder: str | os.PathLike) -> bool:
    return (Path(folder) / RANKING_FILE).exists()


def read_summary(folder: str | os.PathLike) -> dict:
    """A finished run's or search's ``summary.json``."""
    data = read_json(Path(folder) / SUMMARY_FILE)
    if data is None:
        raise InputError(f"{folder} is not a finished canprobe run or search (no {SUMMARY_FILE})")
    if not isinstance(data, dict):
        raise InputError(f"{Path(folder) / SUMMARY_FILE} is not a canprobe summary (damaged or foreign)")
    check_format(data.get(FORMAT_KEY), Path(folder) / SUMMARY_FILE)
    return data


def claim(
    folder: str | os.PathLike,
    identity: Mapping[str, Any],
    results: Iterable[str],
    restart: bool | None = None,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Check that ``folder`` is new or holds this identity's run, then record the identity in run.json.

    ``settings`` (``canprobe.config.SETTINGS``) says which fields of the identity's ``config`` are
    part of it (``canprobe.identity.differences``).

    ``identity`` is everything that decides the folder's results; ``results`` are the entries that
    show a run was made there (a folder holding one of them without run.json is someone else's).
    A folder of another identity raises InputError naming the fields that differ; with
    ``restart=True`` its contents are moved to a sibling ``<folder>.replaced-*`` instead.
    ``restart=None``: the caller offers no restart.
    """
    folder = Path(folder)
    previous = read_json(folder / RUN_FILE)
    unlabelled = previous is None and any((folder / name).exists() for name in results)
    if unlabelled:
        changed = [f"it has no {RUN_FILE}"]
    elif previous is None:
        changed = []
    elif not isinstance(previous, dict):
        changed = [f"its {RUN_FILE} is not a run's identity (damaged or foreign)"]
    else:
        changed = differences(previous, identity, settings)
    if changed:
        if not restart:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            how = "" if restart is None else ", or --restart to start over"
            raise InputError(
                f"{folder} holds a run of another config ({'; '.join(changed[:3])}{more}); use the same config "
                f"to resume or another output folder{how}"
            )
        aside = Path(tempfile.mkdtemp(prefix=f"{folder.name}.replaced-", dir=folder.parent))
        for entry in folder.iterdir():
            if entry.name != LOCK_FILE:
                shutil.move(entry, aside / entry.name)
        log.warning("%s: moved the previous run (another config) to %s", folder, aside)
    if previous is None or changed:
        atomic_write_json(folder / RUN_FILE, stamped(identity))


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
        self.created = False
        self._me = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> RunLock:
        self.created = not self.path.parent.exists()  # a folder made only to hold the lock goes again on exit
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
            if self.created and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # the work failed before writing anything: no empty folder left
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
