"""Crash-safe storage: atomic whole files, fsynced JSON lines, torn last lines dropped."""

import json
import logging
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canprobe.runfolder import StoreError, append_jsonl, atomic_write_json, atomic_write_text, read_jsonl


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    atomic_write_json(path, {"k_star": 5, "ppl": float("inf")})
    atomic_write_json(path, {"k_star": 7})
    assert json.loads(path.read_text()) == {"k_star": 7}
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_jsonl_round_trip_keeps_non_finite_floats(tmp_path):
    path = tmp_path / "curve.jsonl"
    assert read_jsonl(path) == []
    rows = [{"k": 0, "ppl": 1.5}, {"k": 1, "ppl": float("inf")}, {"k": 2, "caption": "a\nb"}]
    for r in rows:
        append_jsonl(path, r)
    assert path.read_text().count("\n") == 3
    back = read_jsonl(path)
    assert back[1]["ppl"] == float("inf") and back[2]["caption"] == "a\nb"
    assert back[0] == rows[0]


def test_torn_last_line_is_dropped_and_repaired(tmp_path, caplog):
    path = tmp_path / "curve.jsonl"
    append_jsonl(path, {"k": 1})
    append_jsonl(path, {"k": 2})
    with open(path, "ab") as f:
        f.write(b'{"k": 3, "ppl": 12.')
    with caplog.at_level(logging.WARNING):
        assert read_jsonl(path) == [{"k": 1}, {"k": 2}]
    assert "torn last line 3" in caplog.text
    assert path.read_bytes().endswith(b"12.")  # reading alone does not modify the file
    assert read_jsonl(path, repair=True) == [{"k": 1}, {"k": 2}]
    append_jsonl(path, {"k": 3})
    assert read_jsonl(path) == [{"k": 1}, {"k": 2}, {"k": 3}]


def test_complete_unterminated_last_line_is_kept(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"k": 1}\n{"k": 2}')
    assert read_jsonl(path, repair=True) == [{"k": 1}, {"k": 2}]
    append_jsonl(path, {"k": 3})
    assert read_jsonl(path) == [{"k": 1}, {"k": 2}, {"k": 3}]


def test_damage_before_the_last_line_raises(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"k": 1}\n{"k": \n{"k": 3}\n')
    with pytest.raises(StoreError, match="c.jsonl:2"):
        read_jsonl(path)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=6), max_size=3), max_size=5),
    cut=st.floats(0, 1),
)
def test_any_truncation_reads_back_a_prefix(tmp_path_factory, rows, cut):
    """A kill at any byte of an append leaves a file whose records are a prefix of what was written."""
    path = tmp_path_factory.mktemp("t") / "c.jsonl"
    path.touch()
    for r in rows:
        append_jsonl(path, r)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    back = read_jsonl(path, repair=True)
    assert back == rows[: len(back)]
    assert len(back) >= path.read_bytes().count(b"\n") and len(back) <= len(rows)
    append_jsonl(path, {"next": 1})
    assert read_jsonl(path) == [*back, {"next": 1}]


def test_claim_records_the_identity_and_refuses_another(tmp_path):
    from canprobe.errors import InputError
    from canprobe.runfolder import RUN_FILE, claim

    folder = tmp_path / "run"
    claim(folder, {"seed": 1, "scope": "language"}, results=("curve.jsonl",))
    assert json.loads((folder / RUN_FILE).read_text()) == {"seed": 1, "scope": "language"}
    claim(folder, {"seed": 1, "scope": "language"}, results=("curve.jsonl",))  # the same run resumes
    refusal = r"another config \(seed \(was 1, now 2\)\); use the same config to resume or another output folder$"
    with pytest.raises(InputError, match=refusal):
        claim(folder, {"seed": 2, "scope": "language"}, results=("curve.jsonl",))
    (folder / RUN_FILE).write_text("[1, 2]\n")
    with pytest.raises(InputError, match=r"its run.json is not a run's identity \(damaged or foreign\)"):
        claim(folder, {"seed": 1, "scope": "language"}, results=("curve.jsonl",))
    (folder / RUN_FILE).unlink()
    (folder / "curve.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match="it has no run.json.*--restart"):
        claim(folder, {"seed": 1, "scope": "language"}, results=("curve.jsonl",), restart=False)
    claim(folder, {"seed": 2, "scope": "language"}, results=("curve.jsonl",), restart=True)
    assert sorted(p.name for p in folder.iterdir()) == [RUN_FILE]
    (aside,) = tmp_path.glob("run.replaced-*")
    assert (aside / "curve.jsonl").read_text() == "{}\n"
