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
def test_output_is_an_image_and_logits_have_one_channel_per_head_output(conditioning, head):
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


def test_text_mode_paints_one_predicted_colour_exactly_and_takes_raw_phrase_embeddings():
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
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        ModelConfig(**kwargs)


def test_rgb_modes_accept_any_colour_and_vocabulary_modes_refuse_unknown_names():
    film, embedding = tiny_model("film"), tiny_model("embedding")
    outline = batch(film, 1)[0]
    assert film(outline, film.condition.prepare(["#1f74c9"], REAL_PALETTE)).shape == (1, 3, 128, 128)
    with pytest.raises(ValueError, match="'teal' is not in this checkpoint's vocabulary; did you mean 'cyan', 'green', 'blue'\\?"):
        embedding.condition.prepare(["teal"], REAL_PALETTE)  # suggestions from its own vocabulary only, nearest in hue


def test_tiny_model_overfits_a_handful_of_pairs():
    torch.manual_seed(0)
    model = ConditionalUNet(ModelConfig(base_width=8))
    outline, target, cond = batch(model)
    overfit(model, outline, target, cond, steps=100)
    exact = (model(outline, cond, hard=True) - target).abs().max(1).values <= 16 / 255
    assert exact.float().mean() > 0.99


def test_a_new_conditioning_mode_is_one_class_and_its_registration(monkeypatch, tmp_path):
    from torch import nn

    from polycolor import checkpoint
    from polycolor.conditioning import Conditioning
    from polycolor.predict import Colorizer

    class Grey(Conditioning):  # FiLM from the colour's luminance alone; the base's RGB condition and paint
        name = "grey"

        def __init__(self, cfg):
            super().__init__(cfg)
            self.encode = nn.Linear(1, cfg.cond_dim)

        def forward(self, outline, cond):
            return outline, self.encode(cond @ torch.tensor([[0.299], [0.587], [0.114]]))

    monkeypatch.setitem(MODES, "grey", Grey)
    model = ConditionalUNet(ModelConfig(conditioning="grey", base_width=8, multipliers=(1, 2)))
    colorizer = Colorizer.from_checkpoint(checkpoint.write(tmp_path / "grey", model, REAL_PALETTE), device="cpu")
    out = colorizer.colorize_arrays(synth.generate(2, seed=0).outlines, colorizer.condition(["teal", "#ff8800"]))
    assert out.shape == (2, 128, 128, 3)
    assert colorizer.card().conditioning == "grey" and colorizer.card().reads_lexicons


def test_only_a_phrase_neither_the_vocabulary_nor_the_lexicons_hold_costs_an_encoder_run():
    text, concat = tiny_model("text"), tiny_model()
    assert not any(text.condition.costly(c, REAL_PALETTE) for c in ("red", "navy blue", "very pale teal", "#123"))
    assert text.condition.costly("zorp flamingo", REAL_PALETTE) and not concat.condition.costly("zorp flamingo", REAL_PALETTE)
