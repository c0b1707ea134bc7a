"""The whole study: a small real run, its report read back, resume after interruption, config errors."""

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

import canprobe.experiment as experiment_module
from canprobe.config import make_config
from canprobe.experiment import Experiment
from canprobe.neurons import NeuronView
from canprobe.organisms.scenes import write_scenes
from canprobe.report import CURVE_COLUMNS, OPTIONAL_SECTIONS, SECTIONS, build_report, compare_runs
from canprobe.runfolder import read_jsonl

ALWAYS = [s for s in SECTIONS if s not in OPTIONAL_SECTIONS]  # the default run measures no fault models
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _small_config(images: Path, out: Path, **changes) -> dict:
    values = {
        "model": "toy-llava",
        "images": str(images),
        "out": str(out),
        "categories": ["car", "fish"],
        "images_per_category": 2,
        "scopes": ["language.down_proj"],
        "max_new_tokens": 14,
        "batch_size": 64,
        "collapse_clip_ratio": 0.6,  # toy-clip's floor for word salad is 50-57% (see canprobe demo)
    }
    values.update(changes)
    return values


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("exp") / "scenes", per_category=2, seed=5)


@pytest.fixture(scope="module")
def run_dir(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "run"
    Experiment(make_config(_small_config(images, out)), progress=False).run()
    return out


def _strip_timing(summary: dict) -> dict:
    summary = json.loads(json.dumps(summary))
    summary.pop("timings")
    return summary


def test_run_writes_every_artifact(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    groups = {(r["scope"], r["category"]) for r in summary["results"]}
    assert groups == {("language.down_proj", c) for c in ("car", "fish", "pooled")}
    for r in summary["results"]:
        folder = run_dir / r["path"]
        for name in ("scores.safetensors", "ranking.parquet", "curve.jsonl", "summary.json"):
            assert (folder / name).is_file(), folder / name
        assert r["n_neurons"] == 4 * 128
        assert r["k_star"] is None or 1 <= r["k_star"] <= r["n_neurons"]
    overlap = summary["overlap"]["language.down_proj"]
    assert overlap["categories"] == ["car", "fish"]
    assert overlap["jaccard"][0][0] == 1.0 and 0 <= overlap["jaccard"][0][1] <= 1
    half = summary["split_half"]["language.down_proj"]
    assert 0 <= half["jaccard"] <= 1 and -1 <= half["spearman"] <= 1
    assert set(summary["timings"]) >= {"scoring", "search", "controls", "stability", "activations"}
    assert summary["versions"]["canprobe"]
    activations = json.loads((run_dir / "activations.json").read_text())
    assert activations["n_images"] == summary["activations"]["images"] == 4
    assert [p["layer"] for p in activations["layers"]] == [0, 1, 2, 3]
    assert summary["activations"]["peak"]["ratio"] == max(p["ratio"] for p in activations["layers"])


def _cells(table_html: str) -> list[list[str]]:
    rows = re.findall(r"<tr>(.*?)</tr>", table_html, flags=re.S)
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, flags=re.S) for row in rows]


def _num(text: str):
    return None if text == "n/a" else float(text)


def test_report_numbers_equal_the_artifacts(run_dir):
    page = (run_dir / "report.html").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    kstar_html = re.search(r'<section id="kstar">(.*?)</section>', page, flags=re.S).group(1)
    rows = _cells(kstar_html)[1:]
    assert len(rows) == len(summary["results"])
    for row, res in zip(rows, summary["results"]):
        assert row[1] == res["scope"] and row[2] == res["category"]
        assert _num(row[3]) == res["k_star"]
        assert _num(row[4]) == res["n_neurons"]
        assert _num(row[6]) == res["stage1_k"]
    pooled = next(r for r in summary["results"] if r["category"] == "pooled")
    curve = read_jsonl(run_dir / pooled["path"] / "curve.jsonl")
    curves_html = re.search(r'<section id="curves">(.*?)</section>', page, flags=re.S).group(1)
    table = _cells(re.search(r"<details>(.*?)</details>", curves_html, flags=re.S).group(1))
    assert table[0] == CURVE_COLUMNS
    shown = {(r[0], int(float(r[1]))): r for r in table[1:]}
    assert len(shown) == len(curve)
    col = {name: i for i, name in enumerate(CURVE_COLUMNS)}
    for point in curve:
        row = shown[(point["control"], point["k"])]
        assert _num(row[col["ppl_median"]]) == pytest.approx(point["ppl_median"], rel=1e-3)
        assert _num(row[col["clip_mean"]]) == pytest.approx(point["clip_mean"], rel=1e-3)
        assert row[col["stage"]] == point["stage"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is installed by .ci/run")
def test_report_renders_in_headless_chromium(run_dir):
    probe = (
        "<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
        "const secs=[...document.querySelectorAll('section')];document.body.setAttribute('data-check',"
        "JSON.stringify({images:imgs.length,broken:imgs.filter(i=>!(i.complete&&i.naturalWidth>0)).length,"
        "sections:secs.map(s=>[s.id,s.querySelectorAll('img,td').length,s.innerText.includes('nothing measured')])}))"
        "});</script></body>"
    )
    page = (run_dir / "report.html").read_text().replace("</body>", probe)
    with tempfile.TemporaryDirectory() as tmp:
        probe_path = Path(tmp) / "probe.html"
        probe_path.write_text(page)
        flags = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
        flags += "--disable-component-update --disable-sync --virtual-time-budget=5000 --dump-dom"
        dom = subprocess.run(
            [CHROMIUM, *flags.split(), f"--user-data-dir={tmp}/profile", probe_path.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    check = json.loads(re.search(r'data-check="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    assert check["images"] >= 5 and check["broken"] == 0, check
    assert [s[0] for s in check["sections"]] == ALWAYS
    for name, filled, empty_note in check["sections"]:
        assert filled > 0 and not empty_note, name


def test_interrupted_run_resumes_to_the_same_summary(images, tmp_path, monkeypatch):
    values = _small_config(
        images,
        tmp_path / "a",
        scopes=["language.down_proj", "projector.linear_2"],
        per_category=False,
        controls=["random"],
        split_half=False,
    )
    whole = Experiment(make_config(values), progress=False).run()

    values["out"] = str(tmp_path / "b")
    real = experiment_module.find_k_star

    def interrupt_second_scope(lm, images, ranking, clip, config, *args, **kwargs):
        if config.scope == "projector.linear_2":
            raise KeyboardInterrupt
        return real(lm, images, ranking, clip, config, *args, **kwargs)

    monkeypatch.setattr(experiment_module, "find_k_star", interrupt_second_scope)
    with pytest.raises(KeyboardInterrupt):
        Experiment(make_config(values), progress=False).run()
    assert not (tmp_path / "b" / "summary.json").exists()
    monkeypatch.setattr(experiment_module, "find_k_star", real)
    resumed = Experiment(make_config(values), progress=False).run()
    whole["config"]["out"] = resumed["config"]["out"]
    assert _strip_timing(resumed) == _strip_timing(whole)


def test_compare_and_multi_run_report(run_dir, tmp_path):
    table, path = compare_runs([run_dir, run_dir], tmp_path / "compare.html")
    assert list(table["k_star"]) == [json.loads((run_dir / "summary.json").read_text())["results"][-1]["k_star"]] * 2
    assert "<img" in path.read_text()
    report = build_report([run_dir], tmp_path / "r.html")
    assert report.read_text().count("<section") == len(ALWAYS)


def _section(page: str, name: str) -> str:
    return re.search(rf'<section id="{name}">(.*?)</section>', page, flags=re.S).group(1)


def test_report_opens_with_the_answer_and_links_every_shown_neuron_to_its_block(run_dir):
    page = (run_dir / "report.html").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert page.index('<section id="headline">') < page.index('<nav id="contents">') < page.index('id="kstar"')
    pooled = next(r for r in summary["results"] if r["category"] == "pooled")
    headline = _cells(_section(page, "headline"))
    assert headline[1][:2] == [summary["model"], "language.down_proj"]
    k = pooled["k_star"]
    assert headline[1][2] == ("none of 512" if k is None else f"{k} of 512 ({k / 512:.2%})")
    assert "breaks in" in _section(page, "headline")
    ids = re.findall(r'id="([^"]+)"', page)
    links = re.findall(r'href="#([^"]+)"', page)
    assert len(ids) == len(set(ids)) and set(links) <= set(ids)
    view = NeuronView.load(run_dir)
    shown = view.scopes["language.down_proj"]["shown"]
    assert shown == (4 if k is None else min(k, 16)) == len(view.stats)
    neurons = _section(page, "neurons")
    blocks = {re.search(r"<h4>(.*?)</h4>", b).group(1): b for b in neurons.split('<div class="neuron"')[1:]}
    assert list(blocks) == [s["neuron"] for s in view.stats]
    for stats in view.stats:
        block = blocks[stats["neuron"]]
        assert block.count("<img") == 1 + 3 and "most active of its site" in block  # positions and 3 patch maps
        assert f">{stats['neuron']}</a>" in _section(page, "locations")  # its row in the layer table links to it
    kstar_rows = _cells(_section(page, "kstar"))[1:]
    linked = [row for row in kstar_rows if "href" in row[-1]]
    assert [(row[1], row[2]) for row in linked] == [("language.down_proj", "pooled")]
    assert f"{shown} neurons" in linked[0][-1]
    table = pd.read_parquet(run_dir / "neurons.parquet")
    assert list(table.columns[:5]) == ["neuron", "image", "position", "kind", "value"]
    assert table["image"].nunique() == 4 and set(table["neuron"]) == {s["neuron"] for s in view.stats}


def test_neurons_command_on_run_and_search_folders_and_a_foreign_one(cli, run_dir, images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    result = cli("neurons", run, "--top", "2")
    assert result.code == 0, result.err
    assert len([line for line in result.out.splitlines() if "most active of its site" in line]) == 2
    assert len(NeuronView.load(run).stats) == 2 and "n-0-language-down-proj" in (run / "report.html").read_text()
    search = run / "scopes" / "language.down_proj" / "pooled"
    result = cli("neurons", search)
    assert result.code == 2 and "--images" in result.err and len(result.err.strip().splitlines()) == 1
    result = cli("neurons", search, "--images", images, "--top", "3")
    assert result.code == 0, result.err
    page = (search / "neurons.html").read_text()
    assert page.count('<div class="neuron"') == 3 and "<img" in page
    for foreign in (tmp_path / "elsewhere", images):
        foreign.mkdir(exist_ok=True)
        result = cli("neurons", foreign)
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
        assert "not a canprobe run or search folder" in result.err


@pytest.mark.parametrize(
    "args, field",
    [
        (["--alpah", "0.5"], "alpah"),
        (["--alpha", "x"], "alpha"),
        (["--images", "/nonexistent/folder"], "images"),
        (["--categories", "car,dragon"], "categories"),
        (["--batch-size", "0"], "batch_size"),
    ],
)
def test_bad_configs_fail_before_any_model_loads(cli, scene_dir, monkeypatch, args, field):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("canprobe.models.load_model", no_loading)
    result = cli("run", "--model", "toy-llava", "--images", scene_dir, *args)
    assert result.code == 2, (result.out, result.err)
    lines = [x for x in result.err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("canprobe: error:") and field in lines[0], result.err


def test_bad_config_file_names_the_field(cli, scene_dir, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: toy-llava\nimages: {scene_dir}\nscopes: 3\n")
    result = cli("run", path)
    assert result.code == 2 and "scopes" in result.err and len(result.err.strip().splitlines()) == 1
    path.write_text(f"model: toy-llava\nimages: {scene_dir}\nbogus: 1\n")
    result = cli("run", path)
    assert result.code == 2 and "bogus" in result.err


def test_the_mean_control_can_use_each_positions_own_mean(images, tmp_path):
    """On toy-llava's pooled k* channels the mean at each token's own position keeps the captions far
    closer to the clean ones than the all-position mean (measured: PPL 1.0 against 116)."""
    points = {}
    for mean_control in ("all", "position"):
        out = tmp_path / mean_control
        values = _small_config(
            images, out, per_category=False, split_half=False, controls=["mean"], mean_control=mean_control
        )
        (pooled,) = Experiment(make_config(values), progress=False).run()["results"]
        controls = json.loads((out / pooled["path"] / "controls.json").read_text())
        assert pooled["k_star"] is not None and controls["mean_ablation_collapsed"] is pooled["mean_ablation_collapsed"]
        assert controls["mean_ablation_fault"] == {"all": "mean", "position": "mean:by=position"}[mean_control]
        points[mean_control] = controls["mean_ablation"]
    assert points["position"]["ppl_median"] < 2 and points["all"]["ppl_median"] > 20
    assert points["position"]["exact_match"] > points["all"]["exact_match"]


def test_a_ppl_model_named_by_path_is_loaded_once_per_study(images, tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    import canprobe.evaluation as evaluation_module
    import canprobe.models as models_module
    from canprobe.organisms.build import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ppl-lm")
    tok.save_pretrained(tmp_path / "ppl-lm")
    loads = []
    real = models_module.load_model

    def counting(name, *args, **kwargs):
        loads.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(models_module, "load_model", counting)
    monkeypatch.setattr(evaluation_module, "load_model", counting)
    values = _small_config(
        images,
        tmp_path / "run",
        ppl_scorer=str(tmp_path / "ppl-lm"),
        controls=["activation", "mean"],
        split_half=False,
    )
    summary = Experiment(make_config(values), progress=False).run()
    assert loads.count(str(tmp_path / "ppl-lm")) == 1, loads
    assert len(summary["results"]) == 3  # three searches and their controls shared the one PPL model


def test_a_study_file_sets_the_search_of_every_search(cli, images, tmp_path):
    """growth, k_per_round and max_k of a study file reach each search's summary.json (0.1 dropped them)."""
    out = tmp_path / "run"
    values = _small_config(images, out, controls=["random"], split_half=False, growth=3.0, k_per_round=2, max_k=24)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in values.items() if k != "out"}))
    result = cli("run", path, "--out", out)
    assert result.code == 0, result.err
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["results"]) == 3
    for row in summary["results"]:
        search = json.loads((out / row["path"] / "summary.json").read_text())
        config = search["config"]
        assert (config["growth"], config["k_per_round"], config["max_k"]) == (3.0, 2, 24), row["path"]
        assert search["max_k"] == 24
        ks = [p["k"] for p in read_jsonl(out / row["path"] / "curve.jsonl") if p["phase"] == "grow"]
        assert ks[:3] == [1, 3, 9][: len(ks[:3])]  # growth 3: 1, 3, 9, ...


def test_a_study_reports_skipped_images_as_the_other_commands_do(cli, scene_dir, tmp_path, monkeypatch, caplog):
    """The unreadable file is named in warnings (canprobe.console's lines), and the study goes on without it."""
    root = tmp_path / "imgs"
    shutil.copytree(scene_dir, root)
    (root / "car" / "broken.jpg").write_text("garbage")
    seen = []
    monkeypatch.setattr(
        Experiment, "_run", lambda self, image_set, *rest: seen.append(len(image_set)) or {"results": []}
    )
    result = cli("run", "--model", "toy-llava", "--images", root, "--out", tmp_path / "run", "--categories", "car")
    assert result.code == 0, result.err
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "skipped 1 unreadable image(s) or nested folder(s):" in warned
    assert any("car/broken.jpg" in line for line in warned) and seen == [2]
