import re

import pytest
import torch

from polycolor import synth
from polycolor.conditioning import MODES
from polycolor.data import REAL_PALETTE, PolygonDataset
from polycolor.model import ConditionalUNet, ModelConfig

from conftest import overfit, tiny_model


def batch(model, n=4, colours=None):
    """(outline, target, the mode's condition) for ``n`` pairs in the real palette's colours (or ``colours``)."""
    ds = PolygonDataset(synth.generate(n, seed=0, colors=list(REAL_PALETTE)))
    outline, target, names = zip(*(ds[i] for i in range(n)))
    return torch.stack(outline), torch.stack(target), model.condition.prepare(colours or names, REAL_PALETTE)


@pytest.mark.parametrize("conditioning", list(MODES))
@pytest.mark.parametrize("head", ["mask", "rgb"])
def test_output_is_an_image_and_logits_match_the_head(conditioning, head):
    """The output is an image, and the logits have one channel per head output."""
    model = tiny_model(conditioning, head)
    outline, _, cond = batch(model)
    assert model(outline, cond).shape == (4, 3, 128, 128)
    assert model(outline, cond, logits=True).shape == (4, 3 if head == "rgb" else 1, 128, 128)


@pytest.mark.parametrize("conditioning", list(MODES))
@pytest.mark.parametrize("head", ["mask", "rgb"])
def test_output_changes_when_only_the_colour_changes(conditioning, head):
    model = tiny_model(conditioning, head)
    for p in model.parameters():  # FiLM starts as the identity; perturb so every path is live
        p.data.add_(torch.randn_like(p) * 0.05)
    outline, _, red = batch(model, 1, ["red"])
    blue = model.condition.prepare(["blue"], REAL_PALETTE)
    assert not torch.allclose(model(outline, red), model(outline, blue))


@pytest.mark.parametrize("conditioning", ["concat", "film", "embedding"])
def test_hard_mask_output_is_exactly_white_or_the_named_colour(conditioning):
    model = tiny_model(conditioning)
    outline, target, cond = batch(model)
    image = model(outline, cond, hard=True)
    colour = torch.tensor([REAL_PALETTE[n] for n in synth.generate(4, seed=0, colors=list(REAL_PALETTE)).colors]) / 255
    assert ((image == 1).all(1) | (image == colour[:, :, None, None]).all(1)).all()


def test_text_mode_paints_its_predicted_colour_exactly():
    """The text mode paints one predicted colour exactly and takes raw phrase embeddings."""
    model = tiny_model("text")
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    outline, _, cond = batch(model, 2)
    assert cond.shape == (2, model.cfg.text_dim + 3)  # the phrase's embedding (here the saved rows), then its RGB
    image = model(outline, cond, hard=True)
    for one in image:  # (3, H, W): white, or one colour on the 1/255 grid
        colours = torch.unique(one.reshape(3, -1), dim=1)
        assert colours.shape[1] <= 2 and torch.equal(colours * 255, (colours * 255).round())


def test_any_size_divisible_by_two_to_the_levels():
    model = ConditionalUNet(ModelConfig(base_width=8, multipliers=(1, 2, 4), image_size=64))
    assert model(torch.zeros(2, 1, 64, 64), torch.rand(2, 3)).shape == (2, 3, 64, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(conditioning="clip"), "conditioning 'clip' is unknown"),
        (dict(head="rgba"), "head 'rgba' is unknown"),
        (dict(conditioning="embedding"), "needs a non-empty vocabulary"),
        (dict(conditioning="text", vocabulary=("red",)), "needs text_encoder"),
        (dict(base_width=12), "multiple of 8"),
        (dict(image_size=100), "divisible by 2**levels"),
        (dict(base_width=512), "base_width * max(multipliers) = 2048 (at most 1024)"),  # bounds before allocation
        (dict(multipliers=(1,) * 7), "levels = 7 (at most 6)"),
        (dict(image_size=4096, multipliers=(1,)), "image_size = 4096 (at most 1024)"),
        (dict(cond_dim=10**9), "cond_dim = 1000000000 (at most 4096)"),
        (dict(mid_dilations=(1,) * 9), "mid blocks = 9 (at most 8)"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**kwargs)


def test_tiny_model_overfits_a_handful_of_pairs():
    torch.manual_seed(0)
    model = ConditionalUNet(ModelConfig(base_width=8))
    outline, target, cond = batch(model)
    overfit(model, outline, target, cond, steps=100)
    exact = (model(outline, cond, hard=True) - target).abs().max(1).values <= 16 / 255
    assert exact.float().mean() > 0.99
