"""Crash-safe storage: atomic whole files, fsynced JSON lines, torn last lines dropped."""

import json
import logging
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canprobe.errors import InputError
from canprobe.runfolder import (
    RANKING_FILE,
    SCORES_FILE,
    StoreError,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
)


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
    with pytest.raises(StoreError, match="cannot write .*a.txt .disk full.; replaced: nothing"):
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
    from canprobe.runfolder import FORMAT, RUN_FILE, claim

    folder = tmp_path / "run"
    claim(folder, {"seed": 1, "scope": "language"}, results=("curve.jsonl",))
    assert json.loads((folder / RUN_FILE).read_text()) == {"format": FORMAT, "seed": 1, "scope": "language"}
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


# --- outputs never destroy anything: regular files or new paths, symlinks written through ---


def test_a_symlink_is_written_through_and_stays_a_link(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write_json(link, {"new": 1})
    assert link.is_symlink() and json.loads(target.read_text()) == {"new": 1}
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "sub" / "later.json")  # a link to a new path creates its target
    atomic_write_text(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "sub" / "later.json").read_text() == "made"


@pytest.mark.parametrize("kind", ["fifo", "folder", "link to a fifo", "char device"])
def test_a_target_that_is_not_a_regular_file_is_refused_untouched(tmp_path, kind):
    path = tmp_path / "out.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "link to a fifo":
        os.mkfifo(tmp_path / "pipe")
        path.symlink_to(tmp_path / "pipe")
    else:
        path = "/dev/null"
    before = os.stat(path).st_mode
    with pytest.raises(InputError, match="canprobe writes only regular files"):
        atomic_write_json(path, {"k": 1})
    with pytest.raises(InputError, match="canprobe writes only regular files"):
        append_jsonl(path, {"k": 1})
    assert os.stat(path).st_mode == before


def test_a_pair_whose_second_file_cannot_be_written_keeps_the_first(tmp_path):
    """scores.safetensors and ranking.parquet: both contents are staged before either replaces its file."""
    from canprobe.scoring import load_folder_ranking

    result = _scores(tmp_path, seed=0)
    result.save(tmp_path)
    before = (tmp_path / SCORES_FILE).read_bytes()
    (tmp_path / RANKING_FILE).unlink()
    (tmp_path / RANKING_FILE).mkdir()  # the issue's unwritable ranking: here a folder of that name
    with pytest.raises(InputError, match="ranking.parquet is a folder"):
        _scores(tmp_path, seed=1).save(tmp_path)
    assert (tmp_path / SCORES_FILE).read_bytes() == before
    (tmp_path / RANKING_FILE).rmdir()
    again = _scores(tmp_path, seed=1)
    again.save(tmp_path)  # once the way is clear, the pair is written and reads back consistent
    expected = sorted(again.scores[again.sites[0].name].tolist(), reverse=True)
    assert load_folder_ranking(tmp_path)["score"].tolist() == pytest.approx(expected)


def _scores(folder, seed):
    import torch

    from canprobe.scoring.result import ScoreResult
    from canprobe.sites import Site

    site = Site("language", 0, "down_proj", "m.layers.0.mlp.down_proj", "output", "m.layers.0.mlp.down_proj", "out", 5)
    values = torch.rand(5, generator=torch.Generator().manual_seed(seed))
    return ScoreResult({site.name: values}, {site.name: -values}, [site], {"seed": seed})
