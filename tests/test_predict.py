import json

import numpy as np
import pytest
import torch
from PIL import Image

from polycolor import checkpoint, predict, synth
from polycolor.data import REAL_PALETTE
from polycolor.predict import Colorizer

from conftest import tiny_model


def first_input(dataset):
    return (
        dataset
        / "validation"
        / "inputs"
        / json.loads((dataset / "validation" / "data.json").read_text())[0]["input_polygon"]
    )


def test_colorize_any_image_and_original_size(tiny_checkpoint, dataset):
    colorizer = Colorizer.from_checkpoint(tiny_checkpoint, device="cpu")
    outline = Image.open(first_input(dataset))
    out = colorizer.colorize(outline, "red")
    assert out.size == (128, 128) and out.mode == "RGB"
    big = colorizer.colorize(outline.resize((300, 200)).convert("RGBA"), "#00ff00", original_size=True)
    assert big.size == (300, 200)
    colours = {tuple(c) for c in np.asarray(out).reshape(-1, 3)}
    assert colours <= {(255, 255, 255), (255, 0, 0)}  # exactly white or exactly red
    batch = colorizer.colorize_batch([outline, outline], ["red", "blue"])
    assert np.array_equal(np.asarray(batch[0]), np.asarray(out))


@pytest.mark.parametrize("head", ["mask", "rgb"])
@pytest.mark.parametrize("conditioning", ["concat", "film", "embedding", "text"])
def test_the_traced_model_paints_what_the_model_paints_at_every_batch_size(conditioning, head):
    """The Colorizer runs its model as a graph traced on the first batch: later batches of other sizes get the same
    pixels as the model itself given the same batches (across batch sizes the convolutions may round differently:
    an untrained rgb head's colours then move by a level)."""
    model = tiny_model(conditioning, head)
    colorizer = Colorizer(model, REAL_PALETTE)
    outlines = synth.generate(13, seed=4).outlines
    names = [list(REAL_PALETTE)[i % len(REAL_PALETTE)] for i in range(13)]
    cond = colorizer.condition(names)

    def eager(outlines: np.ndarray, cond: torch.Tensor) -> np.ndarray:  # the model, in the Colorizer's batches
        size, parts = colorizer.batch_size, []
        for k in range(0, len(outlines), size):
            with torch.inference_mode():
                image = model(torch.from_numpy(outlines[k : k + size]).float()[:, None], cond[k : k + size], hard=True)
            parts.append((image * 255).round().byte().permute(0, 2, 3, 1).numpy())
        return np.concatenate(parts)

    for batch in (slice(0, 1), slice(1, 13), slice(4, 7)):  # traced on one outline, then 12 (8 + 4), then 3
        expected = eager(outlines[batch], cond[batch])
        assert np.array_equal(colorizer.colorize_arrays(outlines[batch], cond[batch]), expected)
    assert colorizer.graph is not None


def test_unknown_colour_suggests_names(tiny_checkpoint):
    colorizer = Colorizer.from_checkpoint(tiny_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="did you mean 'red'"):
        colorizer.colorize(Image.new("RGB", (128, 128), "white"), "redd")


def test_embedding_mode_is_a_closed_vocabulary(tmp_path):
    path = checkpoint.write(tmp_path / "e", tiny_model("embedding"), REAL_PALETTE)
    colorizer = Colorizer.from_checkpoint(path, device="cpu")
    assert colorizer.colorize(Image.new("L", (128, 128), 255), "Purple").size == (128, 128)
    with pytest.raises(ValueError, match="not in this checkpoint's vocabulary"):
        colorizer.colorize(Image.new("L", (128, 128), 255), "teal")


def test_predict_cli_colours_one_image(tiny_checkpoint, dataset, tmp_path, capsys):  # many: tests/test_batch.py
    out = tmp_path / "one.png"
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--image",
        str(first_input(dataset)),
        "--color",
        "teal",
        "--out",
        str(out),
    ]
    assert predict.main(args) == 0
    expected = Colorizer.from_checkpoint(tiny_checkpoint, "cpu").colorize(first_input(dataset), "teal")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_predict_cli_errors_are_clear(tiny_checkpoint, tmp_path, capsys):
    assert (
        predict.main(
            ["--checkpoint", str(tmp_path / "missing"), "--image", "x.png", "--color", "red", "--out", "o.png"]
        )
        == 2
    )
    assert "not a checkpoint directory" in capsys.readouterr().err
    Image.new("RGB", (10, 10)).save(tmp_path / "x.png")
    assert (
        predict.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--image",
                str(tmp_path / "x.png"),
                "--color",
                "nocolour",
                "--out",
                str(tmp_path / "o.png"),
            ]
        )
        == 2
    )
    assert "unknown colour 'nocolour'" in capsys.readouterr().err


def test_the_shipped_weights_fill_unseen_drawings():
    """polycolor/pretrained is what the README says: the default recipe as it is now (when the recipe
    changes, `python bench/train_quality.py --presets recipe --ship` retrains and replaces it), and it fills held-out
    drawings of several shapes."""
    from polycolor.config import TrainConfig, preset
    from polycolor.drawings import draw, score

    saved = TrainConfig.from_dict(json.loads((checkpoint.PRETRAINED / "config.json").read_text())["train"])
    recipe = preset("recipe")
    assert (saved.model, saved.data, saved.optim) == (recipe.model, recipe.data, recipe.optim)
    colorizer = Colorizer.from_checkpoint(checkpoint.PRETRAINED, device="cpu")
    drawn = [draw((77, i), "antialiased", shapes=2 + i % 3) for i in range(12)]
    answers = colorizer.colorize_batch(
        [Image.fromarray(d.image) for d in drawn], [d.color for d in drawn], original_size=True
    )
    assert min(score(np.asarray(a), d)["iou"] for a, d in zip(answers, drawn)) >= 0.99
