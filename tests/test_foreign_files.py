"""Foreign files and bad paths: one line on stderr and exit code 2, nothing already written changed.

Every artifact canprobe reads is corrupted several ways (truncated, empty, random bytes, another
kind of file, valid but foreign) and given to each command that reads it. The cheapest command
path that reaches each check is used: most checks run before any model loads, and the tests
assert that they do.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from canprobe.config import Scoring
from canprobe.data import load_image_set

NOT_WRITABLE = Path("/proc/canprobe-cannot-write-here/out")  # even root cannot create files under /proc
NOISE = np.random.default_rng(0).bytes(4096)


def refused(result, *needles) -> None:
    """Exit 2, exactly one line on stderr that names what is wrong, no traceback."""
    assert result.code == 2, (result.code, result.out, result.err)
    lines = [x for x in result.err.splitlines() if x.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("canprobe: error:"), lines[0]
    assert "Traceback" not in result.err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model loads: the check must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr("canprobe.evaluation.load_model", refuse)  # first: importing it binds models.load_model
    monkeypatch.setattr("canprobe.models.load_model", refuse)


@pytest.fixture
def held(tmp_path):
    """An output folder that already holds a file of the user's: it must come out unchanged."""
    out = tmp_path / "held"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    yield out
    assert snapshot(out) == before


# --- rankings -------------------------------------------------------------------------------


def fake_scores(lm, images, scope: str, seed: int = 0):
    """A ScoreResult with random scores but the identity real scoring would record (no scoring cost)."""
    import torch

    from canprobe.scoring import ScoreResult, score_identity
    from canprobe.sites import SiteRegistry

    sites = SiteRegistry(lm.model).select(scope)
    gen = torch.Generator().manual_seed(seed)
    scores = {s.name: torch.rand(s.size, generator=gen) for s in sites}
    config = {"model": lm.source, **score_identity(lm, images, scope)}
    return ScoreResult(scores, {k: -v for k, v in scores.items()}, sites, config)


@pytest.fixture(scope="module")
def few_images(scene_dir):
    """The images of ``--per-category 1``: what the commands below see."""
    return load_image_set(scene_dir, limit=1).images


@pytest.fixture(scope="module")
def rankings(tmp_path_factory, few_images):
    """Genuine toy-llava rankings, and foreign ones: another model (two ways), another scope, not canprobe's."""
    import pandas as pd

    from canprobe.models import load_model

    root = tmp_path_factory.mktemp("rankings")
    llava, blip = load_model("toy-llava"), load_model("toy-instructblip")
    made = {}
    for name, lm, scope in (
        ("good", llava, "language.down_proj"),
        ("vision", llava, "vision.fc1"),
        ("other_model", blip, "qformer"),
        ("float16", load_model("toy-llava", dtype="float16"), "language.down_proj"),
        ("same_shape_model", blip, "language.down_proj"),  # the addresses exist in toy-llava too
    ):
        fake_scores(lm, few_images, scope).save(root / name)
        made[name] = root / name / "ranking.parquet"
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_parquet(root / "plain.parquet")
    made["plain"] = root / "plain.parquet"
    return made


def _rewrite_ranking(source: Path, path: Path, change) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    df = change(table.to_pandas())
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(table.schema.metadata), path)
    return path


def _garbage_row(df):
    df.loc[3, "address"] = "language.layers.banana:7"
    return df


def _twice(df):
    df.loc[3, "address"] = df.loc[2, "address"]
    return df


def _nan_scores(df):
    df["score"] = np.nan  # what a float16 scoring pass that overflowed writes
    return df


def _one_nan(df):
    df.loc[len(df) - 1, "score"] = np.nan
    return df


def _bad_ranking(kind: str, rankings, folder: Path) -> Path:
    good = rankings["good"].read_bytes()
    path = folder / "ranking.parquet"
    writers = {
        "truncated": lambda: path.write_bytes(good[: len(good) // 2]),
        "empty": lambda: path.write_bytes(b""),
        "random bytes": lambda: path.write_bytes(NOISE),
        "a PNG": lambda: Image.new("RGB", (8, 8)).save(path, format="PNG"),
        "a scores file": lambda: path.write_bytes((rankings["good"].parent / "scores.safetensors").read_bytes()),
        "plain parquet": lambda: path.write_bytes(rankings["plain"].read_bytes()),
        "garbage address": lambda: _rewrite_ranking(rankings["good"], path, _garbage_row),
        "a neuron twice": lambda: _rewrite_ranking(rankings["good"], path, _twice),
        "no rows": lambda: _rewrite_ranking(rankings["good"], path, lambda df: df.iloc[:0]),
        "NaN scores": lambda: _rewrite_ranking(rankings["good"], path, _nan_scores),
        "one NaN score": lambda: _rewrite_ranking(rankings["good"], path, _one_nan),
    }
    writers[kind]()
    return path


RANKING_DAMAGE = [
    "truncated",
    "empty",
    "random bytes",
    "a PNG",
    "a scores file",
    "plain parquet",
    "garbage address",
    "a neuron twice",
    "no rows",
    "NaN scores",
    "one NaN score",
]


@pytest.mark.parametrize("kind", RANKING_DAMAGE)
def test_damaged_ranking_is_refused_by_search_and_ablate(cli, scene_dir, rankings, tmp_path, held, kind, no_model):
    path = _bad_ranking(kind, rankings, tmp_path)
    refused(cli("search", "--model", "toy-llava", "--images", scene_dir, "--ranking", path, "--out", held), path)
    refused(cli("ablate", "--model", "toy-llava", "--images", scene_dir, "--ranking", path, "--top", 2), path)


@pytest.mark.parametrize(
    "kind, needle",
    [("other_model", "another model"), ("same_shape_model", "another model"), ("vision", "no neuron of scope")],
)
def test_ranking_of_another_model_or_scope_is_refused(cli, scene_dir, rankings, held, kind, needle):
    args = ("--model", "toy-llava", "--images", scene_dir, "--per-category", 1, "--ranking", rankings[kind])
    refused(cli("search", *args, "--out", held), rankings[kind], needle)
    refused(cli("ablate", *args, "--top", 2, "--scope", "language.down_proj"), rankings[kind], needle)


@pytest.mark.parametrize(
    "ranking, scored, dtype",
    [("float16", "float16", "float32"), ("good", "float32", "bfloat16")],  # the first is the case
)
def test_a_ranking_of_the_same_model_in_another_dtype_says_so(cli, scene_dir, rankings, ranking, scored, dtype):
    args = ("--model", "toy-llava", "--images", scene_dir, "--per-category", 1, "--ranking", rankings[ranking])
    result = cli("ablate", *args, "--top", 2, "--dtype", dtype)
    refused(result, f"scored in {scored} and this model runs in {dtype}", f"give --dtype {scored}")
    assert "another model" not in result.err


def test_a_ranking_with_nan_scores_in_memory_is_refused_where_it_is_used(rankings):
    from canprobe.errors import InputError
    from canprobe.models import load_model
    from canprobe.scoring import load_ranking
    from canprobe.search import ranked_in_scope
    from canprobe.sites import SiteRegistry

    table = load_ranking(rankings["good"])
    table.loc[5, "score"] = np.nan
    with pytest.raises(InputError, match="1 of .* neuron.s. have NaN scores"):
        ranked_in_scope(SiteRegistry.of(load_model("toy-llava").model), table, "language.down_proj")


def test_damaged_ranking_in_the_search_folder_is_refused(cli, scene_dir, tmp_path, no_model, monkeypatch):
    out = tmp_path / "search"
    out.mkdir()
    (out / "ranking.parquet").write_bytes(b"PAR1 not really")
    before = snapshot(out)
    monkeypatch.setattr("canprobe.models.load", lambda *a, **k: _FakeLm())
    refused(cli("search", "--model", "toy-llava", "--images", scene_dir, "--out", out), out / "ranking.parquet")
    assert snapshot(out) == before


class _FakeLm:
    """Stands in for a loaded model where the check under test comes before any use of it."""

    kind = "clip"
    family = SimpleNamespace(takes_images=False)


# --- output locations -----------------------------------------------------------------------


def _commands(scene_dir: Path, out: Path, run_dir: Path) -> dict[str, list]:
    model = ["--model", "toy-llava", "--images", scene_dir]
    return {
        "scenes": ["scenes", "--out", out],
        "score": ["score", *model, "--out", out],
        "search": ["search", *model, "--out", out],
        "run": ["run", *model, "--out", out],
        "organisms train": ["organisms", "train", "toy-llava", "--out", out, "--steps", 1],
        "demo": ["demo", "--out", out],
        "caption": ["caption", *model, "--out", out],
        "report": ["report", run_dir, "--out", out],
        "compare": ["compare", run_dir, "--out", out],
    }


FOLDER_OUTPUTS = ["scenes", "score", "search", "run", "organisms train", "demo"]
FILE_OUTPUTS = ["caption", "report", "compare"]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """A run folder whose summary.json is valid (report and compare read it)."""
    run = tmp_path_factory.mktemp("fake") / "run"
    _write_summary(run, "toy-llava", k_star=3)
    return run


def _write_summary(run: Path, model: str, k_star: int | None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    result = {"scope": "language.down_proj", "category": "pooled", "path": "scopes/x/pooled"}
    result |= {"k_star": k_star, "stage1_k": 1, "n_neurons": 512, "random_collapsed": None}
    summary = {"model": model, "config": {"images": str(run), "seed": 0}, "results": [result]}
    (run / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("command", FOLDER_OUTPUTS)
def test_output_folder_that_is_a_file(cli, scene_dir, fake_run, tmp_path, command, no_model):
    out = tmp_path / "taken"
    out.write_text("a file of mine")
    refused(cli(*_commands(scene_dir, out, fake_run)[command]), out, "is a file")
    assert out.read_text() == "a file of mine"


@pytest.mark.parametrize("command", FILE_OUTPUTS)
def test_output_file_that_is_a_folder(cli, scene_dir, fake_run, held, command, no_model):
    refused(cli(*_commands(scene_dir, held, fake_run)[command]), held, "is a folder")


@pytest.mark.parametrize("command", FOLDER_OUTPUTS + FILE_OUTPUTS)
def test_output_that_is_not_writable(cli, scene_dir, fake_run, command, no_model):
    refused(cli(*_commands(scene_dir, NOT_WRITABLE, fake_run)[command]), NOT_WRITABLE, "not writable")


def test_output_below_a_file(cli, scene_dir, tmp_path, no_model):
    (tmp_path / "f").write_text("x")
    refused(cli("score", "--model", "toy-llava", "--images", scene_dir, "--out", tmp_path / "f" / "sub"), "is a file")


# --- devices --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["caption", "score", "search", "ablate", "inspect", "organisms train", "run"])
def test_unknown_device_is_refused_up_front(cli, scene_dir, tmp_path, command, no_model):
    model = ["--model", "toy-llava", "--images", scene_dir]
    args = {
        "caption": ["caption", *model],
        "score": ["score", *model],
        "search": ["search", *model, "--out", tmp_path / "s"],
        "ablate": ["ablate", *model, "--neurons", "language.layers.0.mlp.down_proj:1"],
        "inspect": ["inspect", "toy-llava"],
        "organisms train": ["organisms", "train", "toy-llava", "--out", tmp_path / "o"],
        "run": ["run", *model, "--out", tmp_path / "r"],
    }[command]
    refused(cli(*args, "--device", "banana"), "banana")
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_a_gpu_is_refused_and_claims_no_run_folder(cli, scene_dir, tmp_path, monkeypatch, no_model):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    refused(cli("run", "--model", "toy-llava", "--images", scene_dir, "--out", out, "--device", "cuda"), "CUDA")
    refused(cli("score", "--model", "toy-llava", "--images", scene_dir, "--device", "cuda:1"), "CUDA")
    assert not out.exists()


def test_study_failing_validation_does_not_claim_its_folder(cli, scene_dir, tmp_path):
    out = tmp_path / "run"
    result = cli("run", "--model", "toy-llava", "--images", scene_dir, "--out", out, "--scopes", "language.nonsense")
    refused(result, "nonsense")
    assert not (out / "run.json").exists()


# --- run summaries: report and compare ------------------------------------------------------


def _search_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"k_star": 4, "stage1_k": 2, "scope": "language.down_proj"}))
    (folder / "curve.jsonl").write_text("")
    return folder


SUMMARY_DAMAGE = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "random bytes": lambda good: NOISE,
    "a JSON list": lambda good: b"[1, 2, 3]\n",
    "no results": lambda good: json.dumps({"model": "toy-llava", "config": {}}).encode(),
    "wrong types": lambda good: good.replace(b'"n_neurons": 512', b'"n_neurons": "many"'),
    "not UTF-8": lambda good: b"\xff\xfe" + good,
}


@pytest.mark.parametrize("damage", list(SUMMARY_DAMAGE))
def test_damaged_run_summary_is_refused_by_report_and_compare(cli, fake_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    summary = run / "summary.json"
    summary.write_bytes(SUMMARY_DAMAGE[damage](summary.read_bytes()))
    before = snapshot(run)
    refused(cli("report", run), summary)
    refused(cli("compare", fake_run, run, "--out", tmp_path / "c.html"), summary)
    assert snapshot(run) == before
    assert not (tmp_path / "c.html").exists()


def test_report_and_compare_on_a_search_folder(cli, fake_run, tmp_path):
    search = _search_folder(tmp_path / "search")
    before = snapshot(search)
    refused(cli("report", search), "search folder")
    refused(cli("compare", fake_run, search, "--out", tmp_path / "c.html"), "search folder")
    assert snapshot(search) == before


def test_compare_figure_keeps_runs_that_share_a_model(cli, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    labels = []
    real_bar = Axes.bar

    def bar(self, *args, label=None, **kwargs):
        labels.append(label)
        return real_bar(self, *args, label=label, **kwargs)

    monkeypatch.setattr(Axes, "bar", bar)
    for name, k in (("a", 3), ("b", 9)):
        _write_summary(tmp_path / name, "toy-llava", k)
    _write_summary(tmp_path / "c", "toy-instructblip", 40)
    result = cli("compare", tmp_path / "a", tmp_path / "b", tmp_path / "c", "--out", tmp_path / "c.html")
    assert result.code == 0, result.err
    assert sorted(labels) == ["toy-instructblip", "toy-llava (a)", "toy-llava (b)"]


# --- image sets: captions.jsonl, file names, pixel formats -----------------------------------


@pytest.fixture
def images(scene_dir, tmp_path) -> Path:
    root = tmp_path / "images"
    shutil.copytree(scene_dir, root)
    return root


@pytest.fixture
def one_image(scene_dir, tmp_path) -> Path:
    """An image set of one scene: for the checks that need a command to run to its end."""
    root = tmp_path / "one"
    (root / "car").mkdir(parents=True)
    shutil.copy(scene_dir / "car" / "0000.png", root / "car" / "0000.png")
    (root / "captions.jsonl").write_text(json.dumps({"file": "car/0000.png", "caption": "a car"}) + "\n")
    return root


def test_captions_file_that_is_not_utf8(cli, images, no_model):
    (images / "captions.jsonl").write_bytes('{"file": "car/0000.png", "caption": "caf\xe9"}\n'.encode("latin-1"))
    for command in ("caption", "score", "ablate"):
        extra = ["--neurons", "language.layers.0.mlp.down_proj:1"] if command == "ablate" else []
        refused(cli(command, "--model", "toy-llava", "--images", images, *extra), "captions.jsonl", "UTF-8")


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"file": "car/0000.png", "caption": 7}', "string"),
        ('{"file": "car/0000.png"}', "expected"),
        ("not json", "expected"),
        ('{"file": "car/0000.png", "caption": "a"}\n{"file": "car/0000.png", "caption": "b"}', "second"),
    ],
)
def test_bad_caption_lines(cli, images, line, needle, no_model):
    (images / "captions.jsonl").write_text(line + "\n")
    refused(cli("score", "--model", "toy-llava", "--images", images), "captions.jsonl", needle)


def test_null_caption_means_no_caption_and_unknown_files_are_reported(images):
    lines = [json.loads(x) for x in (images / "captions.jsonl").read_text().splitlines()]
    lines[0]["caption"] = None
    lines.append({"file": "car/9999.png", "caption": "a ghost"})
    (images / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    captions = {r.name: r.caption for r in load_image_set(images).records}
    assert captions[lines[0]["file"]] is None  # not the text "None"
    assert captions[lines[1]["file"]] == lines[1]["caption"]
    image_set = load_image_set(images)
    assert image_set.unmatched_captions == ["car/9999.png"]


def test_unknown_caption_files_are_reported_by_the_commands(cli, one_image, tmp_path):
    with (one_image / "captions.jsonl").open("a") as f:
        f.write(json.dumps({"file": "car/9999.png", "caption": "a ghost"}) + "\n")
    out = tmp_path / "c.jsonl"
    result = cli("caption", "--model", "toy-llava", "--images", one_image, "--max-new-tokens", 2, "--out", out)
    assert result.code == 0, result.err
    assert "ignored 1 caption(s)" in result.err and "car/9999.png" in result.err


def test_non_utf8_file_names_are_skipped_and_reported(cli, one_image, tmp_path):
    import os

    bad = os.fsencode(one_image / "car") + b"/caf\xe9.png"
    shutil.copy(one_image / "car" / "0000.png", bad)
    image_set = load_image_set(one_image)
    assert [r.name for r in image_set.records] == ["car/0000.png"]
    assert [why for _, why in image_set.skipped] == ["the file name is not valid UTF-8; rename the file"]
    result = cli(
        "caption", "--model", "toy-llava", "--images", one_image, "--max-new-tokens", 2, "--out", tmp_path / "c"
    )
    assert result.code == 0, result.err
    assert "caf\\xe9.png" in result.err and "not valid UTF-8" in result.err


def test_sixteen_bit_and_float_images_keep_their_pixels(tmp_path):
    root = tmp_path / "deep"
    (root / "grey").mkdir(parents=True)
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(root / "grey" / "a16.png")
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(root / "grey" / "b16.tif")
    Image.fromarray(ramp.astype(np.float32)).save(root / "grey" / "cfloat.tif")
    Image.fromarray((ramp * 4 - 1).astype(np.float32)).save(root / "grey" / "dfloat_out_of_range.tif")
    Image.fromarray((ramp * (2**31 - 1)).astype(np.int32)).save(root / "grey" / "e32.tif")
    image_set = load_image_set(root)
    expected = np.rint(ramp * 255)
    assert [r.name for r in image_set.records] == ["grey/a16.png", "grey/b16.tif", "grey/cfloat.tif"]
    for image in image_set.images:
        pixels = np.asarray(image, dtype=np.float64)
        assert np.abs(pixels[..., 0] - expected).max() <= 1  # not all white, not all black: the ramp
    assert sorted(p.name for p, _ in image_set.skipped) == ["dfloat_out_of_range.tif", "e32.tif"]


def test_category_without_a_readable_image_stops_the_study(cli, images, tmp_path, no_model):
    for png in (images / "fish").iterdir():
        png.write_bytes(b"broken")
    out = tmp_path / "run"
    refused(cli("run", "--model", "toy-llava", "--images", images, "--out", out), "'fish'", "no readable image")
    assert not out.exists()


# --- study files, models, prompts, neuron lists ---------------------------------------------


def test_study_yaml_that_is_not_utf8_or_repeats_a_key(cli, scene_dir, tmp_path, no_model):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(f"model: toy-llava\nimages: {scene_dir}\nprompt: caf\xe9\n".encode("latin-1"))
    refused(cli("run", latin, "--out", tmp_path / "r"), latin, "UTF-8")
    twice = tmp_path / "twice.yaml"
    twice.write_text(f"model: toy-llava\nimages: {scene_dir}\nalpha: 0.5\nalpha: 1.0\n")
    refused(cli("run", twice, "--out", tmp_path / "r"), twice, "'alpha' is given twice", "line 4")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("damage", ["no weights", "truncated weights", "random weights", "config not JSON"])
def test_model_folder_that_cannot_load(cli, scene_dir, tmp_path, damage):
    from canprobe.models import ORGANISM_DIR

    folder = tmp_path / "model"
    shutil.copytree(ORGANISM_DIR / "toy-llava", folder)
    weights = folder / "model.safetensors"
    if damage == "no weights":
        weights.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif damage == "random weights":
        weights.write_bytes(NOISE)
    else:
        (folder / "config.json").write_text("{not json")
    refused(cli("caption", "--model", folder, "--images", scene_dir, "--out", tmp_path / "c.jsonl"), "cannot")
    assert not (tmp_path / "c.jsonl").exists()


def test_prompt_longer_than_the_context(cli, scene_dir, tmp_path):
    prompt = "describe " * 200
    out = tmp_path / "c.jsonl"
    refused(cli("caption", "--model", "toy-llava", "--images", scene_dir, "--prompt", prompt, "--out", out), "context")
    assert not out.exists()


def test_neuron_lists_that_repeat_or_name_nothing(cli, scene_dir, no_model):
    refused(cli("ablate", "--model", "toy-llava", "--images", scene_dir, "--neurons", ","), "names no neuron")
    refused(cli("ablate", "--model", "toy-llava", "--images", scene_dir, "--neurons", " , "), "names no neuron")


def test_a_neuron_named_twice_counts_once(cli, one_image):
    twice = "language.layers.0.mlp.down_proj:1, language.layers.0.mlp.down_proj:1"
    result = cli("ablate", "--model", "toy-llava", "--images", one_image, "--neurons", twice, "--max-new-tokens", 2)
    assert result.code == 0, result.err
    assert "1 distinct neuron(s) in 2 addresses" in result.out
    assert "masked (1 neuron(s), zero)" in result.out


# --- identity: nothing reused across identities ---------------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory, few_images) -> Path:
    """A search folder after its scoring (``search --per-category 1`` on the scenes, method can)."""
    from canprobe.models import load_model

    folder = tmp_path_factory.mktemp("scored") / "search"
    fake_scores(load_model("toy-llava"), few_images, "language.down_proj").save(folder)
    return folder


@pytest.fixture
def search_folder(scored, tmp_path) -> Path:
    folder = tmp_path / "search"
    shutil.copytree(scored, folder)
    return folder


def _search(cli, images, out, *args):
    return cli("search", "--model", "toy-llava", "--images", images, "--per-category", 1, "--out", out, *args)


def test_search_resumed_with_another_method_or_alpha_is_refused(cli, scene_dir, search_folder):
    before = snapshot(search_folder)
    result = _search(cli, scene_dir, search_folder, "--method", "activation", "--alpha", "0.3")
    refused(
        result, search_folder / "ranking.parquet", "alpha (was 1.0, now 0.0)", 'method (was "can", now "activation")'
    )
    assert "new --out folder" in result.err
    refused(_search(cli, scene_dir, search_folder, "--alpha", "0.5"), "alpha (was 1.0, now 0.5)")
    assert snapshot(search_folder) == before


def test_search_resumed_on_other_images_with_the_same_names_is_refused(cli, images, search_folder):
    Image.new("RGB", (96, 96), (200, 0, 0)).save(images / "car" / "0000.png")  # same name, other pixels
    before = snapshot(search_folder)
    refused(_search(cli, images, search_folder), "images (was")
    assert snapshot(search_folder) == before


def test_the_same_identity_is_reused(scene_dir, scored, few_images):
    from canprobe.models import load_model
    from canprobe.scoring import check_ranking_identity, load_folder_ranking, score_identity

    lm = load_model("toy-llava")
    ranking = load_folder_ranking(scored)
    check_ranking_identity(
        ranking, score_identity(lm, few_images, "language.down_proj", scoring=Scoring(seed=5)), "unused"
    )
    with pytest.raises(Exception, match="scope"):
        check_ranking_identity(ranking, score_identity(lm, few_images, "language.gate_proj"), "start over")


def test_study_resumes_on_another_device_and_batch_size_but_not_another_alpha(cli, scene_dir, tmp_path, monkeypatch):
    from canprobe.experiment import Experiment

    ran = []
    monkeypatch.setattr(
        Experiment, "_run", lambda self, *prepared: ran.append(self.config.model.device) or {"results": []}
    )
    base = ["run", "--model", "toy-llava", "--images", scene_dir, "--out", tmp_path / "run", "--categories", "car"]
    assert cli(*base).code == 0
    assert cli(*base, "--device", "cpu", "--batch-size", 3).code == 0
    refused(cli(*base, "--alpha", "0.5"), "config.alpha (was 1.0, now 0.5)", "--restart")
    assert ran == [None, "cpu"]


# --- pairs written together: scores.safetensors + ranking.parquet ---------------------------


def test_sigkill_between_the_two_writes_of_a_pair(cli, scene_dir, tmp_path, few_images):
    import signal

    from canprobe import runfolder
    from canprobe.models import load_model
    from canprobe.scoring import load_folder_ranking, load_ranking

    lm = load_model("toy-llava")
    folder = tmp_path / "pair"
    old, new = (fake_scores(lm, few_images, "language.down_proj", seed=s) for s in (1, 2))
    old.save(folder)
    pid = os.fork()
    if pid == 0:  # the child writes the new pair and is killed between its two files
        try:
            signal.alarm(60)
            real = os.replace

            def replace_then_die(src, dst):  # both files are staged; the kill falls between the two renames
                real(src, dst)
                if Path(dst).name == runfolder.SCORES_FILE:
                    os.kill(os.getpid(), signal.SIGKILL)

            os.replace = replace_then_die
            new.save(folder)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert load_ranking(folder, check_pair=False)["address"].tolist() == old.ranking()["address"].tolist()
    # given as an input, the mixed pair is refused with one line
    refused(
        cli("ablate", "--model", "toy-llava", "--images", scene_dir, "--ranking", folder, "--top", 2),
        "different writes",
    )
    # read as the run folder's own ranking, it is rebuilt from the newer scores: a consistent new pair
    assert load_folder_ranking(folder)["address"].tolist() == new.ranking()["address"].tolist()
    assert load_ranking(folder)["address"].tolist() == new.ranking()["address"].tolist()


def test_stray_temporaries_of_killed_writes_are_removed_by_the_next_run(tmp_path):
    from canprobe.runfolder import RunLock

    stray = [tmp_path / ".scores.safetensors.k3j2.tmp", tmp_path / "scopes" / "x" / ".curve.jsonl.abc.tmp"]
    kept = [tmp_path / ".canprobe.lock.q1.tmp", tmp_path / ".someone-else.tmp", tmp_path / "notes.tmp"]
    for path in stray + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    with RunLock(tmp_path):
        pass
    assert [p.exists() for p in stray + kept] == [False, False, True, True, True]


SCORES_DAMAGE = {
    "truncated": lambda good, folder: good[: len(good) // 2],
    "empty": lambda good, folder: b"",
    "random bytes": lambda good, folder: NOISE,
    "a ranking": lambda good, folder: (folder / "ranking.parquet").read_bytes(),
}


@pytest.mark.parametrize("damage", list(SCORES_DAMAGE))
def test_damaged_scores_beside_a_ranking_are_refused(cli, scene_dir, search_folder, damage):
    scores = search_folder / "scores.safetensors"
    scores.write_bytes(SCORES_DAMAGE[damage](scores.read_bytes(), search_folder))
    before = snapshot(search_folder)
    refused(_search(cli, scene_dir, search_folder), scores)
    ablate = cli("ablate", "--model", "toy-llava", "--images", scene_dir, "--ranking", search_folder, "--top", 1)
    refused(ablate, scores)
    assert snapshot(search_folder) == before


@pytest.mark.parametrize("damage", ["random bytes", "a JSON list", "bad middle line", "foreign lines"])
def test_damaged_search_files_are_refused_on_resume(cli, scene_dir, search_folder, damage):
    if damage == "random bytes":
        (search_folder / "run.json").write_bytes(NOISE)
    elif damage == "a JSON list":
        (search_folder / "run.json").write_text("[1, 2]\n")
    elif damage == "bad middle line":
        (search_folder / "curve.jsonl").write_text('{"k": 0}\nnot json\n{"k": 1}\n')
    else:
        (search_folder / "curve.jsonl").write_text('{"k": 0}\n[1, 2]\n')
    before = snapshot(search_folder)
    refused(_search(cli, scene_dir, search_folder), search_folder)
    assert snapshot(search_folder) == before


CURVE_DAMAGE = {
    "random bytes": NOISE.replace(b"\n", b" ") + b"\n",
    "bad middle line": b'{"k": 0}\n{oops\n{}\n',
    "foreign lines": b'{"k": 0}\n{"file": "car/0000.png", "caption": "a car"}\n',
}


@pytest.mark.parametrize("damage", list(CURVE_DAMAGE))
def test_report_on_a_run_with_a_damaged_curve(cli, fake_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    curve = run / "scopes" / "x" / "pooled" / "curve.jsonl"
    curve.parent.mkdir(parents=True)
    curve.write_bytes(CURVE_DAMAGE[damage])
    before = snapshot(run)
    refused(cli("report", run), curve)
    assert snapshot(run) == before


def test_study_with_a_damaged_run_json(cli, scene_dir, tmp_path, monkeypatch, no_model):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_bytes(NOISE)
    before = snapshot(out)
    monkeypatch.setattr("canprobe.experiment.Experiment._prepare", lambda self: (None, [], _FakeLm(), _FakeLm()))
    monkeypatch.setattr("canprobe.experiment.Experiment._identity", lambda self, *prepared: {"config": {}})
    refused(cli("run", "--model", "toy-llava", "--images", scene_dir, "--out", out), out / "run.json")
    assert snapshot(out) == before


# --- outputs that would destroy something: devices, pipes, input files, folders inside inputs -----


def _special(tmp_path: Path, kind: str) -> Path:
    if kind == "device":
        return Path("/dev/null")  # as root, replacing it would turn the device into a regular file
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    if kind == "link to a pipe":
        (tmp_path / "link").symlink_to(pipe)
        return tmp_path / "link"
    return pipe


@pytest.mark.parametrize("kind", ["device", "pipe", "link to a pipe"])
@pytest.mark.parametrize("command", FILE_OUTPUTS)
def test_an_output_file_that_is_a_device_or_a_pipe_is_refused_untouched(
    cli, scene_dir, fake_run, tmp_path, command, kind, no_model
):
    target = _special(tmp_path, kind)
    before = os.stat(target)
    refused(cli(*_commands(scene_dir, target, fake_run)[command]), "canprobe writes only regular files")
    after = os.stat(target)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)


@pytest.mark.parametrize("name", ["scores.safetensors", "curve.jsonl"])
def test_a_run_folder_whose_artifact_is_a_pipe_is_refused_before_any_work(cli, scene_dir, tmp_path, name, no_model):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / name)
    refused(cli("score", "--model", "toy-llava", "--images", scene_dir, "--out", out), name, "is a pipe")


def test_caption_never_overwrites_the_image_sets_own_captions(cli, tmp_path, no_model, monkeypatch):
    images = tmp_path / "set"
    shutil.copytree(_scenes(tmp_path), images)
    before = snapshot(images)
    monkeypatch.chdir(images)  # the case: the default --out captions.jsonl, run inside the set
    refused(cli("caption", "--model", "toy-llava", "--images", "."), "captions.jsonl", "which this command reads")
    refused(cli("caption", "--model", "toy-llava", "--images", images, "--out", images / "car" / "c.jsonl"), "inside")
    assert snapshot(images) == before


@pytest.mark.parametrize("command", ["score", "search", "run"])
def test_an_output_folder_inside_the_image_folder_is_refused(cli, tmp_path, command, no_model):
    images = tmp_path / "set"
    shutil.copytree(_scenes(tmp_path), images)
    args = [command, "--model", "toy-llava", "--images", images, "--out", images / "runs" / "a"]
    refused(cli(*args), "inside", "which this command reads")
    refused(cli(*args[:-1], images), "inside")  # the image folder itself
    assert not (images / "runs").exists()


def test_report_never_overwrites_a_file_of_the_runs_it_reads(cli, fake_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    before = snapshot(run)
    refused(cli("report", run, "--out", run / "summary.json"), "which this command reads", ".html")
    refused(cli("compare", run, "--out", run / "notes.txt"), "which this command reads")
    assert snapshot(run) == before


def test_report_on_a_run_in_progress_says_so(cli, fake_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")  # a study that has claimed its folder and not finished
    refused(cli("report", run), "has not finished", "resume")
    refused(cli("compare", fake_run, run, "--out", tmp_path / "c.html"), "has not finished")
    refused(cli("report", tmp_path), "not a canprobe run folder")  # a folder with no run at all


@pytest.mark.parametrize("command", ["score", "search", "run"])
def test_a_locked_folder_is_refused_before_the_model_loads(cli, scene_dir, tmp_path, command, no_model):
    out = tmp_path / "held"
    out.mkdir()
    (out / ".canprobe.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    refused(cli(command, "--model", "toy-llava", "--images", scene_dir, "--out", out), "in use by another")


def _scenes(tmp_path: Path) -> Path:
    from canprobe.organisms.scenes import write_scenes

    return write_scenes(tmp_path / "scenes-src", per_category=1, seed=5)


# --- prompts that write the image token themselves ------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "<image>\nDescribe the image.",  # the case: LLaVA users type it by habit
        "USER: <image>\nWhat is in the picture? ASSISTANT:",  # the whole format copied from the model card
    ],
)
@pytest.mark.parametrize("command", ["caption", "score", "ablate", "inspect"])
def test_a_prompt_holding_the_image_token_is_one_line_before_any_work(cli, scene_dir, tmp_path, command, prompt):
    model = ["--model", "toy-llava", "--images", scene_dir]
    args = {
        "caption": ["caption", *model, "--out", tmp_path / "c.jsonl"],
        "score": ["score", *model, "--out", tmp_path / "s"],
        "ablate": ["ablate", *model, "--neurons", "language.layers.0.mlp.down_proj:1"],
        "inspect": ["inspect", "toy-llava", "--activations", "--images", scene_dir],
    }[command]
    refused(cli(*args, "--prompt", prompt), "holds the image token '<image>'", "canprobe places the image itself")
    assert not (tmp_path / "c.jsonl").exists() and not (tmp_path / "s" / "scores.safetensors").exists()
