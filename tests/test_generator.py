"""polycolor.generator: training pairs made a batch at a time, in the conventions of synth and drawings."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from polycolor import generator
from polycolor.colors import parse_color
from polycolor.data import REAL_PALETTE
from polycolor.drawings import DrawingDataset
from polycolor.generator import CLEAN, GAPS, Batches, render

ONLY = {style: [float(k == style - 1) for k in range(5)] for style in range(1, 6)}  # one drawing style alone


def pairs(batches: Batches, block: int = 0, count: int = 64):
    """Return (outline, truth) of a block as numpy bool arrays, (count, H, W)."""
    outline, target, _ = batches.block(block, count)
    return outline[:, 0].numpy() > 0.5, (target < 1).any(1).numpy()


def test_a_clean_pairs_truth_is_the_flood_fill_of_its_outline():
    """Single shapes and clean drawings: the truth is the flood fill of the outline the model reads."""
    for scenes in (0.0, 1.0):
        outline, truth = pairs(Batches(128, 64, seed=1, scenes=scenes, mix=ONLY[CLEAN]), count=128)
        filled = np.stack([ndimage.binary_fill_holes(o) for o in outline])
        assert (truth <= filled).all() and (outline <= truth).all()
        # Where two outlines meet they can pen in a few pixels between them; a lone one joins the truth, more do not.
        missed = (filled & ~truth).sum(axis=(1, 2))
        assert (missed == 0).mean() >= 0.98 and missed.max() <= 8
        assert (truth.sum(axis=(1, 2)) >= outline.sum(axis=(1, 2)) + 4).all()  # each encloses something


def test_gaps_open_the_outline_and_the_truth_stays_closed():
    """A gap erases ink across a line and changes nothing else: the truth is the closed outline's fill."""
    batches = Batches(64, 64, seed=2, scenes=1.0, mix=ONLY[GAPS])
    shapes = batches.geometry(np.random.default_rng(0), 64)
    gen = torch.Generator().manual_seed(0)
    open_outline, open_target, _ = render(shapes, batches.xs, batches.ys, gen, {})
    closed_shapes = dataclasses.replace(
        shapes, style=np.full(64, CLEAN), gaps=shapes.gaps[:0], gap_pair=shapes.gap_pair[:0]
    )
    closed_outline, closed_target, _ = render(closed_shapes, batches.xs, batches.ys, gen, {})
    assert torch.equal(open_target, closed_target)
    assert (open_outline <= closed_outline).all() and (open_outline < closed_outline).any(dim=(1, 2, 3)).all()
    truth = (open_target < 1).any(1).numpy()
    opened = [(ndimage.binary_fill_holes(o[0].numpy() > 0.5) != t).any() for o, t in zip(open_outline, truth)]
    assert np.mean(opened) >= 0.85  # the rest cut an inner shape's outline, inside the outer's fill


def test_soft_styles_stray_from_the_truth_only_on_its_rim():
    """Anti-aliased, inked and JPEG drawings read back as ink only on and just around the truth's outline."""
    for style in (2, 3, 4):
        outline, truth = pairs(Batches(64, 64, seed=3, scenes=1.0, mix=ONLY[style]))
        far = sum(int((o & ~ndimage.binary_dilation(t)).sum()) for o, t in zip(outline, truth))
        assert far <= 4  # JPEG at quality 40 rings a pixel or two further out
        for o, t in zip(outline, truth):
            filled = ndimage.binary_fill_holes(o)
            assert (filled & t).sum() / (filled | t).sum() >= 0.9


def test_an_epoch_replays_exactly_and_each_differs():
    """The same seed and epoch give the same pairs (a resumed run sees them again); other epochs and ranks do not."""

    def epoch(seed, number):
        batches = Batches(48, 16, seed=seed)
        batches.set_epoch(number)
        return list(batches)

    first, again = epoch((0, 0, 0), 1), epoch((0, 0, 0), 1)
    assert len(first) == 3 and all(o.shape == (16, 1, 128, 128) and t.shape == (16, 3, 128, 128) for o, t, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(first, again))
    for other in (epoch((0, 0, 0), 2), epoch((0, 0, 1), 1)):
        assert not torch.equal(first[0][0], other[0][0])


def test_half_size_pairs_keep_the_conventions_and_full_size_comes_back_unchanged():
    """A recipe's first epochs train at 64 px: every kind of pair is made there (the largest shapes fit), each
    enclosing something, its ink on its truth; back at 128 px the pairs are those a generator that never shrank
    makes."""
    batches = Batches(256, 64, seed=5, scenes=0.6)
    batches.resize(64)
    outline, truth = pairs(batches, count=256)
    assert outline.shape == (256, 64, 64) and (truth.sum(axis=(1, 2)) > outline.sum(axis=(1, 2))).all()
    assert sum(int((o & ~ndimage.binary_dilation(t)).sum()) for o, t in zip(outline, truth)) <= 4  # ink on the truth
    batches.resize(128)
    again, fresh = batches.block(0, 64), Batches(256, 64, seed=5, scenes=0.6).block(0, 64)
    assert torch.equal(again[0], fresh[0]) and torch.equal(again[1], fresh[1]) and again[2] == fresh[2]


def test_pairs_look_like_the_per_image_generators():
    """Ink, filled area, colours and the share of drawings match what synth and drawings make, one image at a time."""
    made = Batches(256, 64, seed=4)
    outline = torch.cat([o for o, _, _ in made])
    target = torch.cat([t for _, t, _ in made])
    old = DrawingDataset(256, seed=4)
    old_outline = torch.stack([old[i][0] for i in range(256)])
    old_target = torch.stack([old[i][1] for i in range(256)])
    for new, before in ((outline, old_outline), ((target < 1).any(1), (old_target < 1).any(1))):
        assert abs(new.float().mean() / before.float().mean() - 1) < 0.2
    several = [ndimage.label(t.numpy())[1] > 1 for t in (target < 1).any(1)]
    several_before = [ndimage.label(t.numpy())[1] > 1 for t in (old_target < 1).any(1)]
    assert abs(np.mean(several) - np.mean(several_before)) < 0.1  # drawings of several shapes
    colour = target.amin(dim=(2, 3))  # each pair's colour: its darkest value per channel
    assert abs(colour.mean() - old_target.amin(dim=(2, 3)).mean()) < 0.05


def test_a_closed_vocabulary_paints_its_own_colours():
    """With a vocabulary, every pair is one of its names, painted in that name's colour."""
    outline, target, names = Batches(32, 32, seed=5, colors=["red", "teal"]).block(0, 32)
    assert set(names) <= {"red", "teal"} and len(set(names)) == 2
    for t, name in zip(target, names):
        colour = torch.tensor(parse_color(name, REAL_PALETTE), dtype=torch.float32)[:, None] / 255
        painted = (t < 1).any(0)
        assert torch.equal(t[:, painted], colour.expand(-1, int(painted.sum())))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_batch_on_the_gpu_is_the_batch_on_the_cpu():
    """Pairs made on the GPU are those made on the CPU: the same truth, the same ink but for rounding."""
    cpu, gpu = Batches(16, 16, seed=6).block(0, 16), Batches(16, 16, seed=6, device="cuda").block(0, 16)
    assert gpu[0].device.type == "cuda"
    assert (cpu[0] != gpu[0].cpu()).float().mean() < 1e-3 and torch.equal(cpu[1], gpu[1].cpu())


def test_block_size_does_not_change_the_batches():
    """Batches come from blocks of pairs: the batch size changes only how a block is cut, not the pairs."""
    small, large = Batches(64, 8, seed=7), Batches(64, 32, seed=7)
    assert torch.equal(torch.cat([o for o, _, _ in small]), torch.cat([o for o, _, _ in large]))
    assert generator.BLOCK % 32 == 0
