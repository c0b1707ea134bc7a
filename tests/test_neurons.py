"""The neuron view against hand computations, on tiny random models whose activations a hook sets to a
known pattern: per-position means, image-token rows and vision rows mapped to patches (LLaVA; Qwen2-VL with
its merged patches, checked against the processor's own patch order; PaliGemma, Gemma 3's pooled tokens and
Idefics3's pixel-shuffled whole image, checked against the patches each token's input depends on), consistency."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from canprobe.config import Generation
from canprobe.inputs import teacher_forcing_inputs
from canprobe.models import LoadedModel
from canprobe.neurons import NeuronView, patch_map, position_profile, record_neurons, spread_images, top_neurons
from canprobe.organisms.scenes import make_scenes
from canprobe.sites import SiteRegistry
from tests.conftest import TINY

CHANNEL = 3
SCALE = (1000.0, 0.0, 1000.0, 0.0)  # the pattern's size per image: large on even images, zero on odd ones
CAPTIONS = ["a red car", "a small tree on the left", "a boat", "a fish"]


def _pattern(module: torch.nn.Module, store: list, flat: bool = False):
    """A forward hook that sets channel CHANNEL to (row index + 1) x the image's SCALE (``flat``: the global
    row of a batch-less sequence), and keeps the tensor the model goes on with."""

    def hook(_m, _args, out):
        out = out.clone()
        offset = sum(s.shape[0] for s in store)  # rows (images, or a flat sequence's rows) of earlier batches
        if flat:
            out[:, CHANNEL] = torch.arange(offset, offset + out.shape[0], dtype=out.dtype)
        else:
            rows = torch.arange(out.shape[1], dtype=out.dtype) + 1
            scale = torch.tensor(SCALE[offset : offset + out.shape[0]], dtype=out.dtype)
            out[:, :, CHANNEL] = scale[:, None] * rows
        store.append(out.detach())
        return out

    return module.register_forward_hook(hook)


@pytest.fixture(scope="module")
def llava():
    from canprobe.organisms.build import build_llava

    torch.manual_seed(0)
    model, processor = build_llava(dataclasses.replace(TINY, image_size=32))  # a 4 x 4 patch grid
    return LoadedModel(model.eval(), processor, "llava", "tiny-llava")


def _view(lm, addresses, sites, images, **kwargs):
    registry = SiteRegistry.of(lm.model)
    stores = [[] for _ in sites]
    handles = [_pattern(registry.module(registry.by_name[s]), store, flat) for (s, flat), store in zip(sites, stores)]
    try:
        names = [f"c{i}/{i}.png" for i in range(len(images))]
        view = record_neurons(lm, images, names, addresses, captions=CAPTIONS[: len(images)], **kwargs)
    finally:
        for h in handles:
            h.remove()
    return view, stores


def test_llava_positions_patches_and_consistency_equal_a_hand_computation(llava):
    images = [im for im, _ in make_scenes(4, seed=2)]
    site = "language.layers.0.mlp.down_proj"
    address = f"{site}:{CHANNEL}"
    view, (stores,) = _view(llava, [address, f"{site}:0"], [(site, False)], images, generation=Generation(batch_size=3))
    rows, ids = [], None  # each image's attended rows of the site, as the model computed them
    for start, out in zip((0, 3), stores):
        enc = teacher_forcing_inputs(
            llava.processor, llava.family, images[start : start + 3], CAPTIONS[start : start + 3]
        )
        rows += [o[m] for o, m in zip(out, enc["attention_mask"].bool())]
        ids = enc["input_ids"][0] if ids is None else ids
    table = view.table[view.table["neuron"] == address]

    # per-position means: the pattern is (position + 1) x SCALE[image] on every attended token
    lengths = [len(r) for r in rows]
    profile = position_profile(table).set_index("position")
    for t in range(max(lengths)):
        have = [SCALE[i] * (t + 1) for i in range(4) if lengths[i] > t]
        assert profile.loc[t, "mean"] == pytest.approx(np.mean(have))
        assert profile.loc[t, "count"] == len(have)
    # kinds: the first token, the image tokens, the caption (labels), the prompt between
    image_id = llava.model.config.image_token_id
    first = table[table["image"] == "c0/0.png"].set_index("position")
    is_image = (ids[: lengths[0]] == image_id).numpy()
    p0 = int(is_image.argmax())
    assert first.loc[0, "kind"] == "first token" and is_image.sum() == 16
    assert (first["kind"].to_numpy()[is_image] == "image").all()
    assert set(first["kind"]) == {"first token", "prompt", "image", "caption"}

    # patch map: image token k is patch (k // 4, k % 4) of CLIP's row-major 4 x 4 grid
    grid = patch_map(first.reset_index())
    assert grid.shape == (4, 4)
    np.testing.assert_allclose(grid, SCALE[0] * (p0 + 1 + np.arange(16)).reshape(4, 4))
    assert patch_map(table[table["image"] == "c1/1.png"]).max() == 0.0

    # consistency: the channel is the site's most active on even images and silent on odd ones
    stats = {s["neuron"]: s for s in view.stats}
    assert stats[address]["activity_rank"][0] == 0 and stats[address]["activity_rank"][2] == 0
    assert stats[address]["consistency"] == 0.5
    # the other neuron, by hand: mean |a| over each image's attended rows, ranked within the site
    ranks = []
    for r in rows:
        activity = r.abs().mean(0)
        ranks.append(int((activity > activity[0]).sum()))
    assert stats[f"{site}:0"]["activity_rank"] == ranks
    assert stats[f"{site}:0"]["consistency"] == np.mean([r < view.most_active for r in ranks])
    longest = max(range(4), key=lambda i: SCALE[i] * lengths[i])
    assert stats[address]["max"] == SCALE[longest] * lengths[longest]
    assert (stats[address]["max_image"], stats[address]["max_position"]) == (
        f"c{longest}/{longest}.png",
        lengths[longest] - 1,
    )
    assert stats[address]["max_kind"] == "caption"


def test_llava_vision_rows_are_the_class_token_then_the_patch_grid(llava):
    images = [im for im, _ in make_scenes(2, seed=4)]
    site = "vision.layers.1.mlp.fc2"
    view, _ = _view(llava, [f"{site}:{CHANNEL}"], [(site, False)], images)
    first = view.table[view.table["image"] == "c0/0.png"]
    assert first["kind"].tolist() == ["class token"] + ["patch"] * 16
    np.testing.assert_allclose(patch_map(first), SCALE[0] * (2 + np.arange(16)).reshape(4, 4))


@pytest.fixture(scope="module")
def qwen():
    from tests.new_family_builders import build_qwen2_vl

    torch.manual_seed(0)
    model, processor = build_qwen2_vl()
    pixels = 64 * 32  # a 64 x 32 image stays that size: 4 x 8 patches of 8 pixels, merged 2 x 2 into 2 x 4 tokens
    processor.image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    return LoadedModel(model.eval(), processor, "qwen2_vl", "tiny-qwen2-vl")


def _patch_ids(processor, image: Image.Image) -> np.ndarray:
    """Per row of the processor's pixel sequence, the patch it holds (row-major in the image), read from the
    pixels of an image whose every 8 x 8 patch has its own grey level."""
    rows = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    levels = rows.mean(-1).numpy()
    return np.argsort(np.argsort(levels))  # the grey level rises with the patch's row-major index


def _graded(shift: int) -> Image.Image:
    grid = (np.arange(32).reshape(4, 8) * 7 + shift).astype(np.uint8)
    return Image.fromarray(np.kron(grid, np.ones((8, 8), dtype=np.uint8))).convert("RGB")


def test_qwen_vl_vision_rows_and_merged_image_tokens_map_to_the_processors_patches(qwen):
    images = [_graded(0), _graded(20)]
    truth = [_patch_ids(qwen.processor, im) for im in images]
    vision, language = "vision.layers.0.mlp.fc2", "language.layers.1.mlp.down_proj"
    view, stores = _view(
        qwen, [f"{vision}:{CHANNEL}", f"{language}:{CHANNEL}"], [(vision, True), (language, False)], images
    )
    for i in range(2):
        rows = view.table[(view.table["image"] == f"c{i}/{i}.png") & (view.table["neuron"] == f"{vision}:{CHANNEL}")]
        assert len(rows) == 32 and (rows["kind"] == "patch").all()
        expected = np.empty(32)
        expected[truth[i]] = 32 * i + np.arange(32)  # the pattern: the row's index in the batch's one sequence
        np.testing.assert_allclose(patch_map(rows), expected.reshape(4, 8))
        # merged: image token k holds vision rows 4k..4k+3, whose patches make one 2 x 2 cell of the 2 x 4 grid
        tokens = view.table[
            (view.table["image"] == f"c{i}/{i}.png") & (view.table["neuron"] == f"{language}:{CHANNEL}")
        ]
        image = tokens[tokens["kind"] == "image"]
        assert len(image) == 8
        cells = [{(p // 8 // 2, p % 8 // 2) for p in truth[i][4 * k : 4 * k + 4]} for k in range(8)]
        assert all(len(c) == 1 for c in cells)
        expected = np.empty((2, 4))
        for k, (cell,) in enumerate(cells):
            expected[cell] = SCALE[i] * (image["position"].iloc[k] + 1)
        np.testing.assert_allclose(patch_map(tokens), expected)


def test_large_patch_grids_pool_to_the_drawn_side_and_skip_empty_cells():
    import pandas as pd

    h, w = 48, 24
    values = np.arange(h * w, dtype=float)
    rows = pd.DataFrame({"cell": np.r_[-1, np.arange(h * w)], "value": np.r_[99.0, values]})
    rows["grid_rows"], rows["grid_cols"] = h, w
    pooled = patch_map(rows, side=12)
    assert pooled.shape == (12, 6)
    by_hand = values.reshape(12, 4, 6, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(pooled, by_hand)
    missing = rows[rows["cell"] != 5]  # one patch no row covers: its block averages the others
    block = np.delete(values.reshape(12, 4, 6, 4)[0, :, 1, :].ravel(), 1)  # cell 5: row 0, column 1 of block (0, 1)
    assert patch_map(missing, side=12)[0, 1] == pytest.approx(block.mean())
    assert np.isnan(patch_map(missing)[0, 5])


def test_images_spread_over_categories_and_the_default_set_is_k_star_capped(tmp_path, llava):
    import pandas as pd

    names = [f"{c}/{i}.png" for c in ("boat", "car", "fish") for i in range(3)]
    assert [names[i] for i in spread_images([n.split("/")[0] for n in names], 4)] == [
        "boat/0.png",
        "car/0.png",
        "fish/0.png",
        "boat/1.png",
    ]
    ranking = pd.DataFrame({"address": [f"a:{i}" for i in range(40)], "rank": np.arange(40, 0, -1)})
    assert top_neurons(ranking, 3)["address"].tolist() == ["a:39", "a:38", "a:37"]
    assert len(top_neurons(ranking, 30)) == 16 and len(top_neurons(ranking, None)) == 4
    assert len(top_neurons(ranking, None, top=5)) == 5
    images = [im for im, _ in make_scenes(2, seed=4)]
    view, _ = _view(llava, ["vision.layers.0.mlp.fc1:1"], [], images)
    view.save(tmp_path)
    back = NeuronView.load(tmp_path)
    pd.testing.assert_frame_equal(back.table, view.table)
    assert back.stats == view.stats and back.images == view.images
    assert NeuronView.load(tmp_path / "none") is None


def test_neuron_files_record_their_format_and_earlier_ones_read(tmp_path):
    """neurons.parquet (schema metadata) and neurons.json carry the format; files without one (format 1)
    read, and a newer format of either is refused in one line."""
    import json

    import pandas as pd
    import pyarrow.parquet as pq

    from canprobe.errors import CanprobeError
    from canprobe.neurons import TABLE_COLUMNS
    from canprobe.runfolder import FORMAT

    row = {"neuron": "a:1", "image": 0, "position": 0, "kind": "first", "value": 2.5, "cell": -1}
    table = pd.DataFrame([{**row, "grid_rows": -1, "grid_cols": -1}], columns=list(TABLE_COLUMNS))
    view = NeuronView(table, [{"neuron": "a:1", "mean": 2.5}], ["car/0.png"], scopes={"s": {"k_star": 1}})
    view.save(tmp_path)
    assert json.loads(pq.read_schema(tmp_path / "neurons.parquet").metadata[b"format"]) == FORMAT
    assert json.loads((tmp_path / "neurons.json").read_text())["format"] == FORMAT
    old = tmp_path / "old"
    old.mkdir()
    table.to_parquet(old / "neurons.parquet", index=False)  # as written before formats were recorded
    meta = json.loads((tmp_path / "neurons.json").read_text())
    del meta["format"]
    (old / "neurons.json").write_text(json.dumps(meta))
    back = NeuronView.load(old)
    pd.testing.assert_frame_equal(back.table, table)
    assert back.stats == view.stats and back.scopes == view.scopes
    for name in ("neurons.parquet", "neurons.json"):
        newer = tmp_path / f"newer-{name}"
        newer.mkdir()
        table.to_parquet(newer / "neurons.parquet", index=False)
        (newer / "neurons.json").write_text(json.dumps(meta))
        if name == "neurons.json":
            (newer / name).write_text(json.dumps({**meta, "format": FORMAT + 1}))
        else:
            stamped = pq.read_table(newer / name).replace_schema_metadata({b"format": str(FORMAT + 1).encode()})
            pq.write_table(stamped, newer / name)
        with pytest.raises(CanprobeError, match=f"{name} was written in artifact format {FORMAT + 1}") as caught:
            NeuronView.load(newer)
        assert "upgrade canprobe" in str(caught.value) and "\n" not in str(caught.value)


def _graded_square(side: int, patch: int) -> Image.Image:
    """A ``side`` x ``side`` grid of ``patch``-pixel patches, each its own grey level, rising row by row."""
    grid = (np.arange(side * side).reshape(side, side) * (250 // (side * side))).astype(np.uint8)
    return Image.fromarray(np.kron(grid, np.ones((patch, patch), dtype=np.uint8))).convert("RGB")


def _token_pixels(lm: LoadedModel, image: Image.Image, encoder: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The processed pixels of ``image`` [..., 3, H, W] and, per image token in order, the mask [..., H, W] of the
    pixels its language-model input depends on, as the model computes it: the vision encoder (class ``encoder``)
    made an identity (its attention would mix every patch), the gradient of the token's input to the decoder."""
    model = lm.model
    enc = lm.family.inputs(lm.processor, [image], lm.family.prompts(lm.processor, ["a"]))
    pixels = enc["pixel_values"].requires_grad_(True)
    embeds = []

    def identity(_m, args, kwargs, out):
        out.last_hidden_state = kwargs.get("inputs_embeds", args[0] if args else None)
        return out

    def keep(_m, args, kwargs):
        embeds.append(kwargs["inputs_embeds"])

    layers = next(m for m in model.modules() if type(m).__name__ == encoder)
    handles = [
        layers.register_forward_hook(identity, with_kwargs=True),
        model.get_decoder().register_forward_pre_hook(keep, with_kwargs=True),
    ]
    try:
        model(**enc)
    finally:
        for h in handles:
            h.remove()
    positions = (enc["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    masks = [torch.autograd.grad(embeds[0][0, p].sum(), pixels, retain_graph=True)[0][0] for p in positions]
    return pixels.detach()[0], [m.abs().sum(-3) > 0 for m in masks]


def _token_patches(lm: LoadedModel, image: Image.Image) -> list[set[int]]:
    """Per image token, the patches (row-major indices in a graded image) it depends on, named by their levels."""
    pixels, masks = _token_pixels(lm, image, "SiglipEncoder")
    values = pixels.mean(-3)
    levels = np.unique(values.numpy())  # one level per patch, rising with its index
    return [{int(np.searchsorted(levels, v)) for v in np.unique(values[m].numpy())} for m in masks]


@pytest.mark.parametrize(
    ("family", "side", "pool"),
    [("paligemma", 4, 1), ("gemma3", 6, 2)],  # PaliGemma: a token per patch; Gemma 3: 6 x 6 patches pooled to 3 x 3
)
def test_gemma_image_tokens_map_to_the_patches_the_model_reads_them_from(family, side, pool):
    from tests.new_family_builders import SIGLIP, build_gemma3, build_paligemma

    torch.manual_seed(0)
    patch = SIGLIP["patch_size"]
    if family == "paligemma":
        model, processor = build_paligemma(image_size=side * patch)
    else:
        model, processor = build_gemma3(image_size=side * patch, tokens=(side // pool) ** 2)
    lm = LoadedModel(model.eval(), processor, family, f"tiny-{family}")
    image = _graded_square(side, patch)
    sources = _token_patches(lm, image)
    n = side // pool
    assert len(sources) == n * n
    cells = []  # the truth: token k reads one pool x pool block of patches, whose place on the n x n grid is its cell
    for patches in sources:
        blocks = {(p // side // pool, p % side // pool) for p in patches}
        assert len(patches) == pool * pool and len(blocks) == 1
        ((r, c),) = blocks
        cells.append(r * n + c)
    assert sorted(cells) == list(range(n * n))

    site = "language.layers.0.mlp.down_proj"
    view, _ = _view(lm, [f"{site}:{CHANNEL}"], [(site, False)], [image])
    tokens = view.table[view.table["kind"] == "image"]
    assert tokens["cell"].tolist() == cells
    assert (tokens["grid_rows"] == n).all() and (tokens["grid_cols"] == n).all()
    expected = np.empty(n * n)
    expected[cells] = SCALE[0] * (tokens["position"].to_numpy() + 1)
    np.testing.assert_allclose(patch_map(view.table), expected.reshape(n, n))


@pytest.mark.parametrize("split", [True, False])
def test_idefics3_whole_image_tokens_map_to_the_cells_the_model_reads_them_from(split):
    """A 32-pixel image: 2 x 2 crops of 16 pixels and the whole image resized to 16 (``split``), or the whole image
    alone; a 4 x 4 patch ViT, pixel-shuffled by 2 into 2 x 2 tokens per crop. The image's 2 x 2 cells have their own
    grey levels: each whole-image token must read one cell, the crops' tokens the crops only."""
    from tests.new_family_builders import build_idefics3

    torch.manual_seed(0)
    model, processor = build_idefics3()
    processor.image_processor.do_image_splitting = split
    lm = LoadedModel(model.eval(), processor, "idefics3", "tiny-idefics3")
    image = _graded_square(2, 16)
    pixels, masks = _token_pixels(lm, image, "Idefics3Encoder")
    crops = pixels.shape[0]
    assert crops == (5 if split else 1) and len(masks) == 4 * crops
    values = pixels.mean(-3)
    levels = np.unique(values[:4].flatten(1).numpy().round(3)) if split else None  # crops of one cell each
    assert levels is None or len(levels) == 4
    cells = []
    for m in masks:
        used = m.flatten(1).any(-1).nonzero()[:, 0].tolist()
        assert len(used) == 1  # each token reads one crop
        if used[0] < crops - 1:
            cells.append(-1)
            continue
        level = float(values[m].median())
        if levels is None:  # no crops: the levels of the resized image, read at the cells' centres
            levels = np.sort([float(values[-1][y, x]) for y in (4, 12) for x in (4, 12)])
        cells.append(int(np.abs(levels - level).argmin()))
    assert cells[-4:] == sorted(cells[-4:]) and set(cells[-4:]) == {0, 1, 2, 3} and set(cells[:-4]) <= {-1}

    language, vision = "language.layers.0.mlp.down_proj", "vision.layers.0.mlp.fc2"
    view, _ = _view(lm, [f"{language}:{CHANNEL}", f"{vision}:{CHANNEL}"], [(language, False)], [image])
    tokens = view.table[(view.table["kind"] == "image") & (view.table["neuron"] == f"{language}:{CHANNEL}")]
    assert tokens["cell"].tolist() == cells
    assert (tokens["grid_rows"] == 2).all() and (tokens["grid_cols"] == 2).all()
    rows = view.table[view.table["neuron"] == f"{vision}:{CHANNEL}"]
    assert len(rows) == 16  # the first crop's patches: the whole image's grid only when it is not split
    assert rows["cell"].tolist() == ([-1] * 16 if split else list(range(16)))
