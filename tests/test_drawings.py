"""polycolor.drawings: composed drawings in every style, and the exactness of their truth."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from polycolor.data import REAL_PALETTE
from polycolor.drawings import DrawingDataset, draw, flood_fill, paint, score
from polycolor.images import at_size, ink_mask, outline_array
from polycolor.model import ConditionalUNet, ModelConfig
from polycolor.synth import SyntheticDataset

from conftest import overfit


def ink_of(drawing) -> np.ndarray:
    return (drawing.image < 128).all(axis=2)


def test_a_clean_drawings_truth_is_its_flood_fill():
    """The truth of a clean drawing is the flood fill of its outline, whatever the scene."""
    for i in range(60):
        drawing = draw(
            (0, i), "clean", shapes=1 + i % 4, nested=i % 5 == 0, size=(128, 128) if i % 3 else (96 + i, 200 - i)
        )
        outline = ink_of(drawing)
        assert drawing.image.shape[:2] == drawing.truth.shape and drawing.care.all()
        assert (drawing.truth == ndimage.binary_fill_holes(outline)).all() and drawing.truth.sum() >= outline.sum() + 4
        assert score(paint(flood_fill(drawing.image), drawing.rgb), drawing) == {"pixel_exact": 1.0, "iou": 1.0}


def test_scenes_hold_every_kind_of_shape_and_width():
    """Scenes hold several shapes anywhere, nested ones, and every line width."""
    scenes = [draw((1, i), "clean", shapes=3) for i in range(20)]
    regions = [ndimage.label(d.truth)[1] for d in scenes]
    assert all(1 <= r <= 3 for r in regions) and regions.count(3) >= 10  # outlines may touch, but mostly stand apart
    near_border = [
        d for d in scenes if d.truth[:3].any() or d.truth[-3:].any() or d.truth[:, :3].any() or d.truth[:, -3:].any()
    ]
    assert near_border
    for i in range(10):
        nested = draw((2, i), "clean", nested=True)
        assert (
            ndimage.label(ink_of(nested), np.ones((3, 3)))[1] == 2 and ndimage.label(nested.truth)[1] == 1
        )  # two outlines, one region
    assert {draw((3, i), "clean").width for i in range(60)} == {1, 2, 3, 4, 5, 6}


def test_each_style_shows_what_it_claims():
    for i in range(20):
        clean, smooth, ink, compressed, gaps = (
            draw((4, i), style) for style in ("clean", "antialiased", "ink", "jpeg", "gaps")
        )
        assert len(np.unique(clean.image)) == 2 and len(np.unique(smooth.image)) > 2  # anti-aliased edges are grey
        assert 0.9 < smooth.care.mean() < 1 and (smooth.truth[smooth.care] == clean.truth[smooth.care]).mean() > 0.99
        grey = ink.image.mean(axis=2)
        assert np.median(grey) < 250 and np.percentile(grey, 0.1) > 15  # paper not white, ink not black
        assert len(np.unique(compressed.image)) > len(np.unique(smooth.image))  # compression noise
        assert (ndimage.binary_fill_holes(ink_of(gaps)) != gaps.truth).any()  # an opened outline leaks
    large = draw((5, 0), "clean", size=(1024, 640))
    assert large.image.shape == (1024, 640, 3) and large.truth.shape == (1024, 640)
    with pytest.raises(ValueError, match="style 'sketchy' is unknown"):
        draw(0, "sketchy")


def test_a_flood_fill_cannot_close_a_gap_and_the_score_says_so():
    scores = [score(paint(flood_fill(d.image), d.rgb), d) for d in (draw((6, i), "gaps") for i in range(20))]
    assert np.mean([s["iou"] for s in scores]) < 0.9  # the fill leaks out through the gap, or fills nothing
    drawing = draw((6, 0), "clean")
    assert (
        score(np.full_like(drawing.target, 255), drawing)["iou"] == 0.0
        and score(drawing.target, drawing)["pixel_exact"] == 1.0
    )


def test_the_same_seed_draws_the_same_drawing():
    a, b, c = draw((7, 1), "ink"), draw((7, 1), "ink"), draw((7, 2), "ink")
    assert (a.image == b.image).all() and a.color == b.color and (a.image != c.image).any()


def test_a_tiny_model_learns_scenes_of_several_shapes():
    """A quick overfit: the network can represent several separate fills (and a nested one) per canvas."""
    scenes = [draw((8, i), "clean", shapes=2 + i % 3, nested=i == 3) for i in range(4)]
    outline = torch.from_numpy(np.stack([outline_array(Image.fromarray(d.image)) for d in scenes])).float()[:, None]
    target = torch.from_numpy(np.stack([d.target for d in scenes])).permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(0)
    model = ConditionalUNet(ModelConfig(base_width=8))
    cond = model.condition.prepare([d.color for d in scenes], REAL_PALETTE)
    overfit(model, outline, target, cond, steps=150)
    with torch.no_grad():
        painted = (model(outline, cond, hard=True) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    scores = [score(p, d) for p, d in zip(painted, scenes)]
    assert min(s["iou"] for s in scores) > 0.97 and min(s["pixel_exact"] for s in scores) > 0.99, scores


def test_an_answer_at_size_has_the_inputs_edges():
    """A right answer at the model's 128x128, brought back to a large input's size, is exact there too."""
    for i in range(8):
        drawing = draw((10, i), "clean", size=(300 + 90 * i, 1000 - 80 * i))
        image = Image.fromarray(drawing.image)
        answer = paint(ndimage.binary_fill_holes(outline_array(image)), drawing.rgb)  # the fill at the model's size
        nearest = np.asarray(Image.fromarray(answer).resize(image.size, Image.Resampling.NEAREST))
        assert score(nearest, drawing)["iou"] < 0.99  # the model's grid shows at 2-8x
        assert score(at_size(answer, ink_mask(image)), drawing) == {"pixel_exact": 1.0, "iou": 1.0}


def test_any_aspect_ratio_is_read_at_its_proportions():
    """A long, thin drawing reaches the model letterboxed, its shapes as drawn (squashed to a square, they
    would be shapes it never saw), and the answer comes back to the input's size exact."""
    for size in ((82, 522), (741, 126)):
        drawing = draw((11, *size), "clean", size=size)
        image = Image.fromarray(drawing.image)
        ink, outline = ink_mask(image), outline_array(image)
        for axis in (0, 1):
            drawn, read = np.nonzero(ink.any(axis=1 - axis))[0], np.nonzero(outline.any(axis=1 - axis))[0]
            offset = (max(size) - size[axis]) / 2
            assert (
                abs((drawn[0] + offset) * 128 / max(size) - read[0]) <= 1.5
                and abs((drawn[-1] + offset) * 128 / max(size) - read[-1]) <= 1.5
            )
        answer = paint(ndimage.binary_fill_holes(outline), drawing.rgb)
        assert score(at_size(answer, ink), drawing) == {"pixel_exact": 1.0, "iou": 1.0}


def test_training_pairs_mix_drawings_in_the_share_asked():
    """Training pairs mix drawings in the share asked, and none without."""
    mixed, plain, none = (
        DrawingDataset(40, seed=3, scenes=0.5),
        SyntheticDataset(40, seed=3),
        DrawingDataset(40, seed=3, scenes=0.0),
    )
    same = [torch.equal(mixed[i][0], plain[i][0]) for i in range(40)]
    assert 10 <= same.count(False) <= 30  # about half are drawings
    assert all(torch.equal(none[i][0], plain[i][0]) and none[i][2] == plain[i][2] for i in range(40))
    for i in (i for i, s in enumerate(same) if not s):
        outline, target, _ = mixed[i]
        painted = (target < 1).any(0).numpy()
        stray = (
            outline[0] > 0
        ).numpy() & ~painted  # ink the target leaves white: only on its rim (anti-aliasing, JPEG)
        assert outline.shape == (1, 128, 128) and not (stray & ~ndimage.binary_dilation(painted)).any()
    closed = DrawingDataset(20, seed=4, colors=["red", "teal"], scenes=1.0)
    assert {closed[i][2] for i in range(20)} <= {"red", "teal"}
