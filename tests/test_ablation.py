"""Masks: exact equivalence with hand edits, every position and generation step, per-row masks, clean exit."""

import pytest
import torch

from canprobe.ablation import RankedNeurons, StandingMasks, ablate, ablate_rows, activation_stats, mean_activations
from canprobe.captions import generate_captions
from canprobe.config import Generation
from canprobe.errors import InputError
from canprobe.faults import ChannelStats
from canprobe.inputs import caption_inputs, teacher_forcing_inputs
from canprobe.models import LoadedModel
from canprobe.organisms.build import build_instructblip, build_llava
from canprobe.organisms.scenes import make_scenes
from canprobe.sites import SiteRegistry
from tests.conftest import TINY


def _tiny(kind: str) -> LoadedModel:
    torch.manual_seed(0)
    model, processor = (build_llava if kind == "llava" else build_instructblip)(TINY)
    return LoadedModel(model.eval().requires_grad_(False), processor, kind, f"tiny-{kind}")


@pytest.fixture(scope="module", params=["llava", "instructblip"])
def tiny(request) -> LoadedModel:
    return _tiny(request.param)


@pytest.fixture(scope="module")
def images():
    return [im for im, _ in make_scenes(3, seed=2)]


def _layer(lm: LoadedModel, i: int):
    registry = SiteRegistry(lm.model)
    site = next(s for s in registry.sites if s.component == "language" and s.layer == i and s.kind == "down_proj")
    return registry.module(site), registry.sites


def _whole_site(lm: LoadedModel, layer: int, kind: str) -> list[str]:
    registry = SiteRegistry(lm.model)
    site = registry.by_name[f"language.layers.{layer}.mlp.{kind}"]
    return [site.address(i) for i in range(site.size)]


def test_masking_a_whole_down_proj_equals_zeroing_the_mlp_by_hand(tiny, images):
    enc = caption_inputs(tiny, images)
    base = tiny.model(**enc).logits
    with ablate(tiny, _whole_site(tiny, 1, "down_proj")):
        masked = tiny.model(**enc).logits
    # the gate units feed down_proj (no bias): masking all of them zeroes the MLP output too
    with ablate(tiny, _whole_site(tiny, 1, "gate_proj")):
        gated = tiny.model(**enc).logits
    down, _ = _layer(tiny, 1)
    mlp = next(m for name, m in tiny.model.named_modules() if m is not down and getattr(m, "down_proj", None) is down)
    handle = mlp.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
    try:
        by_hand = tiny.model(**enc).logits
    finally:
        handle.remove()
    assert torch.equal(masked, by_hand)
    assert torch.equal(gated, by_hand)
    assert (masked - base).abs().max() > 1e-3


def test_masking_nothing_is_bit_identical(tiny, images):
    plain = generate_captions(tiny, images, Generation(max_new_tokens=6))
    enc = caption_inputs(tiny, images)
    logits = tiny.model(**enc).logits
    with ablate(tiny, []):
        assert generate_captions(tiny, images, Generation(max_new_tokens=6)) == plain
        assert torch.equal(tiny.model(**enc).logits, logits)
    with ablate_rows(tiny, [[], {}, []]):
        assert generate_captions(tiny, images, Generation(max_new_tokens=6)) == plain


def test_mask_applies_at_every_position_and_generation_step(tiny, images):
    """A recording hook behind the mask sees the neuron at zero in the prefill and in every cached step."""
    address = "language.layers.0.mlp.down_proj:5"
    down, _ = _layer(tiny, 0)
    seen = []
    with ablate(tiny, [address]):
        handle = down.register_forward_hook(lambda _m, _a, out: seen.append(out[..., 5].clone()))
        try:
            out = tiny.model.generate(
                **caption_inputs(tiny, images), max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True
            )
        finally:
            handle.remove()
    assert len(seen) == 5  # one prefill + four single-token steps with the KV cache
    assert seen[0].shape[1] > 1 and all(s.shape[1] == 1 for s in seen[1:])
    assert all(torch.equal(s, torch.zeros_like(s)) for s in seen)
    with ablate(tiny, [address]):
        uncached = tiny.model.generate(
            **caption_inputs(tiny, images), max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=False
        )
    assert torch.equal(out, uncached)


def _hooks(model: torch.nn.Module) -> list:
    """Every hook on the model (transformers installs its own output-capturing hooks on first use)."""
    return [(n, list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()]


def test_exception_inside_the_block_leaves_the_model_unchanged(tiny, images):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    enc = caption_inputs(tiny, images)
    logits = tiny.model(**enc).logits
    hooks = _hooks(tiny.model)
    with pytest.raises(ZeroDivisionError):
        with ablate(tiny, _whole_site(tiny, 0, "down_proj") + ["vision.layers.0.mlp.fc1:3"]):
            tiny.model(**enc)
            raise ZeroDivisionError
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _hooks(tiny.model) == hooks
    assert torch.equal(tiny.model(**enc).logits, logits)


def test_input_site_uses_a_pre_hook(tiny, images):
    enc = caption_inputs(tiny, images)
    with ablate(tiny, _whole_site(tiny, 1, "gate_proj")):
        gated = tiny.model(**enc).logits
    registry = SiteRegistry(tiny.model)
    site = registry.by_name["language.layers.1.mlp.down_proj.input"]
    with ablate(tiny, [site.address(i) for i in range(site.size)]) as ab:
        assert ab.masked_sites == [site.name]
        assert torch.equal(tiny.model(**enc).logits, gated)


def test_per_row_masks_match_each_mask_alone(tiny, images):
    masks = [
        [],
        _whole_site(tiny, 0, "down_proj")[:20],
        ["language.layers.1.mlp.gate_proj:3", "vision.layers.0.mlp.fc2:1", "language.layers.0.mlp.down_proj:2"],
    ]
    enc = caption_inputs(tiny, images)
    with ablate_rows(tiny, masks):
        together = tiny.model(**enc).logits
        captions = generate_captions(tiny, images, Generation(max_new_tokens=6))
    for i, mask in enumerate(masks):
        one = {k: v[i : i + 1] for k, v in enc.items()}
        with ablate(tiny, mask):
            alone = tiny.model(**one).logits
            assert generate_captions(tiny, [images[i]], Generation(max_new_tokens=6)) == [captions[i]]
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_bad_masks_are_input_errors(tiny, images):
    tiny.model(**caption_inputs(tiny, images))
    hooks = _hooks(tiny.model)
    with pytest.raises(InputError, match="no site"):
        ablate(tiny, ["language.layers.9.mlp.down_proj:1"])
    with pytest.raises(InputError, match="out of range"):
        ablate(tiny, ["language.layers.0.mlp.down_proj:10000"])
    with pytest.raises(InputError, match="reference means"):
        ablate(tiny, ["language.layers.0.mlp.down_proj:1"], fault="mean")
    with pytest.raises(InputError, match="2 rows"):
        with ablate_rows(tiny, [[], ["language.layers.0.mlp.down_proj:1"]]):
            tiny.model(**caption_inputs(tiny, images))
    assert _hooks(tiny.model) == hooks


def _unpadded_outputs(tiny: LoadedModel, images, captions) -> list[torch.Tensor]:
    """Layer 1's down_proj output over each image's prompt + caption, one unpadded row at a time."""
    rows = []
    down, _ = _layer(tiny, 1)
    handle = down.register_forward_hook(lambda _m, _a, out: rows.append(out[0]))
    try:
        for im, cap in zip(images, captions):
            enc = teacher_forcing_inputs(tiny.processor, tiny.kind, [im], [cap])
            enc.pop("labels")
            tiny.model(**enc)
    finally:
        handle.remove()
    return rows


def test_mean_activations_match_an_unpadded_one_by_one_computation(tiny, images):
    """Batched means over padded prompt+caption rows equal the plain mean over every real position."""
    captions = ["a red car", "a small blue house on the left", ""]
    site = SiteRegistry(tiny.model).by_name["language.layers.1.mlp.down_proj"]
    means = mean_activations(tiny, images, [site], generation=Generation(batch_size=3), captions=captions)
    rows = _unpadded_outputs(tiny, images, captions)
    expected = torch.cat(rows).double().mean(0).float()
    torch.testing.assert_close(means[site.name], expected, rtol=1e-5, atol=1e-6)


def test_mean_ablation_sets_the_neuron_to_its_mean(tiny, images):
    site = SiteRegistry(tiny.model).by_name["language.layers.0.mlp.down_proj"]
    stats = activation_stats(tiny, images, [site], generation=Generation(max_new_tokens=4))
    means = {site.name: stats[site.name].mean}
    down, _ = _layer(tiny, 0)
    seen = []
    with ablate(tiny, [site.address(4), site.address(9)], fault="mean", stats=stats):
        handle = down.register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            tiny.model(**caption_inputs(tiny, images))
        finally:
            handle.remove()
    out = seen[0]
    assert torch.all(out[..., 4] == means[site.name][4]) and torch.all(out[..., 9] == means[site.name][9])
    assert not torch.all(out[..., 5] == means[site.name][5])


def test_position_means_match_a_one_by_one_average_per_position(tiny, images):
    """Per-position means over right-padded rows of different lengths: at each position, the plain
    mean over the images whose sequence reaches it; the all-position mean is unchanged by the option."""
    captions = ["a red car", "a small blue house on the left", ""]
    site = SiteRegistry(tiny.model).by_name["language.layers.1.mlp.down_proj"]
    stats = activation_stats(
        tiny, images, [site], generation=Generation(batch_size=3), captions=captions, by_position=True
    )[site.name]
    rows = [r.double() for r in _unpadded_outputs(tiny, images, captions)]
    longest = max(len(r) for r in rows)
    assert stats.position_mean.shape == (longest, site.size)
    for p in (0, len(rows[2]) - 1, len(rows[2]), longest - 1):
        expected = torch.stack([r[p] for r in rows if len(r) > p]).mean(0).float()
        torch.testing.assert_close(stats.position_mean[p], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.mean, mean_activations(tiny, images, [site], captions=captions)[site.name])


def test_position_mean_ablation_follows_positions_through_generation(tiny, images):
    """Each token, of the prompt or generated with the KV cache, gets its own position's mean; past the
    table, the all-position mean."""
    site = SiteRegistry(tiny.model).by_name["language.layers.0.mlp.down_proj"]
    prompt_len = caption_inputs(tiny, images)["input_ids"].shape[1]
    table = torch.arange(prompt_len + 2, dtype=torch.float32)[:, None] * 10 + torch.arange(site.size) / 100
    stats = {site.name: ChannelStats(table[-1] + 0.5, None, None, None, table)}
    down, _ = _layer(tiny, 0)
    seen = []
    with ablate(tiny, [site.address(4)], fault="mean:by=position", stats=stats):
        handle = down.register_forward_hook(lambda _m, _a, out: seen.append(out[..., 4].clone()))
        try:
            generate_captions(tiny, images, Generation(max_new_tokens=4))
        finally:
            handle.remove()
    assert torch.equal(seen[0], table[:prompt_len, 4].expand(len(images), -1))
    decoded = [float(s.unique()) for s in seen[1:]]
    assert decoded == [float(table[prompt_len, 4]), float(table[prompt_len + 1, 4]), float(table[-1, 4] + 0.5)]


def test_position_mean_keeps_a_shared_prefix_while_the_all_position_mean_moves_it(images):
    """The first tokens of every LLaVA prompt are the same text, so their activations are the same on
    every image: the per-position mean leaves them exactly as they are, the all-position mean does not
    (Sun et al.'s reason for setting a massive activation to its mean at its own position)."""
    lm = _tiny("llava")
    site = SiteRegistry(lm.model).by_name["language.layers.0.mlp.down_proj"]
    captions = ["a red car", "a blue boat", "a green tree"]
    stats = activation_stats(
        lm, images, [site], generation=Generation(batch_size=3), captions=captions, by_position=True
    )
    enc = teacher_forcing_inputs(lm.processor, lm.kind, images, captions)
    enc.pop("labels")
    down, _ = _layer(lm, 0)
    outs = {}
    for kind in ("zero", "mean", "mean:by=position"):
        with ablate(lm, [site.address(j) for j in range(site.size)], fault=kind, stats=stats):
            handle = down.register_forward_hook(lambda _m, _a, out, kind=kind: outs.setdefault(kind, out.clone()))
            try:
                lm.model(**enc)
            finally:
                handle.remove()
    clean = []
    handle = down.register_forward_hook(lambda _m, _a, out: clean.append(out.clone()))
    try:
        lm.model(**enc)
    finally:
        handle.remove()
    prefix = clean[0][:, :3]  # "<s> user :"
    assert torch.equal(prefix[0], prefix[1])
    torch.testing.assert_close(outs["mean:by=position"][:, :3], prefix, rtol=1e-5, atol=1e-6)
    assert (outs["mean"][:, :3] - prefix).abs().max() > 1e-3
    assert not torch.allclose(outs["mean:by=position"][:, 3:], clean[0][:, 3:])


def test_position_mean_needs_position_means(tiny):
    site = SiteRegistry(tiny.model).by_name["language.layers.0.mlp.down_proj"]
    mean = torch.zeros(site.size)
    with pytest.raises(InputError, match="per-position means"):
        ablate(
            tiny, [site.address(1)], fault="mean:by=position", stats={site.name: ChannelStats(mean, None, None, None)}
        )
    with pytest.raises(InputError, match=r"not \(positions, "):
        ablate(
            tiny,
            [site.address(1)],
            fault="mean:by=position",
            stats={site.name: ChannelStats(mean, None, None, None, mean)},
        )
    with pytest.raises(InputError, match="by must be one of all, position"):
        ablate(tiny, [site.address(1)], fault="mean:by=token")


def test_ranked_prefixes_group_by_site(tiny):
    registry = SiteRegistry(tiny.model)
    addresses = [
        "language.layers.1.mlp.down_proj:7",
        "language.layers.0.mlp.down_proj:3",
        "language.layers.1.mlp.down_proj:2",
    ]
    ranked = RankedNeurons.from_addresses(registry, addresses)
    assert {k: v.tolist() for k, v in ranked.prefix(3).items()} == {
        "language.layers.1.mlp.down_proj": [2, 7],
        "language.layers.0.mlp.down_proj": [3],
    }
    assert ranked.prefix(0) == {}
    with pytest.raises(InputError):
        ranked.prefix(4)
    with pytest.raises(InputError, match="twice"):
        RankedNeurons.from_addresses(registry, addresses + addresses[:1])
    everything = RankedNeurons.from_sites(registry.select("language.down_proj"))
    assert len(everything) == 2 * TINY.text_hidden
    assert everything.addresses[TINY.text_hidden + 1] == "language.layers.1.mlp.down_proj:1"


def test_standing_masks_match_per_row_masks_and_pass_through_between_loads(tiny, images):
    masks = [_whole_site(tiny, 0, "down_proj")[:20], [], ["language.layers.1.mlp.gate_proj:3"]]
    sites = ["language.layers.0.mlp.down_proj", "language.layers.1.mlp.gate_proj"]
    enc = caption_inputs(tiny, images)
    plain = tiny.model(**enc).logits
    with ablate_rows(tiny, masks):
        expected = tiny.model(**enc).logits
    with ablate_rows(tiny, masks[::-1]):
        reversed_ = tiny.model(**enc).logits
    hooks = _hooks(tiny.model)
    with StandingMasks(tiny, sites, rows=4) as standing:
        assert _hooks(tiny.model) != hooks
        assert torch.equal(tiny.model(**enc).logits, plain)  # installed, not loaded: untouched
        masks_before = {name: mask.data_ptr() for name, mask in standing._masks.items()}
        with standing.loaded(masks):
            assert torch.equal(tiny.model(**enc).logits, expected)
        with standing.loaded(masks[::-1]):
            assert torch.equal(tiny.model(**enc).logits, reversed_)
        assert {name: mask.data_ptr() for name, mask in standing._masks.items()} == masks_before  # in place
        assert torch.equal(tiny.model(**enc).logits, plain)
        with pytest.raises(InputError, match="not among the sites"):
            with standing.loaded([["language.layers.1.mlp.down_proj:0"]]):
                pass
        with pytest.raises(InputError, match="5 masks"):
            with standing.loaded([[]] * 5):
                pass
    assert _hooks(tiny.model) == hooks
    with pytest.raises(InputError, match="acts on weights"):
        StandingMasks(tiny, sites, rows=2, fault="weight_bitflip")


def test_fault_stats_measure_what_the_faults_need_with_the_generation_settings(tiny, images):
    """One place says which clean statistics a fault needs: none for zero, per-position means for mean:by=position."""
    from canprobe.ablation import fault_stats
    from canprobe.config import Generation

    site = SiteRegistry.of(tiny.model).select("language.down_proj")[0]
    generation = Generation(max_new_tokens=4, batch_size=3)
    assert fault_stats(tiny, images, [site], ["zero", "sign"], generation) is None
    stats = fault_stats(tiny, images, [site], ["zero", "mean:by=position"], generation)[site.name]
    direct = activation_stats(
        tiny, images, [site], generation=Generation(batch_size=3, max_new_tokens=4), by_position=True
    )[site.name]
    torch.testing.assert_close(stats.mean, direct.mean, rtol=0, atol=0)
    assert stats.position_mean is not None
    calibrated = fault_stats(tiny, images, [site], ["zero"], generation, calibrate=True)[site.name]
    assert calibrated.position_mean is None and torch.equal(calibrated.max, direct.max)
