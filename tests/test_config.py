import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canprobe.config import ExperimentConfig, check_image_source, make_config, read_config_file
from canprobe.errors import InputError


def _config(**changes):
    values = {"model": "toy-llava", "images": "scenes"}
    values.update(changes)
    return make_config(values)


def test_defaults_and_round_trip():
    config = _config(alpha=1, scopes=["language.down_proj"])
    assert config.alpha == 1.0 and isinstance(config.alpha, float)
    assert make_config(config.to_dict()) == config


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"alpah": 0.5}, "alpah"),
        ({"alpha": "high"}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"scopes": "language.down_proj"}, "scopes"),
        ({"batch_size": 0}, "batch_size"),
        ({"per_category": "yes"}, "per_category"),
        ({"method": "magic"}, "method"),
        ({"controls": ["random", "vibes"]}, "controls"),
        ({"collapse_clip_ratio": 2}, "collapse_clip_ratio"),
        ({"model": None}, "model"),
    ],
)
def test_bad_fields_are_named(changes, field):
    with pytest.raises(InputError, match=field):
        _config(**changes)


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\nimages: x\n")
    with pytest.raises(InputError, match="YAML"):
        read_config_file(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(InputError, match="mapping"):
        read_config_file(path)
    path.write_text("model: toy-llava\nimages: scenes\nalpha: 0.5\n")
    assert make_config(read_config_file(path)).alpha == 0.5


def test_a_study_file_may_group_its_fields_in_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {model: toy-llava, dtype: bfloat16}\ndata: {images: scenes, images_per_category: 3}\n"
        "scoring: {alpha: 0.5}\nsearch: {collapse_ppl_ratio: 50}\nevaluation: {ablation: mean}\n"
        "study: {scopes: [language.gate_proj]}\nseed: 7\n"
    )
    nested = make_config(read_config_file(path))
    flat = _config(
        dtype="bfloat16",
        images_per_category=3,
        alpha=0.5,
        collapse_ppl_ratio=50.0,
        ablation="mean",
        scopes=["language.gate_proj"],
        seed=7,
    )
    assert nested == flat and nested.alpha == 0.5 and nested.ablation == "mean"
    for text, match in [
        ("scoring: {dtype: bfloat16}", "section scoring: 'dtype' is not one of its fields"),
        ("alpha: 0.5\nscoring: {alpha: 0.2}", "alpha is given twice"),
        ("scoring: {alpha: 0.2}\nalpha: 0.5", "alpha is given twice"),
    ]:
        path.write_text(f"model: toy-llava\nimages: scenes\n{text}\n")
        with pytest.raises(InputError, match=match):
            read_config_file(path)


def test_image_source_checked_before_loading(tmp_path, scene_dir):
    with pytest.raises(InputError, match="images"):
        check_image_source(_config(images=str(tmp_path / "missing")))
    (tmp_path / "imgs" / "car").mkdir(parents=True)
    with pytest.raises(InputError, match="car"):
        check_image_source(_config(images=str(tmp_path / "imgs")))
    counts = check_image_source(_config(images=str(scene_dir), categories=["car", "fish"]))
    assert counts == {"car": 2, "fish": 2}
    with pytest.raises(InputError, match="dragon"):
        check_image_source(_config(images=str(scene_dir), categories=["dragon"]))


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "model",
                "images",
                "alpha",
                "scopes",
                "batch_size",
                "controls",
                "seed",
                "junk",
                "method",
                "stage1_ppl_ratio",
            ]
        ),
        st.one_of(yaml_scalars, st.lists(yaml_scalars, max_size=3)),
    )
)
def test_any_mapping_is_a_config_or_an_input_error(values):
    try:
        config = make_config(values)
    except InputError:
        return
    assert isinstance(config, ExperimentConfig)
    assert make_config(config.to_dict()) == config


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_yaml_text_is_read_or_refused(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_text(text)
    try:
        data = read_config_file(path)
    except InputError:
        return
    assert isinstance(data, dict)


# options that are not settings: what a command reads or writes, what it prints, how it runs
COMMAND_ONLY = {
    "score": {"out", "top", "dry_run"},
    "search": {"ranking", "dry_run"},
    "ablate": {"neurons", "top_k", "ranking"},
    "run": {"config_file", "restart", "dry_run"},
}
# ablate --scope only filters a given ranking: without it, every neuron of the ranking counts
OWN_DEFAULTS = {("ablate", "scope"): None}


@pytest.mark.parametrize("command", sorted(COMMAND_ONLY))
def test_each_option_is_one_setting_with_its_one_default_and_choices(command):
    import click

    from canprobe.cli import main
    from canprobe.config import SETTINGS, config_fields

    names = set()
    for param in main.commands[command].params:
        if param.name in COMMAND_ONLY[command]:
            continue
        names.add(param.name)
        setting = SETTINGS[param.name]  # a KeyError names an option that is no setting
        if command == "run":
            assert param.default is None  # the study config's default (or the config file) applies
        elif not param.required:
            assert param.default == OWN_DEFAULTS.get((command, param.name), setting.default), param.name
        if isinstance(param.type, click.Choice):
            assert tuple(param.type.choices) == setting.choices, param.name
    if command == "run":
        assert names == set(config_fields())


def test_library_entry_points_share_the_settings_defaults():
    import inspect

    from canprobe.ablation import activation_stats
    from canprobe.captions import generate_captions
    from canprobe.config import SETTINGS, SearchConfig
    from canprobe.evaluation import MaskEvaluator, caption_ppl
    from canprobe.scoring import score_neurons

    # the keyword arguments that are the settings themselves (``protections`` there are objects, not names)
    shared = ("scope", "method", "alpha", "reduction", "seed", "batch_size", "max_new_tokens", "ppl_scorer", "ablation")
    checked = 0
    for func in (score_neurons, generate_captions, activation_stats, MaskEvaluator, caption_ppl):
        for name, param in inspect.signature(func).parameters.items():
            if name in shared and param.default is not inspect.Parameter.empty:
                assert param.default == SETTINGS[name].default, (func.__name__, name)
                checked += 1
    assert checked >= 12
    search = SearchConfig()
    assert (search.max_new_tokens, search.batch_size) == (SETTINGS["max_new_tokens"].default, 16)
    study = _config()
    assert (study.max_new_tokens, study.batch_size, study.seed) == (24, 16, 0)


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"seed": 2**63}, "config field seed"),  # the case
        ({"seed": -1}, "config field seed"),
        ({"scopes": ["language.down_proj", "language.down_proj"]}, "'language.down_proj' is given twice"),
        ({"fault_counts": [1, 2, 2]}, "config field fault_counts: 2 is given twice"),
        ({"categories": ["car", "car"]}, "config field categories: 'car' is given twice"),
        ({"faults": ["stuck:value=1e39"]}, "infinite in float32"),
        ({"faults": ["stuck:value=1000000"], "dtype": "float16"}, "infinite in float16"),
        ({"random_fault": "bitflip:bit=3.5"}, "is not a bit"),
    ],
)
def test_numbers_and_lists_are_checked_in_the_type_and_range_of_their_use(changes, needle):
    with pytest.raises(InputError) as caught:
        _config(**changes)
    assert needle in str(caught.value)
    _config(seed=2**63 - 1)  # the largest int64 is a seed


@pytest.mark.parametrize("text", ["scoring:\n", "scoring:\nsearch: {}\n"])
def test_an_empty_section_is_an_empty_section_not_an_unknown_field(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text("model: toy-llava\nimages: scenes\n" + text)
    assert make_config(read_config_file(path)).alpha == 1.0


@pytest.mark.parametrize(
    "args",
    [
        ("inspect", "toy-llava", "--activations", "--images", "IMAGES", "--ratio", "nan"),  # the case
        ("score", "--model", "toy-llava", "--images", "IMAGES", "--alpha", "nan", "--dry-run"),
        ("search", "--model", "toy-llava", "--images", "IMAGES", "--out", "OUT", "--growth", "inf", "--dry-run"),
        ("score", "--model", "toy-llava", "--images", "IMAGES", "--seed", str(2**64), "--dry-run"),
        ("run", "--model", "toy-llava", "--images", "IMAGES", "--out", "OUT", "--seed", str(2**63), "--dry-run"),
        ("run", "--model", "toy-llava", "--images", "IMAGES", "--out", "OUT", "--alpha", "nan", "--dry-run"),
    ],
)
def test_non_finite_and_out_of_range_numbers_on_the_command_line_are_one_line(cli, scene_dir, tmp_path, args):
    args = [str(scene_dir) if a == "IMAGES" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = cli(*args)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, (result.out, result.err)
