from collections import deque

import numpy as np
import pytest
import torch

from polycolor import synth
from polycolor.data import read_split


def flood_fill_target(ink: np.ndarray) -> np.ndarray:
    """Independent check: a 4-connected BFS of white from the border; polygon = everything not reached."""
    h, w = ink.shape
    outside = np.zeros_like(ink)
    queue = deque((y, x) for y in range(h) for x in (0, w - 1)) + deque((y, x) for x in range(w) for y in (0, h - 1))
    while queue:
        y, x = queue.popleft()
        if 0 <= y < h and 0 <= x < w and not outside[y, x] and not ink[y, x]:
            outside[y, x] = True
            queue.extend(((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)))
    return ~outside


def test_dataset_targets_are_the_flood_fill_of_their_outlines(dataset):
    for name in ("training", "validation"):
        split = read_split(dataset / name)
        for ink, target in zip(split.outlines, split.targets):
            assert ((target != 255).any(-1) == flood_fill_target(ink)).all()


def test_synthetic_pairs_follow_the_real_conventions():
    """Synthetic pairs are exact under a flood fill and match the real conventions."""
    split = synth.generate(40, seed=3)
    for ink, target, name in zip(split.outlines, split.targets, split.colors):
        painted = (target != 255).any(-1)
        assert (painted == flood_fill_target(ink)).all()
        colours = {tuple(c) for c in target.reshape(-1, 3)}
        assert colours == {(255, 255, 255), split.palette[name]}  # white plus exactly one colour
        assert painted.sum() > ink.sum()  # the outline encloses something
    assert split.outlines.shape == (40, 128, 128) and split.targets.dtype == np.uint8


def test_deterministic_per_seed_and_varied():
    a, b, c = synth.generate(20, seed=5), synth.generate(20, seed=5), synth.generate(20, seed=6)
    assert (a.outlines == b.outlines).all() and a.colors == b.colors
    assert not (a.outlines == c.outlines).all()
    big = synth.generate(300, seed=0)
    kinds = {name.rsplit("_", 1)[0] for name in big.inputs}
    assert set(synth.REAL_SHAPES) <= kinds and {"cross", "ellipse", "concave"} <= kinds
    assert any(c.startswith("#") for c in big.colors) and "purple" in big.colors
    widths = {int(ink.sum()) for ink in big.outlines}
    assert len(widths) > 100


def test_written_layout_reads_back_exactly(tmp_path):
    split = synth.generate(10, seed=4)
    synth.write_split(split, tmp_path / "training")
    back = read_split(tmp_path / "training")
    assert (back.outlines == split.outlines).all() and (back.targets == split.targets).all()
    assert back.colors == split.colors and back.palette == split.palette


def test_synthetic_dataset_items_are_reproducible_per_epoch():
    ds = synth.SyntheticDataset(4, seed=(0, 0, 1))
    first = ds[2]
    ds.set_epoch(1)
    other = ds[2]
    ds.set_epoch(0)
    again = ds[2]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]) and first[2] == again[2]
    assert not torch.equal(first[0], other[0])


def test_restricted_colours_stay_in_vocabulary():
    split = synth.generate(30, seed=0, colors=["red", "teal"])
    assert set(split.colors) <= {"red", "teal"}


@pytest.mark.parametrize("kind", synth.REAL_SHAPES + synth.OTHER_SHAPES)
def test_every_shape_kind_closes(kind):
    rng = np.random.default_rng(0)
    points = synth.shape_points(kind, rng) * 40 + 64
    ink = synth.draw_outline(points, 2, 128)
    assert flood_fill_target(ink).sum() > ink.sum() + 50
