"""CAN scoring: Captum cross-checks for every site kind, batching invariance, the signed estimate, files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from canprobe.config import SCORE_METHODS, Generation, Scoring
from canprobe.errors import InputError
from canprobe.inputs import teacher_forcing_inputs
from canprobe.models import LoadedModel
from canprobe.organisms.build import build_instructblip, build_llava
from canprobe.organisms.scenes import make_scenes
from canprobe.scoring import (
    ScoreResult,
    load_ranking,
    load_scores,
    per_sample_loss,
    score_identity,
    score_neurons,
)
from canprobe.sites import Site, SiteRegistry
from tests.conftest import TINY

CAPTIONS = [
    "a small red car",
    "a large blue boat on the left with a white background",
    "a tree",
    "a small green fish in the middle with a black background",
]


def _tiny(kind: str, **shape) -> LoadedModel:
    torch.manual_seed(0)
    builder = build_llava if kind == "llava" else build_instructblip
    model, processor = builder(dataclasses.replace(TINY, **shape))
    model.eval().requires_grad_(False)
    return LoadedModel(model, processor, kind, f"tiny-{kind}")


@pytest.fixture(scope="module")
def tiny_llava() -> LoadedModel:
    return _tiny("llava")


@pytest.fixture(scope="module")
def tiny_blip() -> LoadedModel:
    # two Q-Former layers: the text branch of the last one never reaches the loss
    return _tiny("instructblip", qformer_layers=2)


@pytest.fixture(scope="module")
def images():
    return [im for im, _ in make_scenes(len(CAPTIONS), seed=5)]


def _captum_reference(lm: LoadedModel, images, sites: list[Site], to_input: bool) -> dict[str, dict[str, torch.Tensor]]:
    """CAN alpha=1 and alpha=0 per site from Captum, reduced with independently built position weights."""
    from captum.attr import LayerActivation, LayerGradientXActivation

    enc = teacher_forcing_inputs(lm.processor, lm.kind, images, CAPTIONS)
    registry = SiteRegistry(lm.model)

    def forward(pixel_values):
        return per_sample_loss(lm.model, {**enc, "pixel_values": pixel_values})

    layers = [registry.module(s) for s in sites]
    grad_x_act = LayerGradientXActivation(forward, layers).attribute(
        enc["pixel_values"], attribute_to_layer_input=to_input
    )
    acts = LayerActivation(forward, layers).attribute(enc["pixel_values"], attribute_to_layer_input=to_input)
    labels = enc["labels"]
    caption_pos = torch.zeros_like(labels, dtype=torch.float32)
    caption_pos[:, :-1] = (labels[:, 1:] != -100).float()
    out = {}
    for site, gxa, act in zip(sites, grad_x_act, acts):
        if site.component == "language":
            w = caption_pos / caption_pos.sum(1, keepdim=True)
        elif site.component == "qformer" and not site.kind.endswith("_query"):
            qm = enc["qformer_attention_mask"].float()
            w = qm / qm.sum(1, keepdim=True)
        else:
            w = torch.full(gxa.shape[:2], 1.0 / gxa.shape[1])
        n = len(images)
        out[site.name] = {
            "can1": (w[..., None] * gxa.abs()).sum((0, 1)) / n,
            "can0": (w[..., None] * act.abs()).sum((0, 1)) / n,
        }
    return out


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# vision layer 1 of the tiny LLaVA is skipped by vision_feature_layer=-2 (no gradient, Captum cannot attribute)
@pytest.mark.parametrize(
    "kind,scope,to_input",
    [
        ("llava", "language.gate_proj,language.up_proj,language.down_proj,vision,projector", False),
        ("llava", "language.down_proj.input", True),
        ("instructblip", "qformer,vision.fc1,language.down_proj", False),
    ],
)
def test_can_matches_captum_for_every_site_kind(kind, scope, to_input, tiny_llava, tiny_blip, images):
    lm = tiny_llava if kind == "llava" else tiny_blip
    registry = SiteRegistry(lm.model)
    sites = [s for s in registry.select(scope) if not (s.component in ("vision", "qformer") and s.layer > 0)]
    reference = _captum_reference(lm, images, sites, to_input)
    can1 = score_neurons(
        lm, images, scoring=Scoring(alpha=1.0), generation=Generation(batch_size=3), scope=scope, captions=CAPTIONS
    )
    can0 = score_neurons(
        lm, images, scoring=Scoring(alpha=0.0), generation=Generation(batch_size=3), scope=scope, captions=CAPTIONS
    )
    worst = 0.0
    for site in sites:
        ref = reference[site.name]
        assert ref["can1"].abs().max() > 0, site.name
        for ours, theirs in ((can1.scores[site.name], ref["can1"]), (can0.scores[site.name], ref["can0"])):
            err = _relative_error(ours, theirs)
            worst = max(worst, err)
            assert err < 1e-5, (site.name, err)
    print(f"\n{kind} {scope}: {len(sites)} sites, worst relative error vs Captum {worst:.2e}")
    kinds = {(s.component, s.kind) for s in sites}
    assert len(kinds) == len({(s.component, s.kind) for s in registry.select(scope)})


def test_unreachable_sites_score_zero_gradient(tiny_llava, images):
    result = score_neurons(tiny_llava, images, scope="vision.fc2", captions=CAPTIONS)
    assert result.scores["vision.layers.0.mlp.fc2"].sum() > 0
    # vision_feature_layer=-2: the last vision layer never reaches the loss
    assert torch.equal(result.scores["vision.layers.1.mlp.fc2"], torch.zeros(TINY.vision_hidden))
    assert torch.equal(result.signed["vision.layers.1.mlp.fc2"], torch.zeros(TINY.vision_hidden))


def test_batch_size_and_padding_do_not_change_scores(tiny_llava, tiny_blip, images):
    enc = teacher_forcing_inputs(tiny_llava.processor, "llava", images, CAPTIONS)
    assert (enc["attention_mask"] == 0).any(), "captions of different lengths must pad the batch"
    for lm in (tiny_llava, tiny_blip):
        every = Scoring(reduction="all")
        one, many = (score_neurons(lm, images, "all", every, Generation(batch_size=n), CAPTIONS) for n in (1, 8))
        for name in one.scores:
            torch.testing.assert_close(many.scores[name], one.scores[name], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(many.signed[name], one.signed[name], rtol=1e-4, atol=1e-7)


def test_gradient_checkpointing_and_feature_reuse_do_not_change_scores(tiny_llava, tiny_blip, images):
    """Checkpointing replays each layer in backward (hooks must count it once); reuse skips the encoder."""
    for lm in (tiny_llava, tiny_blip):
        for scope, method in (("language", "can"), ("all", "can"), ("language", "activation"), ("language", "wanda")):
            scoring = Scoring(method=method)
            plain = score_neurons(lm, images, scope, scoring, Generation(batch_size=3, reuse_features=False), CAPTIONS)
            for checkpointed, reuse in ((True, False), (False, True)):
                generation = Generation(batch_size=3, reuse_features=reuse)
                other = score_neurons(lm, images, scope, scoring, generation, CAPTIONS, checkpointed)
                for name in plain.scores:
                    # (some encoder sites never reach the loss and score zero by design; see above)
                    assert plain.scores[name].abs().sum() > 0 or not name.startswith("language"), name
                    torch.testing.assert_close(other.scores[name], plain.scores[name], rtol=1e-5, atol=1e-9)
                    torch.testing.assert_close(other.signed[name], plain.signed[name], rtol=1e-5, atol=1e-9)
        assert not any(m.training or getattr(m, "gradient_checkpointing", False) for m in lm.model.modules())


def test_gradient_checkpointing_recomputes_the_layers(tiny_llava, images):
    """The replay really happens: a hook inside a layer fires in the backward pass too."""
    calls = []
    norm = tiny_llava.model.model.language_model.layers[0].input_layernorm
    handle = norm.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    try:
        score_neurons(tiny_llava, images[:2], "language.up_proj", captions=CAPTIONS[:2], gradient_checkpointing=True)
        replayed = len(calls)
        calls.clear()
        score_neurons(tiny_llava, images[:2], "language.up_proj", captions=CAPTIONS[:2])
    finally:
        handle.remove()
    assert (replayed, len(calls)) == (2, 1)


def test_checkpointing_keeps_no_site_activation_through_the_forward(tiny_llava, images, monkeypatch):
    """Under checkpointing the scored activations are freed after the forward and recomputed in backward.

    All but the first: that one is made to require grad to start the graph, and autograd holds it.
    """
    import weakref

    from canprobe.scoring import engine

    tapped, alive = [], []
    tap_forward = engine._Tap.forward

    def recording_tap(ctx, a, *rest):
        tapped.append(weakref.ref(a))
        return tap_forward(ctx, a, *rest)

    def loss_then_count(model, enc):
        loss = per_sample_loss(model, enc)
        alive.append([ref() is not None for ref in tapped])
        tapped.clear()
        return loss

    monkeypatch.setattr(engine._Tap, "forward", staticmethod(recording_tap))
    monkeypatch.setattr(engine, "per_sample_loss", loss_then_count)
    sites = len(SiteRegistry(tiny_llava.model).select("language.down_proj"))
    for checkpointed in (False, True):
        score_neurons(tiny_llava, images[:2], captions=CAPTIONS[:2], gradient_checkpointing=checkpointed)
    assert alive == [[True] * sites, [True] + [False] * (sites - 1)]


def test_padded_rows_lose_the_same_as_alone(tiny_llava, images):
    enc = teacher_forcing_inputs(tiny_llava.processor, "llava", images, CAPTIONS)
    together = per_sample_loss(tiny_llava.model, enc)
    for i in range(len(CAPTIONS)):
        alone = per_sample_loss(
            tiny_llava.model,
            teacher_forcing_inputs(tiny_llava.processor, "llava", images[i : i + 1], CAPTIONS[i : i + 1]),
        )
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def test_per_sample_loss_matches_model_loss(tiny_llava, images):
    enc = teacher_forcing_inputs(tiny_llava.processor, "llava", images[:1], CAPTIONS[:1])
    ours = per_sample_loss(tiny_llava.model, enc)
    torch.testing.assert_close(ours, tiny_llava.model(**enc).loss[None], rtol=1e-5, atol=1e-6)


def test_methods_and_their_relations(tiny_llava, images):
    kw = dict(scope="language", captions=CAPTIONS, generation=Generation(batch_size=4))
    results = {m: score_neurons(tiny_llava, images, scoring=Scoring(method=m), **kw) for m in SCORE_METHODS}
    can0 = score_neurons(tiny_llava, images, scoring=Scoring(alpha=0.0), **kw)
    half = score_neurons(tiny_llava, images, scoring=Scoring(alpha=0.5), **kw)
    for name in can0.scores:
        torch.testing.assert_close(results["activation"].scores[name], can0.scores[name])
        # the signed estimate does not depend on the method
        torch.testing.assert_close(results["random"].signed[name], results["can"].signed[name])
        assert not torch.allclose(half.scores[name], results["can"].scores[name])
    assert results["random"].top(5) == score_neurons(tiny_llava, images, scoring=Scoring(method="random"), **kw).top(5)
    assert results["random"].top(5) != score_neurons(
        tiny_llava, images, scoring=Scoring(method="random", seed=1), **kw
    ).top(5)
    assert results["can"].config["alpha"] == 1.0 and results["gradient"].config["alpha"] is None


def test_wanda_is_weight_times_input_rms(tiny_llava, images):
    registry = SiteRegistry(tiny_llava.model)
    site = registry.by_name["language.layers.1.mlp.down_proj"]
    seen = []
    handle = registry.weight(site).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        per_sample_loss(tiny_llava.model, teacher_forcing_inputs(tiny_llava.processor, "llava", images, CAPTIONS))
    finally:
        handle.remove()
    result = score_neurons(
        tiny_llava,
        images,
        scoring=Scoring(method="wanda"),
        scope="language.down_proj,language.down_proj.input",
        captions=CAPTIONS,
    )
    enc = teacher_forcing_inputs(tiny_llava.processor, "llava", images, CAPTIONS)
    pos = torch.zeros_like(enc["labels"], dtype=torch.bool)
    pos[:, :-1] = enc["labels"][:, 1:] != -100
    ms = torch.stack([seen[0][i][pos[i]].square().mean(0) for i in range(len(CAPTIONS))]).mean(0)
    weight = registry.weight(site).weight.abs()
    torch.testing.assert_close(result.scores[site.name], weight @ ms.sqrt(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        result.scores["language.layers.1.mlp.down_proj.input"], weight.sum(0) * ms.sqrt(), rtol=1e-5, atol=1e-7
    )


def test_weights_get_no_gradients(tiny_llava, images):
    score_neurons(tiny_llava, images, scope="all", captions=CAPTIONS)
    assert all(p.grad is None and not p.requires_grad for p in tiny_llava.model.parameters())


def test_self_captions_are_the_default(tiny_llava, images):
    result = score_neurons(tiny_llava, images[:2], generation=Generation(max_new_tokens=4))
    assert result.config["loss_text"] == "self" and result.config["n_images"] == 2
    assert score_neurons(tiny_llava, images[:2], captions=CAPTIONS[:2]).config["loss_text"] == "reference"
    # the identity a ranking is checked against is the one scoring records, with scoring's defaults
    recorded = {k: result.config[k] for k in score_identity(tiny_llava, images[:2])}
    assert recorded == score_identity(tiny_llava, images[:2], generation=Generation(max_new_tokens=4))
    assert recorded["max_new_tokens"] == 4 and score_identity(tiny_llava, images[:2])["max_new_tokens"] == 24
    # how fast it runs is not identity
    assert score_identity(tiny_llava, images[:2], generation=Generation(max_new_tokens=4, batch_size=3)) == recorded


def test_decoder_scores_texts():
    from transformers import LlamaConfig, LlamaForCausalLM

    from canprobe.organisms.build import build_tokenizer

    tok = build_tokenizer(padding_side="right")
    torch.manual_seed(0)
    model = (
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=16,
                intermediate_size=24,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                pad_token_id=0,
            )
        )
        .eval()
        .requires_grad_(False)
    )
    lm = LoadedModel(model, tok, "decoder", "tiny-llama")
    result = score_neurons(lm, None, scope="language.gate_proj", captions=CAPTIONS[:2])
    assert [s.name for s in result.sites] == ["language.layers.0.mlp.gate_proj", "language.layers.1.mlp.gate_proj"]
    assert result.config["loss_text"] == "text" and all(v.sum() > 0 for v in result.scores.values())


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(scoring=dict(alpha=1.5)), "alpha"),
        (dict(scoring=dict(alpha=-0.1)), "alpha"),
        (dict(scoring=dict(method="saliency")), "wanda"),
        (dict(scoring=dict(reduction="first")), "loss"),
        (dict(scope="language.o_proj"), "language.down_proj"),
        (dict(captions=["one"]), "one caption per image"),
        (dict(generation=dict(batch_size=0)), "batch_size"),
    ],
)
def test_bad_arguments_raise_input_error(tiny_llava, images, kwargs, needle):
    sections = {"scoring": Scoring, "generation": Generation}
    with pytest.raises(InputError, match=needle):
        score_neurons(
            tiny_llava, images[:2], **{k: sections[k](**v) if k in sections else v for k, v in kwargs.items()}
        )


def test_no_images_raises(tiny_llava):
    with pytest.raises(InputError, match="no images"):
        score_neurons(tiny_llava, [])


def test_ranking_ties_follow_model_order_and_files_round_trip(tmp_path):
    sites = [
        Site("language", 0, "down_proj", "m.0", "output", "m.0", "out", 3),
        Site("language", 1, "down_proj", "m.1", "output", "m.1", "out", 2),
    ]
    scores = {sites[0].name: torch.tensor([1.0, 5.0, 2.0]), sites[1].name: torch.tensor([5.0, 2.0])}
    signed = {s.name: -scores[s.name] for s in sites}
    result = ScoreResult(scores, signed, sites, {"method": "can", "reduction": "loss"})
    ranking = result.ranking()
    assert ranking["address"].tolist() == [
        "language.layers.0.mlp.down_proj:1",
        "language.layers.1.mlp.down_proj:0",
        "language.layers.0.mlp.down_proj:2",
        "language.layers.1.mlp.down_proj:1",
        "language.layers.0.mlp.down_proj:0",
    ]
    assert ranking["rank"].tolist() == [1, 2, 3, 4, 5]
    assert result.top(2) == ranking["address"].tolist()[:2]
    result.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranking.parquet", "scores.safetensors"]
    loaded = load_scores(tmp_path)
    assert loaded.sites == sites and loaded.config == result.config
    for s in sites:
        assert torch.equal(loaded.scores[s.name], scores[s.name])
        assert torch.equal(loaded.signed[s.name], signed[s.name])
    table = load_ranking(tmp_path / "ranking.parquet")
    assert list(table.columns) == ["address", "component", "site", "layer", "index", "score", "rank"]
    assert table["address"].tolist() == ranking["address"].tolist()
    assert table.attrs["config"]["reduction"] == "loss"
    np.testing.assert_array_equal(table["score"].to_numpy(), ranking["score"].to_numpy())


def test_signed_estimate_predicts_real_ablations():
    """Spearman(signed estimate, real zero-ablation loss change) over toy-llava's top-50 down_proj channels by CAN."""
    from canprobe.models import load_model

    try:
        lm = load_model("toy-llava")
    except Exception as exc:  # the trained organism is produced by a separate training run
        pytest.skip(f"toy-llava unavailable: {exc}")
    scenes = make_scenes(6, seed=21)  # one image per category keeps the 50 ablation passes quick
    images, captions = [im for im, _ in scenes], [s.caption for _, s in scenes]
    result = score_neurons(
        lm, images, generation=Generation(batch_size=6), scope="language.down_proj", captions=captions
    )
    top = result.ranking().head(50)
    registry = SiteRegistry(lm.model)
    targets = [registry.resolve(a) for a in top["address"]]
    predicted = np.array([float(result.signed[site.name][i]) for site, i in targets])
    enc = teacher_forcing_inputs(lm.processor, lm.kind, images, captions)
    n = len(images)
    # one batch holds every (ablation, image) pair: row r ablates targets[r // n] on image r % n
    big = {k: v.repeat(len(targets), *([1] * (v.dim() - 1))) for k, v in enc.items()}
    with torch.no_grad():
        base = per_sample_loss(lm.model, enc)
    handles = []
    for site in {s for s, _ in targets}:
        rows = torch.tensor([r for r in range(len(targets) * n) if targets[r // n][0] == site])
        cols = torch.tensor([targets[r // n][1] for r in rows.tolist()])

        def zero(_m, _i, out, rows=rows, cols=cols):
            out = out.clone()
            out[rows, :, cols] = 0
            return out

        handles.append(registry.module(site).register_forward_hook(zero))
    try:
        with torch.no_grad():
            ablated = per_sample_loss(lm.model, big).view(len(targets), n)
    finally:
        for h in handles:
            h.remove()
    actual = (ablated - base).mean(dim=1).numpy()
    rho = _spearman(np.array(predicted), np.array(actual))
    same_sign = float(np.mean(np.sign(predicted) == np.sign(actual)))
    print(
        f"\ntop-50 down_proj channels by CAN: Spearman(signed estimate, real ablation) {rho:.3f}, "
        f"same sign {same_sign:.0%}"
    )
    assert rho > 0.5
    assert same_sign > 0.5


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    torch.manual_seed(0)
    model, processor = build_llava(TINY)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_score_command_writes_files_and_prints_the_top(cli, tiny_llava_dir, scene_dir, tmp_path):
    out = tmp_path / "scores"
    args = ["score", "--model", tiny_llava_dir, "--images", scene_dir, "--out", out, "--top", 3]
    result = cli(*args, "--scope", "language.down_proj,projector", "--captions", "reference", "--batch-size", 5)
    assert result.code == 0, result.err
    table = load_ranking(out)
    assert len(table) == TINY.text_layers * TINY.text_hidden + 2 * TINY.text_hidden
    top_lines = result.out.splitlines()[:3]
    assert [line.split()[-1] for line in top_lines] == table["address"].head(3).tolist()
    loaded = load_scores(out)
    assert loaded.config["loss_text"] == "reference" and loaded.config["n_images"] == 12
    assert loaded.config["positions"]["language"] == "positions predicting a caption token"
    assert "scored 128 neurons in 4 sites over 12 images" in result.out


def _one_line_error(result, needle):
    assert result.code == 2, (result.code, result.out, result.err)
    lines = [x for x in result.err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("canprobe: error:"), result.err
    assert needle in lines[0], lines[0]


def test_score_command_bad_input(cli, tiny_llava_dir, scene_dir, tmp_path):
    base = ["score", "--model", tiny_llava_dir, "--out", tmp_path / "o"]
    _one_line_error(
        cli(*base, "--images", scene_dir, "--scope", "language.o_proj", "--captions", "reference"), "o_proj"
    )
    _one_line_error(cli(*base, "--images", scene_dir, "--alpha", "1.5"), "alpha")
    _one_line_error(cli(*base, "--images", scene_dir, "--alpha", "-0.5"), "alpha")
    (tmp_path / "empty").mkdir()
    _one_line_error(cli(*base, "--images", tmp_path / "empty"), "no readable image files")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    _one_line_error(cli("score", "--model", gpt2, "--images", scene_dir), "no adapter for model type 'gpt2'")
    assert not (tmp_path / "o").exists()


def test_llava_next_crops_score_the_same_batched_or_alone(tmp_path):
    """LLaVA-NeXT tiles each image into a size-dependent number of crops; vision rows map back to samples."""
    from canprobe.models import load_model
    from tests.test_families import _llava_next

    torch.manual_seed(0)
    _llava_next(tmp_path / "llava-next")
    lm = load_model(str(tmp_path / "llava-next"))
    images = [im for im, _ in make_scenes(3, seed=0)]
    images[1], images[2] = images[1].resize((96, 40)), images[2].resize((40, 96))
    together = score_neurons(lm, images, generation=Generation(batch_size=3), scope="all", captions=CAPTIONS[:3])
    alone = score_neurons(lm, images, generation=Generation(batch_size=1), scope="all", captions=CAPTIONS[:3])
    assert any(s.component == "vision" for s in together.sites)
    for name in together.scores:
        assert together.scores[name].sum() > 0
        torch.testing.assert_close(together.scores[name], alone.scores[name], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(together.signed[name], alone.signed[name], rtol=1e-4, atol=1e-7)


def test_accelerate_placement_scores_like_plain_loading(tiny_llava_dir, images):
    """--device-map goes through accelerate's placement (here: everything on the CPU) and changes no score."""
    from canprobe.models import load_model

    plain = load_model(str(tiny_llava_dir))
    placed = load_model(str(tiny_llava_dir), device_map="auto")
    assert {p.device.type for p in placed.model.parameters()} == {"cpu"}
    a = score_neurons(plain, images[:4], "language", captions=CAPTIONS[:4])
    b = score_neurons(placed, images[:4], "language", captions=CAPTIONS[:4])
    for name in a.scores:
        torch.testing.assert_close(b.scores[name], a.scores[name])


def test_one_method_class_per_score_method_in_the_settings_order():
    from canprobe.scoring.methods import METHODS, make_method

    assert tuple(METHODS) == SCORE_METHODS
    assert [make_method(m).config()["method"] for m in SCORE_METHODS] == list(SCORE_METHODS)
    with pytest.raises(InputError, match="alpha"):
        make_method("gradient", alpha=2.0)
