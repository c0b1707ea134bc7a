"""Data parallelism: 2 processes under torchrun (gloo, CPU) give what 1 process gives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from canprobe.distributed import World, all_reduce_sum, broadcast, gather


def test_shards_are_contiguous_and_cover_every_item_once():
    for n in (0, 1, 5, 12):
        for size in (1, 2, 3, 5):
            blocks = [list(World(r, size).shard(n)) for r in range(size)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
            items = [f"image{i}" for i in range(n)]
            assert [x for r in range(size) for x in World(r, size).take(items)] == items
    assert World(1, 2).take(None) is None


def test_without_a_process_group_the_collectives_are_identities():
    t = torch.arange(3.0)
    assert all_reduce_sum(t) is t
    assert gather([1, 2]) == [1, 2]
    assert broadcast({"a": 1}) == {"a": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _canprobe(*args, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "canprobe.cli", *map(str, args)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={processes}",
            "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}",
            "-m",
            "canprobe.cli",
            *map(str, args),
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """toy-llava CAN scores of 10 scenes (5 per process), from 1 process and from 2."""
    from canprobe.organisms.scenes import write_scenes

    root = tmp_path_factory.mktemp("dist")
    images = write_scenes(root / "scenes", per_category=2, seed=5)
    (root / "scenes" / "flower").rename(root / "flower-aside")  # 5 categories x 2: 5 images per process
    common = ["score", "--model", "toy-llava", "--images", images, "--scope", "language", "--batch-size", "3"]
    one = _canprobe(*common, "--out", root / "one")
    two = _canprobe(*common, "--out", root / "two", processes=2)
    return root, images, one, two


def test_two_processes_score_like_one(scored):
    root, _, one, two = scored
    a, b = load_file(root / "one" / "scores.safetensors"), load_file(root / "two" / "scores.safetensors")
    assert a.keys() == b.keys() and len(a) == 4 * 4 * 2  # 4 site kinds x 4 layers, scores and signed
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-8)
    assert "1 process(es)" in one.stdout and "2 process(es)" in two.stdout
    assert two.stdout.count("scored ") == 1  # only rank 0 prints


def test_two_processes_search_to_the_same_k_star(scored):
    root, images, _, _ = scored
    common = [
        "search", "--model", "toy-llava", "--images", images, "--ranking", root / "one",
        "--collapse-clip-ratio", "0.7", "--grid-per-octave", "0", "--max-new-tokens", "16",
        "--control", "random", "--control-at", "k_star",
    ]  # fmt: skip
    _canprobe(*common, "--out", root / "search-one")
    _canprobe(*common, "--out", root / "search-two", processes=2)
    one = json.loads((root / "search-one" / "summary.json").read_text())
    two = json.loads((root / "search-two" / "summary.json").read_text())
    assert one["k_star"] is not None and two["k_star"] == one["k_star"]
    assert two["stage1_k"] == one["stage1_k"] and two["n_images"] == one["n_images"] == 10

    def curve(folder):
        lines = (root / folder / "curve.jsonl").read_text().splitlines()
        return {(p["control"], p["k"]): p for p in map(json.loads, lines)}

    c1, c2 = curve("search-one"), curve("search-two")
    assert c1.keys() == c2.keys()  # every point once: rank 1 wrote nothing
    for key, p in c1.items():
        assert c2[key]["stage"] == p["stage"] and c2[key]["n_images"] == 10
        assert c2[key]["clip_mean"] == pytest.approx(p["clip_mean"], rel=1e-4)
        assert c2[key]["exact_match"] == p["exact_match"]


CAPTIONS = ["a small red car", "a big blue boat", "a tree", "a green fish", "a white flower"]


def _mean_worker(rank: int, port: int, out: str) -> None:
    """One rank of a Python-API script: it joins and leaves the group the way canprobe's commands do."""
    from canprobe.ablation import mean_activations
    from canprobe.config import Generation
    from canprobe.distributed import Ending, init_from_env
    from canprobe.models import load_model
    from canprobe.organisms.scenes import make_scenes

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    ending = Ending.start()
    init_from_env()
    images = [image for image, _ in make_scenes(5, seed=3)]
    lm = load_model("toy-llava")
    rows = []
    lm.model.register_forward_pre_hook(lambda _m, _a, kw: rows.append(len(kw["input_ids"])), with_kwargs=True)
    means = mean_activations(lm, images, "language.down_proj", captions=CAPTIONS, generation=Generation(batch_size=2))
    torch.save({"means": means, "rows": sum(rows)}, f"{out}/rank{rank}.pt")
    ending.succeed()


def test_mean_activations_are_sharded_and_all_reduced(tmp_path):
    """Each process reads half the images; both end with the means over all of them."""
    from canprobe.ablation import mean_activations
    from canprobe.models import load_model
    from canprobe.organisms.scenes import make_scenes

    torch.multiprocessing.spawn(_mean_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    images = [image for image, _ in make_scenes(5, seed=3)]
    alone = mean_activations(load_model("toy-llava"), images, "language.down_proj", captions=CAPTIONS)
    for rank, rows in ((0, 2), (1, 3)):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        means = saved["means"]
        assert saved["rows"] == rows and means.keys() == alone.keys()
        for name, value in alone.items():
            torch.testing.assert_close(means[name], value, rtol=1e-5, atol=1e-7)


def _launch_ranks(argv_of_rank, port: int, timeout: float = 90) -> list[tuple[int, str, float]]:
    """Start the ranks the way torchrun does (RANK, WORLD_SIZE, MASTER_*), each with its own command line.

    Per-rank command lines stand for what differs between machines (a node-local path, say).
    Returns each rank's (exit code, stdout + stderr, seconds to end).
    """
    import time

    procs, start = [], time.monotonic()
    for rank, argv in enumerate(argv_of_rank):
        env = {
            **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(len(argv_of_rank)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        }  # fmt: skip
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    ended = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        ended.append((proc.returncode, out, time.monotonic() - start))
    return ended


def test_a_bad_input_on_one_rank_ends_every_rank_with_its_one_line(scored):
    """Rank 1 cannot read its ranking while rank 0 goes on into the search's collectives: both end with exit 2."""
    root, images, _, _ = scored
    search = [sys.executable, "-m", "canprobe.cli", "search", "--model", "toy-llava", "--images", str(images)]
    search += ["--max-new-tokens", "8", "--grid-per-octave", "0"]
    ranks = [
        [*search, "--ranking", str(root / "one"), "--out", str(root / "bad-rank-0")],
        [*search, "--ranking", str(root / "no-such-ranking"), "--out", str(root / "bad-rank-1")],
    ]
    ended = _launch_ranks(ranks, _free_port())
    assert [code for code, _, _ in ended] == [2, 2], [out[-2000:] for _, out, _ in ended]
    assert max(seconds for _, _, seconds in ended) < 60
    lines = [line for _, out, _ in ended for line in out.splitlines() if not line.startswith("ignored ")]
    assert lines == [
        f"canprobe: error: {root / 'no-such-ranking'} does not exist; write it with `canprobe score --out DIR`"
    ]
    assert not (root / "bad-rank-0" / "summary.json").exists()


def test_a_rank_failing_before_it_joins_the_group_ends_the_others_too(scored):
    """Rank 1's --out is a file, refused before it joins; rank 0, waiting for it to join, ends with its line."""
    root, images, _, _ = scored
    (root / "a-file").write_text("")
    score = [sys.executable, "-m", "canprobe.cli", "score", "--model", "toy-llava", "--images", str(images)]
    ended = _launch_ranks(
        [[*score, "--out", str(root / "early-0")], [*score, "--out", str(root / "a-file")]], _free_port()
    )
    assert [code for code, _, _ in ended] == [2, 2]
    lines = [line for _, out, _ in ended for line in out.splitlines() if not line.startswith("ignored ")]
    assert lines == [f"canprobe: error: --out {root / 'a-file'} is a file; give a folder (new or existing)"]


TEARDOWN = """
import os, sys, torch
from canprobe.distributed import Ending, all_reduce_sum, init_from_env
ending = Ending.start()
init_from_env()
import transformers.modeling_utils  # imports torch.distributed.fsdp after the group exists, as loading a model does
total = all_reduce_sum(torch.ones(2))
ending.succeed()
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(int(total[0]), sorted(t for t in threads if "gloo" in t))
"""


def test_each_rank_tears_its_group_down_before_interpreter_shutdown():
    """No gloo thread outlives the command: left to interpreter shutdown, one can abort a finished rank."""
    ended = _launch_ranks([[sys.executable, "-c", TEARDOWN]] * 2, _free_port())
    assert [(code, out.strip().splitlines()[-1]) for code, out, _ in ended] == [(0, "2 []")] * 2
