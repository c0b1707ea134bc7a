"""The command line: results on success, one line and exit code 2 on bad input."""

import json

from canprobe.organisms.scenes import CATEGORIES


def _one_line_error(result, *needles):
    assert result.code == 2, (result.code, result.out, result.err)
    lines = [x for x in result.err.splitlines() if x.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("canprobe: error:")
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_scenes_command(cli, tmp_path):
    result = cli("scenes", "--out", tmp_path / "s", "--per-category", 2, "--seed", 4)
    assert result.code == 0, result.err
    assert f"wrote {2 * len(CATEGORIES)} scenes" in result.out
    assert len(list((tmp_path / "s").glob("*/*.png"))) == 2 * len(CATEGORIES)


def test_caption_command_writes_json_lines(cli, scene_dir, tmp_path):
    out = tmp_path / "caps.jsonl"
    result = cli("caption", "--model", "toy-llava", "--images", scene_dir, "--out", out, "--batch-size", 5)
    assert result.code == 0, result.err
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 2 * len(CATEGORIES)
    assert {r["category"] for r in records} == set(CATEGORIES)
    assert sum(r["caption"] == r["reference"] for r in records) >= len(records) // 2
    assert "exact match with reference captions" in result.out


def test_unreadable_images_are_reported_not_fatal(cli, scene_dir, tmp_path):
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(scene_dir, root)
    (root / "car" / "broken.jpg").write_text("garbage")
    result = cli("caption", "--model", "toy-instructblip", "--images", root, "--out", tmp_path / "c.jsonl")
    assert result.code == 0, result.err
    assert "skipped 1 unreadable image" in result.err and "broken.jpg" in result.err
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 2 * len(CATEGORIES)


def test_unknown_model_lists_builtins(cli, scene_dir):
    result = cli("caption", "--model", "toy-lava", "--images", scene_dir)
    _one_line_error(result, "toy-llava", "toy-instructblip", "network")


def test_missing_and_empty_image_folders(cli, tmp_path):
    _one_line_error(cli("caption", "--model", "toy-llava", "--images", tmp_path / "none"), "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(cli("caption", "--model", "toy-llava", "--images", tmp_path / "empty"), "no readable")


def test_non_positive_counts(cli, tmp_path, scene_dir):
    _one_line_error(cli("scenes", "--out", tmp_path, "--per-category", 0), "--per-category")
    _one_line_error(cli("caption", "--model", "toy-llava", "--images", scene_dir, "--batch-size", -2), "--batch-size")


def test_text_only_model_cannot_caption(cli, tmp_path, scene_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from canprobe.organisms.build import build_tokenizer

    tok = build_tokenizer()
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    _one_line_error(cli("caption", "--model", tmp_path / "lm", "--images", scene_dir), "vision-language")


def test_unsupported_architecture_names_supported_ones(cli, tmp_path, scene_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "g")
    _one_line_error(cli("caption", "--model", tmp_path / "g", "--images", scene_dir), "gpt2", "llava")


def test_search_without_ranking_scores_with_its_own_tokens_and_batch_size(cli, scene_dir, tmp_path):
    from canprobe.scoring import load_scores

    out = tmp_path / "search"
    args = ["--images", scene_dir, "--out", out, "--max-k", 1, "--grid-per-octave", 0]
    result = cli("search", "--model", "toy-llava", *args, "--max-new-tokens", 7, "--batch-size", 5)
    assert result.code == 0, result.err
    config = load_scores(out).config
    assert (config["max_new_tokens"], config["batch_size"]) == (7, 5)
