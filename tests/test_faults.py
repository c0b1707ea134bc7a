"""Fault models and protections: each fault against a hand-computed forward, exact restores, bad specs."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canprobe.ablation import ablate, ablate_rows, activation_stats, mean_activations
from canprobe.captions import generate_captions
from canprobe.config import Generation
from canprobe.errors import InputError
from canprobe.faults import FAULTS, ProtectedSet, RangeRestriction, check_fault, flip_bit, parse_fault
from canprobe.inputs import caption_inputs, teacher_forcing_inputs
from canprobe.models import LoadedModel
from canprobe.organisms.build import build_instructblip, build_llava
from canprobe.organisms.scenes import make_scenes
from canprobe.sites import SiteRegistry
from tests.conftest import TINY

SITE = "language.layers.0.mlp.down_proj"


def _tiny(kind: str, dtype=torch.float32) -> LoadedModel:
    torch.manual_seed(0)
    model, processor = (build_llava if kind == "llava" else build_instructblip)(TINY)
    return LoadedModel(model.to(dtype).eval().requires_grad_(False), processor, kind, f"tiny-{kind}")


@pytest.fixture(scope="module")
def llava() -> LoadedModel:
    return _tiny("llava")


@pytest.fixture(scope="module")
def images():
    return [im for im, _ in make_scenes(3, seed=2)]


def _module(lm: LoadedModel, name: str):
    registry = SiteRegistry(lm.model)
    return registry.module(registry.by_name[name])


def _site_output(lm: LoadedModel, images, name: str = SITE) -> torch.Tensor:
    """The site's output in one forward pass, recorded behind whatever hooks are active."""
    seen = []
    handle = _module(lm, name).register_forward_hook(lambda _m, _a, out: seen.append(out.clone()))
    try:
        lm.model(**caption_inputs(lm, images))
    finally:
        handle.remove()
    return seen[0]


def _logits_with_hand_hook(lm: LoadedModel, images, edit, name: str = SITE) -> torch.Tensor:
    """Logits with ``edit(out)`` applied to the site's output by a hand-written hook."""
    handle = _module(lm, name).register_forward_hook(lambda _m, _a, out: edit(out.clone()))
    try:
        return lm.model(**caption_inputs(lm, images)).logits
    finally:
        handle.remove()


def _logits(lm, images):
    return lm.model(**caption_inputs(lm, images)).logits


@pytest.mark.parametrize(("dtype", "int_dtype"), [(torch.bfloat16, torch.int16), (torch.float32, torch.int32)])
@pytest.mark.parametrize("bit", ["exponent", "sign", 3])
def test_activation_bit_flip_equals_flipping_the_bit_by_hand(images, dtype, int_dtype, bit):
    lm = _tiny("llava", dtype)
    clean = _site_output(lm, images)
    with ablate(lm, [f"{SITE}:5", f"{SITE}:17"], fault=f"bitflip:bit={bit}"):
        faulted = _site_output(lm, images)
    position = {"exponent": 14 if dtype == torch.bfloat16 else 30, "sign": 15 if dtype == torch.bfloat16 else 31}
    b = position.get(bit, bit)
    by_hand = clean.view(int_dtype).clone()
    flip = torch.tensor(1 << b, dtype=torch.int64).to(int_dtype)  # wraps to the sign bit for the top position
    by_hand[..., [5, 17]] ^= flip
    assert torch.equal(faulted.view(int_dtype), by_hand)
    assert torch.equal(faulted[..., :5], clean[..., :5])


def test_bit_flip_known_values():
    x = torch.tensor([0.5, 1.0, -2.0], dtype=torch.bfloat16)
    top = flip_bit(x, 14)
    assert top[0].item() == 2.0**127  # exponent 126 -> 254
    assert math.isinf(top[1].item())  # 1.0 has exponent 127: the flip makes it all ones, i.e. infinity
    assert flip_bit(x, 15).tolist() == [-0.5, -1.0, 2.0]
    f = torch.tensor([1.5], dtype=torch.float32)
    assert flip_bit(f, 22).item() == 1.0  # the mantissa's top bit holds the 0.5
    assert flip_bit(flip_bit(f, 30), 30).item() == 1.5


def _bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().view(torch.int32) for k, v in model.state_dict().items() if v.dtype == torch.float32}


@pytest.mark.parametrize("weights", ["largest", "all"])
def test_weight_bit_flip_is_a_real_flip_and_undone_bit_exactly_even_when_the_block_raises(llava, images, weights):
    before = _bits(llava.model)
    clean = _logits(llava, images)
    down = _module(llava, SITE)
    w = down.weight.detach().clone()
    with ablate(llava, [f"{SITE}:3"], fault=f"weight_bitflip:bit=exponent:weights={weights}"):
        flipped = down.weight.detach().clone()
        faulted = _logits(llava, images)
    changed = (flipped.view(torch.int32) != w.view(torch.int32)).nonzero().tolist()
    cols = [int(w[3].abs().argmax())] if weights == "largest" else list(range(w.shape[1]))
    assert changed == [[3, c] for c in cols]
    assert torch.equal(flipped[3, cols].view(torch.int32), w[3, cols].view(torch.int32) ^ (1 << 30))
    # the same computation with the weights flipped by hand in a copy of the model
    hand = _tiny("llava")
    with torch.no_grad():
        _module(hand, SITE).weight.copy_(flipped)
    assert torch.equal(_logits(hand, images), faulted)
    assert not torch.equal(faulted, clean)
    with pytest.raises(ZeroDivisionError):
        with ablate(llava, [f"{SITE}:3", "language.layers.1.mlp.down_proj.input:7"], fault="weight_bitflip"):
            assert not torch.equal(_module(llava, SITE).weight, w)
            raise ZeroDivisionError
    after = _bits(llava.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_logits(llava, images), clean)


def test_per_row_weight_flips_match_one_shared_flip(llava, images):
    """Row i of a per-row weight fault equals the in-place flip of row i's neurons (down_proj rows and columns)."""
    sets = [[f"{SITE}:3", f"{SITE}:9"], [], ["language.layers.1.mlp.down_proj.input:7"]]
    with ablate_rows(llava, sets, fault="weight_bitflip:bit=sign:weights=all"):
        together = _logits(llava, images)
    for i, neurons in enumerate(sets):
        with ablate(llava, neurons, fault="weight_bitflip:bit=sign:weights=all"):
            alone = _logits(llava, images[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[0], _logits(llava, images[:1]))
    # the same neurons in every row flip the weights in place, exactly as one shared mask does
    with ablate(llava, sets[0], fault="weight_bitflip:bit=sign:weights=all"):
        shared = _logits(llava, images)
    clean = _module(llava, SITE).weight.clone()
    with ablate_rows(llava, [sets[0]] * len(images), fault="weight_bitflip:bit=sign:weights=all"):
        assert torch.equal(_module(llava, SITE).weight[3], -clean[3])  # flipped in place
        assert torch.equal(_logits(llava, images), shared)
    assert torch.equal(_module(llava, SITE).weight, clean)


@pytest.fixture(scope="module")
def stats(llava, images):
    return activation_stats(
        llava, images, [SiteRegistry(llava.model).by_name[SITE]], generation=Generation(max_new_tokens=4)
    )


def test_stuck_at_sign_and_noise_equal_a_hand_written_forward(llava, images, stats):
    s = stats[SITE]

    def stuck(out):
        out[..., [2, 6]] = 2.5 * s.max[[2, 6]]
        return out

    def stuck_const(out):
        out[..., 2] = -7.0
        return out

    def sign(out):
        out[..., 4] = -out[..., 4]
        return out

    gen = torch.Generator().manual_seed(5)

    def noise(out):
        draw = torch.randn(out.shape, generator=gen)
        out[..., 4] = out[..., 4] + draw[..., 4] * (3.0 * s.std[4])
        return out

    cases = [
        ("stuck:at=max:factor=2.5", [2, 6], stuck),
        ("stuck:value=-7", [2], stuck_const),
        ("sign", [4], sign),
        ("noise:sigma=3:seed=5", [4], noise),
    ]
    clean = _logits(llava, images)
    for spec, idx, edit in cases:
        with ablate(llava, [f"{SITE}:{i}" for i in idx], fault=spec, stats=stats):
            faulted = _logits(llava, images)
        by_hand = _logits_with_hand_hook(llava, images, edit)
        assert torch.equal(faulted, by_hand), spec
        assert not torch.equal(faulted, clean), spec
    with ablate(llava, [f"{SITE}:4"], fault="noise:sigma=3:seed=5", stats=stats):
        again = _logits(llava, images)
    with ablate(llava, [f"{SITE}:4"], fault="noise:sigma=3:seed=6", stats=stats):
        other = _logits(llava, images)
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(again, _logits_with_hand_hook(llava, images, noise))
    assert not torch.equal(again, other)


def test_faults_that_need_statistics_say_so(llava):
    with pytest.raises(InputError, match="clean statistics"):
        ablate(llava, [f"{SITE}:1"], fault="stuck:at=max")
    with pytest.raises(InputError, match="clean statistics"):
        ablate(llava, [f"{SITE}:1"], fault="noise")


def test_activation_stats_match_a_direct_computation(llava, images, stats):
    site = SiteRegistry(llava.model).by_name[SITE]
    assert torch.equal(
        mean_activations(llava, images, [site])[SITE], activation_stats(llava, images, [site])[SITE].mean
    )
    s = stats[SITE]
    assert torch.all(s.min <= s.mean) and torch.all(s.mean <= s.max) and torch.all(s.std > 0)
    captions = generate_captions(llava, images, Generation(max_new_tokens=4))  # as the stats fixture's own
    forced = activation_stats(llava, images, [site], captions)
    rows = []
    handle = _module(llava, SITE).register_forward_hook(lambda _m, _a, out: rows.append(out[0]))
    try:
        for im, cap in zip(images, captions):
            enc = teacher_forcing_inputs(llava.processor, llava.kind, [im], [cap])
            enc.pop("labels")
            llava.model(**enc)
    finally:
        handle.remove()
    flat = torch.cat(rows).double()
    f = forced[SITE]
    torch.testing.assert_close(f.std, flat.std(0, unbiased=False).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(f.max, flat.max(0).values.float())
    torch.testing.assert_close(f.min, flat.min(0).values.float())
    torch.testing.assert_close(f.mean, s.mean, rtol=1e-5, atol=1e-6)


def test_a_protected_neuron_cannot_be_faulted(llava, images):
    clean = _logits(llava, images)
    guard = ProtectedSet((f"{SITE}:3",))
    with ablate(llava, [f"{SITE}:3"], fault="bitflip", protections=[guard]):
        assert torch.equal(_logits(llava, images), clean)
    with ablate(llava, [f"{SITE}:3"], fault="weight_bitflip", protections=[guard]):
        assert torch.equal(_logits(llava, images), clean)
    with ablate(llava, [f"{SITE}:3", f"{SITE}:4"], fault="sign", protections=[guard]):
        partly = _logits(llava, images)
    with ablate(llava, [f"{SITE}:4"], fault="sign"):
        assert torch.equal(partly, _logits(llava, images))


@pytest.mark.parametrize("kind", ["llava", "instructblip"])
def test_range_restriction_leaves_its_calibration_captions_bit_identical(images, kind):
    lm = _tiny(kind)
    registry = SiteRegistry(lm.model)
    stats = activation_stats(lm, images, "language", generation=Generation(max_new_tokens=8, batch_size=2))
    clean = generate_captions(lm, images, Generation(max_new_tokens=8))
    ranger = RangeRestriction(stats, margin=0.0)
    with ablate(lm, [], protections=[ranger]):
        assert generate_captions(lm, images, Generation(max_new_tokens=8)) == clean
    # and it clamps a fault: a huge stuck-at value ends at the channel's calibrated maximum
    name = registry.select("language.down_proj")[0].name
    with ablate(lm, [f"{name}:3"], fault="stuck:value=1e30", protections=[ranger]):
        out = _site_output(lm, images, name)
    assert torch.all(out[..., 3] == stats[name].max[3])


def test_bad_fault_specs_are_input_errors():
    with pytest.raises(InputError, match="unknown fault 'melt'"):
        parse_fault("melt")
    with pytest.raises(InputError, match="out of range for bfloat16"):
        check_fault("bitflip:bit=16", "bfloat16")
    check_fault("bitflip:bit=31", "float32")
    with pytest.raises(InputError, match="finite"):
        parse_fault("stuck:value=inf")
    with pytest.raises(InputError, match="finite"):
        parse_fault("stuck:value=nan")
    with pytest.raises(InputError, match="sign has no parameter 'bit'"):
        parse_fault("sign:bit=3")
    with pytest.raises(InputError, match="key=value"):
        parse_fault("noise:3")
    assert parse_fault("stuck:at=max:factor=2").spec() == "stuck:at=max:factor=2"


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("bitflip:bit=3.5", "bit '3.5' is not a bit"),  # the cases
        ("bitflip:bit=1e1", "bit '1e1' is not a bit"),
        ("weight_bitflip:bit=0x3", "bit '0x3' is not a bit"),
        ("noise:sigma=3:sigma=4", "sigma is given twice"),
        ("bitflip:bit=3:bit=5", "bit is given twice"),
        ("noise:seed=1.5", "seed must be a whole number"),
        ("noise:seed=9223372036854775808", "noise seed must be a whole number in [0, 2^63 - 1]"),
        ("noise:seed=-1", "noise seed"),
        ("noise:sigma=abc", "sigma must be a number"),
        ("stuck:value=3:colour=red", "stuck has no parameter 'colour'"),
    ],
)
def test_fault_parameters_are_read_in_the_type_their_fault_declares(spec, needle):
    with pytest.raises(InputError) as caught:
        check_fault(spec, "float32")
    assert needle in str(caught.value)


@pytest.mark.parametrize(
    "spec, dtype, fine",
    [
        ("stuck:value=1e39", "float32", False),  # finite in Python, inf in float32
        ("stuck:value=-1e39", "float32", False),
        ("stuck:value=1e38", "bfloat16", True),  # bfloat16 has nearly float32's range
        ("stuck:value=65519", "float16", True),  # rounds to float16's largest, 65504
        ("stuck:value=65520", "float16", False),  # rounds to inf
        ("stuck:value=70000", "float16", False),
        ("stuck:value=65504", "float16", True),
        ("stuck:at=max:factor=1e5", "float16", False),
        ("stuck:value=3e38", "float32", True),
    ],
)
def test_a_stuck_at_value_must_be_finite_in_the_models_dtype(spec, dtype, fine):
    if fine:
        check_fault(spec, dtype)
    else:
        with pytest.raises(InputError, match=f"infinite in {dtype}"):
            check_fault(spec, dtype)


def _check_all_dtypes(spec: str) -> None:
    for dtype in ("float32", "float16", "bfloat16"):
        fault = check_fault(spec, dtype)
        # a valid spec: its canonical spec string makes the same fault again
        assert check_fault(fault.spec(), dtype).spec() == fault.spec()


FAULT_SPECS = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda name, params: ":".join([name, *params]),
        st.sampled_from([*FAULTS, "zer0", ""]),
        st.lists(
            st.builds(
                lambda k, v: f"{k}={v}",
                st.sampled_from(["bit", "value", "at", "factor", "sigma", "seed", "by", "weights", "x", ""]),
                st.one_of(
                    st.sampled_from(["exponent", "sign", "mantissa", "max", "min", "all", "position", "largest"]),
                    st.integers(-(2**70), 2**70).map(str),
                    st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.text(max_size=5),
                ),
            ),
            max_size=3,
        ),
    ),
)


@settings(max_examples=400, deadline=None)
@given(FAULT_SPECS)
def test_any_string_is_a_valid_fault_spec_or_an_input_error(text):
    try:
        _check_all_dtypes(text)
    except InputError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.sampled_from(["bitflip:bit=1e1", "noise:sigma=nan", "bitflip:bit=7"]), FAULT_SPECS))
def test_any_fault_spec_on_the_command_line_is_one_line_and_exit_2_or_runs(cli, scene_dir, tmp_path, spec):
    args = ["--model", "toy-llava", "--images", scene_dir, "--out", tmp_path / "s", f"--fault={spec}", "--dry-run"]
    out = cli("search", *args)
    try:
        check_fault(spec, "float32")
    except InputError:
        assert out.code == 2 and len(out.err.strip().splitlines()) == 1, out.err
        assert out.err.startswith("canprobe: error:") and "Traceback" not in out.err
    else:
        assert out.code == 0 and "dry run" in out.out, out.err


@pytest.mark.parametrize("spec", ["sign", "stuck:at=min:factor=3", "bitflip:bit=exponent", "mean"])
def test_per_row_faults_equal_one_row_at_a_time_in_prompt_and_generation(llava, images, spec):
    """Each row of a batch with a different neuron set per row gets the captions its own fault gives alone."""
    sets = [[f"{SITE}:3", f"{SITE}:9"], [], [f"{SITE}:9", "language.layers.1.mlp.down_proj:20"]]
    every = activation_stats(llava, images, "language.down_proj", generation=Generation(max_new_tokens=4))
    with ablate_rows(llava, sets, fault=spec, stats=every):
        together = generate_captions(llava, images, Generation(max_new_tokens=6))
    alone = []
    for i, neurons in enumerate(sets):
        with ablate(llava, neurons, fault=spec, stats=every):
            alone += generate_captions(llava, images[i : i + 1], Generation(max_new_tokens=6))
    assert together == alone
    assert together[1] == generate_captions(llava, images[1:2], Generation(max_new_tokens=6))[0]
