import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canprobe.config import ExperimentConfig, SearchConfig, make_config, read_config_file
from canprobe.data import check_image_source
from canprobe.errors import InputError


def _config(**changes):
    values = {"model": "toy-llava", "images": "scenes"}
    values.update(changes)
    return make_config(values)


def test_defaults_and_round_trip():
    config = _config(alpha=1, scopes=["language.down_proj"])
    assert config.scoring.alpha == 1.0 and isinstance(config.scoring.alpha, float)
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
    assert make_config(read_config_file(path)).scoring.alpha == 0.5


def test_a_setting_given_by_its_former_name_reads_as_todays(tmp_path):
    """``ablation`` (0.1) is ``fault`` now: study files, sections and search configs still read it; both is twice."""
    path = tmp_path / "c.yaml"
    for text in ("ablation: sign\n", "evaluation: {ablation: sign}\n"):
        path.write_text("model: toy-llava\nimages: scenes\n" + text)
        assert make_config(read_config_file(path)).evaluation.fault == "sign"
    assert SearchConfig.of(ablation="sign").evaluation.fault == "sign"
    path.write_text("model: toy-llava\nimages: scenes\nfault: zero\nevaluation: {ablation: sign}\n")
    with pytest.raises(InputError, match="fault is given twice \\(once by its former name ablation\\)"):
        read_config_file(path)


def test_a_study_file_may_group_its_fields_in_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {model: toy-llava, dtype: bfloat16}\ndata: {images: scenes, images_per_category: 3}\n"
        "scoring: {alpha: 0.5}\nsearch: {collapse_ppl_ratio: 50}\nevaluation: {fault: mean}\n"
        "study: {scopes: [language.gate_proj]}\nseed: 7\n"
    )
    nested = make_config(read_config_file(path))
    flat = _config(
        dtype="bfloat16",
        images_per_category=3,
        alpha=0.5,
        collapse_ppl_ratio=50.0,
        fault="mean",
        scopes=["language.gate_proj"],
        seed=7,
    )
    assert nested == flat and nested.scoring.alpha == 0.5 and nested.evaluation.fault == "mean"
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
        check_image_source(_config(images=str(tmp_path / "missing")).data)
    (tmp_path / "imgs" / "car").mkdir(parents=True)
    with pytest.raises(InputError, match="car"):
        check_image_source(_config(images=str(tmp_path / "imgs")).data)
    counts = check_image_source(_config(images=str(scene_dir), categories=["car", "fish"]).data)
    assert counts == {"car": 2, "fish": 2}
    with pytest.raises(InputError, match="dragon"):
        check_image_source(_config(images=str(scene_dir), categories=["dragon"]).data)


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
    "inspect": {"activations", "ratio"},
    "caption": {"out"},
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


def test_library_entry_points_take_the_sections_whole():
    """No entry point takes a setting of the sections it reads one by one: a new setting needs no new parameter,
    and a section given by default is the section of the table's defaults."""
    import inspect

    from canprobe.ablation import activation_stats, fault_stats
    from canprobe.captions import caption_image_set, generate_captions
    from canprobe.config import SETTINGS, Evaluation, Generation, Scoring, SearchConfig, names
    from canprobe.evaluation import MaskEvaluator, PrefixCache, caption_ppl
    from canprobe.features import FeatureCache
    from canprobe.massive import massive_activations
    from canprobe.neurons import record_neurons, study_view
    from canprobe.scoring import folder_ranking, score_identity, score_inputs, score_neurons
    from canprobe.search import find_k_star

    entries = (generate_captions, caption_image_set, caption_ppl, MaskEvaluator, PrefixCache, FeatureCache)
    entries += (activation_stats, fault_stats, massive_activations, record_neurons, study_view)
    entries += (score_neurons, score_inputs, score_identity, folder_ranking, find_k_star)
    loose = set(names(Generation)) | set(names(Scoring)) | set(names(Evaluation)) | {"kind", "means"}
    sections = 0
    for func in entries:
        for name, param in inspect.signature(func).parameters.items():
            assert name not in loose, (func.__name__, name)
            if isinstance(param.default, (Generation, Scoring, Evaluation, SearchConfig)):
                assert param.default == type(param.default)(), (func.__name__, name)
                sections += 1
    assert sections >= 14
    search = SearchConfig()
    assert (search.generation.max_new_tokens, search.generation.batch_size) == (SETTINGS["max_new_tokens"].default, 16)
    study = _config()
    assert (study.generation.max_new_tokens, study.generation.batch_size, study.scoring.seed) == (24, 16, 0)


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
    assert make_config(read_config_file(path)).scoring.alpha == 1.0


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


def test_options_shared_by_commands_have_one_default_and_one_help():
    """Every command's --help shows a shared option with the same help text and the same default."""
    import click

    from canprobe.cli import main
    from canprobe.config import SETTINGS

    seen: dict[str, dict[str, set]] = {}
    for name in COMMAND_ONLY:  # the commands that probe a model (--out names what each one writes)
        for param in main.commands[name].params:
            if not isinstance(param, click.Option) or param.name in COMMAND_ONLY[name] | {"out"}:
                continue
            if (name, param.name) in OWN_DEFAULTS:
                continue
            shown = param.show_default if isinstance(param.show_default, str) else param.default
            entry = seen.setdefault(param.name, {"help": set(), "default": set(), "commands": set()})
            entry["help"].add(param.help)
            entry["default"].add(None if shown is None else str(shown))
            entry["commands"].add(name)
    shared = {k: v for k, v in seen.items() if len(v["commands"]) > 1}
    assert {"batch_size", "prompt", "max_new_tokens", "dtype", "sites", "trust_remote_code"} <= shared.keys()
    assert shared["batch_size"]["commands"] >= {"inspect", "caption", "score", "search", "ablate", "run"}
    for name, entry in shared.items():
        assert entry["help"] == {SETTINGS[name].help}, name
        default = SETTINGS[name].default
        assert entry["default"] == {None if default is None else str(default)}, (name, entry["default"])


def test_a_study_sets_every_search_setting():
    study = _config(growth=3.0, k_per_round=2, max_k=24, grid_max=8, grid_per_octave=2, n_samples=1)
    search = study.search_config("language.down_proj", None, "curve")
    assert search.search == study.search and search.generation == study.generation
    assert (search.search.growth, search.search.k_per_round, search.search.max_k, search.search.n_samples) == (
        3.0,
        2,
        24,
        1,
    )
    assert search.to_dict()["growth"] == 3.0 and search.seed == study.scoring.seed
    with pytest.raises(InputError, match="unknown search setting"):
        SearchConfig.of(growht=3.0)


def test_each_setting_is_in_one_section_object():
    """The section objects are the table: every setting is a field of exactly one section."""
    import dataclasses

    from canprobe.config import (
        SETTINGS,
        CollapseCriterion,
        Data,
        Evaluation,
        Faults,
        Generation,
        Model,
        Scoring,
        Search,
        Study,
    )

    sections = (Model, Data, Generation, Scoring, CollapseCriterion, Search, Evaluation, Faults, Study)
    probe = [n for n, s in SETTINGS.items() if s.section == "probe"]  # a search's own: scope and its control
    fields = [f.name for cls in sections for f in dataclasses.fields(cls) if f.name in SETTINGS] + probe
    assert sorted(fields) == sorted(set(SETTINGS)) and len(fields) == len(SETTINGS)
    assert {n for n, s in SETTINGS.items() if not s.identity} >= {"device", "batch_size", "out", "n_samples"}
