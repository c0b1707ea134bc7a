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
