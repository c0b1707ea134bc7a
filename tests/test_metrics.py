"""Collapse metrics: CLIP score against torchmetrics, PPL against Hugging Face's own loss, non-finite values."""

import math

import numpy as np
import pytest
import torch

from canprobe import features
from canprobe.config import Evaluation, Generation
from canprobe.evaluation import ClipScorer, MaskEvaluator, PrefixCache, caption_ppl
from canprobe.faults import ChannelStats
from canprobe.inputs import teacher_forcing_inputs
from canprobe.metrics import CaptionMetrics, MetricSummary, word_stats
from canprobe.models import ORGANISM_DIR, LoadedModel, load_model
from canprobe.organisms.build import build_clip, build_instructblip, build_llava, build_tokenizer
from canprobe.organisms.scenes import make_scenes
from canprobe.sites import SiteRegistry
from tests.conftest import TINY

CAPTIONS = [
    "a small red car on the left with a green background",
    "a large blue house",
    "tree tree tree tree",
    "",
    "a yellow fish on the right with a white background",
    "boat",
]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """toy-clip when it is shipped, else a TINY CLIP saved like a checkpoint."""
    if (ORGANISM_DIR / "toy-clip" / "config.json").exists():
        return ORGANISM_DIR / "toy-clip"
    torch.manual_seed(1)
    model, processor = build_clip(TINY)
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llava() -> LoadedModel:
    torch.manual_seed(0)
    model, processor = build_llava(TINY)
    return LoadedModel(model.eval().requires_grad_(False), processor, "llava", "tiny")


def test_clip_score_equals_torchmetrics(clip_dir):
    from torchmetrics.multimodal import CLIPScore

    clip = load_model(str(clip_dir))
    images = [im for im, _ in make_scenes(len(CAPTIONS), seed=4)]
    ours = ClipScorer(clip, batch_size=4)(images, CAPTIONS)

    class Features(torch.nn.Module):
        """transformers 5 returns ModelOutputs from get_*_features; torchmetrics 1.9 expects tensors."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    as_tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]
    theirs = []
    for image, caption in zip(as_tensors, CAPTIONS):
        metric = CLIPScore(model_name_or_path=lambda: (Features(clip.model), clip.processor))
        metric.update([image], [caption])
        theirs.append(float(metric.compute()))
    torch.testing.assert_close(ours, torch.tensor(theirs), rtol=0, atol=1e-4)
    assert ours.dtype == torch.float32 and ours.min() >= 0
    print(
        f"CLIP scores {[round(x, 3) for x in ours.tolist()]}; max |ours - torchmetrics| = "
        f"{(ours - torch.tensor(theirs)).abs().max():.2e}"
    )


def test_ppl_equals_exp_of_the_hugging_face_loss_per_caption(tiny_llava):
    images = [im for im, _ in make_scenes(4, seed=1)]
    captions = CAPTIONS[:4]
    ppl = caption_ppl(tiny_llava, images, captions, Generation(batch_size=4))  # padded batch of unequal captions
    for image, caption, value in zip(images, captions, ppl.tolist()):
        enc = teacher_forcing_inputs(tiny_llava.processor, "llava", [image], [caption])
        expected = math.exp(float(tiny_llava.model(**enc).loss))
        assert value == pytest.approx(expected, rel=1e-5)
    assert ppl.dtype == torch.float32


def test_ppl_is_float32_for_a_bfloat16_model():
    torch.manual_seed(0)
    model, processor = build_llava(TINY)
    lm = LoadedModel(model.to(torch.bfloat16).eval(), processor, "llava", "tiny-bf16")
    images = [im for im, _ in make_scenes(2, seed=1)]
    ppl = caption_ppl(lm, images, CAPTIONS[:2])
    assert ppl.dtype == torch.float32 and torch.isfinite(ppl).all()


def test_separate_causal_lm_scores_the_text(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    lm = load_model(str(tmp_path / "lm"))
    ppl = caption_ppl(lm, None, CAPTIONS[:3])
    enc = teacher_forcing_inputs(lm.processor, "decoder", None, [CAPTIONS[1]])
    assert float(ppl[1]) == pytest.approx(math.exp(float(lm.model(**enc).loss)), rel=1e-5)


def test_word_stats():
    assert word_stats("tree Tree house") == (3, pytest.approx(2 / 3))
    assert word_stats("") == (0, 0.0)
    assert word_stats("a b c d") == (4, 1.0)


def test_summary_counts_non_finite_and_never_propagates_nan():
    def m(ppl, clip=10.0, caption="a b", exact=False):
        return CaptionMetrics(caption, ppl, clip, *word_stats(caption), exact)

    s = MetricSummary.of([m(1.0), m(3.0, 30.0, exact=True), m(math.inf), m(math.nan, 20.0)])
    assert s.ppl_median == 3.0  # median of [1, 3, inf]; NaN is counted, not ranked
    assert s.ppl_nonfinite == 2
    assert s.clip_mean == pytest.approx(17.5)
    assert s.exact_match == 0.25 and s.n_images == 4
    assert MetricSummary.of([m(2.0), m(4.0)]).ppl_median == 3.0
    assert math.isnan(MetricSummary.of([m(math.nan)]).ppl_median)


def test_nan_activations_are_data_not_crashes(tiny_llava, clip_dir):
    """A mean ablation with NaN means poisons the masked model: its PPL of its own caption is NaN."""
    images = [im for im, _ in make_scenes(3, seed=5)]
    site = "language.layers.0.mlp.down_proj"
    stats = {site: ChannelStats(torch.full((TINY.text_hidden,), math.nan), None, None, None)}
    evaluator = MaskEvaluator(
        tiny_llava,
        images,
        load_model(str(clip_dir)),
        Generation(max_new_tokens=4),
        Evaluation(ppl_scorer="masked", fault="mean"),
        stats=stats,
    )
    (metrics,) = evaluator.evaluate([[f"{site}:0"]])
    summary = MetricSummary.of(metrics)
    assert summary.ppl_nonfinite == 3 and math.isnan(summary.ppl_median)
    assert all(math.isfinite(x.clip) for x in metrics)


def test_per_row_masks_give_the_same_captions_and_metrics_as_each_mask_alone(clip_dir):
    lm = load_model("toy-llava")
    images = [im for im, _ in make_scenes(4, seed=8)]
    masks = [
        [],
        {"language.layers.1.mlp.down_proj": torch.arange(64)},
        {"language.layers.0.mlp.down_proj": torch.arange(48)},
        [f"language.layers.0.mlp.down_proj:{i}" for i in range(128)],
    ]
    evaluator = MaskEvaluator(lm, images, load_model(str(clip_dir)), Generation(max_new_tokens=16, batch_size=16))
    together = evaluator.evaluate(masks)
    assert together[0][0].exact_match and not all(m.exact_match for m in together[3])
    for mask, batched in zip(masks, together):
        (alone,) = evaluator.evaluate([mask])
        assert [m.caption for m in alone] == [m.caption for m in batched]
        for a, b in zip(alone, batched):
            assert a.ppl == pytest.approx(b.ppl, rel=1e-4) and a.clip == pytest.approx(b.clip, abs=1e-4)
        assert MetricSummary.of(alone).exact_match == MetricSummary.of(batched).exact_match


@pytest.mark.parametrize("name", ["toy-llava", "toy-instructblip"])
def test_evaluator_processes_each_image_batch_once_for_every_language_mask(clip_dir, monkeypatch, name):
    """With cached features only the prompt reaches the model: the processor runs once per batch of
    images, not once per mask; captions and metrics equal those of processing the images every time."""
    lm = load_model(name)
    processed = []
    family_inputs = lm.family.inputs
    monkeypatch.setattr(lm.family, "inputs", lambda *a: processed.append(len(a[1])) or family_inputs(*a))
    images = [im for im, _ in make_scenes(3, seed=6)]
    masks = [{"language.layers.1.mlp.down_proj": torch.arange(k)} for k in (4, 32, 96)]
    clip = load_model(str(clip_dir))
    cached = MaskEvaluator(lm, images, clip, Generation(max_new_tokens=8, batch_size=2))
    # images (0, 1) and (2,), once each for the features, the masked prompts, the prefix cache, the unmasked
    # captions; then rows (mask, image) in twos bring new batches (2, 0) and (1, 2), once. A transformers that
    # takes no cached features encodes (and so processes) the images on every pass instead.
    counts = []
    got = cached.evaluate(masks[:1])
    counts.append(list(processed))
    got += cached.evaluate(masks[1:2]) + cached.evaluate(masks[2:])
    counts.append(list(processed))
    got += cached.evaluate(masks) + cached.evaluate(masks)
    counts.append(list(processed))
    if features.supported(lm):
        assert counts == [[2, 1] * 4, [2, 1] * 4, [2, 1] * 4 + [2, 2]]
    fresh = MaskEvaluator(lm, images, clip, Generation(max_new_tokens=8, batch_size=2, reuse_features=False))
    want = [fresh.evaluate([m])[0] for m in masks] + fresh.evaluate(masks) * 2
    assert [[m.caption for m in x] for x in got] == [[m.caption for m in x] for x in want]
    assert len({m.caption for x in want for m in x}) > 2
    for g, w in zip(got, want):
        np.testing.assert_allclose([m.ppl for m in g], [m.ppl for m in w], rtol=1e-4)
        np.testing.assert_allclose([m.clip for m in g], [m.clip for m in w], atol=1e-4)


def test_per_row_evaluation_on_instructblip_matches_each_mask_alone(clip_dir):
    """The Q-Former path: masks on the language model and on the Q-Former, rows = masks x images."""
    from canprobe.organisms.build import build_instructblip

    torch.manual_seed(0)
    model, processor = build_instructblip(TINY)
    lm = LoadedModel(model.eval().requires_grad_(False), processor, "instructblip", "tiny-instructblip")
    images = [im for im, _ in make_scenes(3, seed=6)]
    masks = [
        [],
        {"language.layers.0.mlp.down_proj": torch.arange(TINY.text_hidden)},
        {"qformer.layers.0.output_query": torch.arange(8), "language.layers.1.mlp.gate_proj": torch.arange(30)},
    ]
    clip = load_model(str(clip_dir))
    evaluator = MaskEvaluator(
        lm, images, clip, Generation(max_new_tokens=6, batch_size=9), Evaluation(ppl_scorer="masked")
    )
    together = evaluator.evaluate(masks)
    assert together[1][0].ppl != pytest.approx(together[0][0].ppl, rel=1e-3)  # the masked model scores itself
    for mask, batched in zip(masks, together):
        (alone,) = evaluator.evaluate([mask])
        assert [m.caption for m in alone] == [m.caption for m in batched]
        assert [m.ppl for m in alone] == pytest.approx([m.ppl for m in batched], rel=1e-4)


@pytest.mark.parametrize("family", ["llava", "instructblip"])
def test_cached_prefix_gives_the_full_pass_ppl(clip_dir, family):
    """The unmasked PPL on each image's cached prefix equals the full teacher-forcing pass (rtol 1e-4)."""
    build = build_llava if family == "llava" else build_instructblip
    torch.manual_seed(2)
    model, processor = build(TINY)
    lm = LoadedModel(model.eval().requires_grad_(False), processor, family, f"tiny-{family}")
    images = [im for im, _ in make_scenes(3, seed=9)]
    every = torch.arange(TINY.text_hidden)
    masks = [[], {"language.layers.0.mlp.down_proj": every, "language.layers.1.mlp.down_proj": every}]
    clip = load_model(str(clip_dir))
    results = {}
    for reuse in (True, False):
        evaluator = MaskEvaluator(lm, images, clip, Generation(max_new_tokens=6, batch_size=4), reuse_prefix=reuse)
        results[reuse] = [evaluator.evaluate_baseline(), *evaluator.evaluate(masks)]
        assert (evaluator.prefix is not None) == reuse and (not reuse or evaluator.prefix.usable)
    for cached, full in zip(results[True], results[False]):
        assert [m.caption for m in cached] == [m.caption for m in full]
        assert [m.ppl for m in cached] == pytest.approx([m.ppl for m in full], rel=1e-4)
    # any caption, empty ones included, on prefixes encoded two images per batch
    prefix = PrefixCache(lm, images, Generation(batch_size=2))
    assert prefix.fill()
    captions = ["a small red car on the left", "", "tree tree house"]
    cached = prefix.nll([2, 0, 1], captions).exp()
    full = caption_ppl(lm, [images[2], images[0], images[1]], captions)
    assert cached.tolist() == pytest.approx(full.tolist(), rel=1e-4)


def test_compiled_decoding_reuses_one_trace_for_every_mask(clip_dir):
    """New masks on the reserved sites change tensors in place: no new graph, the same metrics as eager."""
    from torch._dynamo.utils import counters

    from tests.test_captions import compile_on_cpu

    lm = load_model("toy-llava")
    compile_on_cpu(lm)
    clip = load_model(str(clip_dir))
    images = [im for im, _ in make_scenes(4, seed=4)]
    first = [{f"language.layers.{i}.mlp.down_proj": torch.arange(k) for i in range(2)} for k in (8, 64)]
    second = [{f"language.layers.{i}.mlp.down_proj": torch.arange(k, 2 * k) for i in range(2)} for k in (16, 60)]
    eager = MaskEvaluator(lm, images, clip, Generation(max_new_tokens=10, batch_size=4))
    compiled = MaskEvaluator(lm, images, clip, Generation(max_new_tokens=10, batch_size=4, decoding="compiled"))
    compiled.reserve(s.name for s in SiteRegistry.of(lm.model).select("language.down_proj"))
    assert [m.caption for m in compiled.evaluate_baseline()] == [m.caption for m in eager.evaluate_baseline()]
    got = compiled.evaluate(first)
    graphs = counters["stats"]["unique_graphs"]
    got += compiled.evaluate(second)
    assert counters["stats"]["unique_graphs"] == graphs
    want = eager.evaluate(first) + eager.evaluate(second)
    assert [[m.caption for m in x] for x in got] == [[m.caption for m in x] for x in want]
    assert len({m.caption for x in want for m in x}) > 2
    for g, w in zip(got, want):
        np.testing.assert_allclose([m.ppl for m in g], [m.ppl for m in w], rtol=1e-4)
    compiled.close()


def test_the_summary_has_one_field_per_registered_metric_and_reads_earlier_ones():
    import dataclasses

    from canprobe.metrics import METRICS

    assert [f.name for f in dataclasses.fields(MetricSummary)] == ["n_images", *METRICS]
    assert {m.worse for m in METRICS.values()} <= {"higher", "lower"}
    old = {"n_images": 2, "ppl_median": 3.0, "clip_mean": 20.0}  # a point written before the other metrics
    s = MetricSummary.from_dict(old)
    assert (s.n_images, s.ppl_median, s.clip_mean) == (2, 3.0, 20.0) and math.isnan(s.exact_match)
    assert METRICS["exact_match"].format(0.25) == "25%" and METRICS["exact_match"].format(math.nan) == "nan"


def test_the_empty_rate_counts_captions_without_a_word():
    def m(caption):
        return CaptionMetrics(caption, 2.0, 10.0, *word_stats(caption), False)

    assert MetricSummary.of([m(""), m("a b"), m("  "), m("c")]).empty_rate == 0.5
    assert MetricSummary.of([m("a")]).empty_rate == 0.0
