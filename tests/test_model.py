import pytest
import torch
import torch.nn.functional as F

from polycolor import synth
from polycolor.data import PolygonDataset
from polycolor.model import ConditionalUNet, ModelConfig, target_mask

from conftest import tiny_model


def batch(n=4, vocabulary=()):
    ds = PolygonDataset(synth.generate(n, seed=0, colors=list(synth.REAL_PALETTE)), vocabulary)
    return [torch.stack(t) for t in zip(*(ds[i] for i in range(n)))]


@pytest.mark.parametrize("conditioning", ["concat", "film", "embedding", "text"])
@pytest.mark.parametrize("head", ["mask", "rgb"])
def test_shapes_and_range(conditioning, head):
    model = tiny_model(conditioning, head)
    outline, rgb, target, token = batch(vocabulary=model.cfg.vocabulary)
    image = model(outline, rgb, token)
    assert image.shape == (4, 3, 128, 128) and 0 <= image.min() and image.max() <= 1
    channels = 3 if head == "rgb" else 4 if conditioning == "text" else 1  # text + mask: mask logit, then colour
    assert model(outline, rgb, token, logits=True).shape == (4, channels, 128, 128)


@pytest.mark.parametrize("conditioning", ["concat", "film", "embedding", "text"])
@pytest.mark.parametrize("head", ["mask", "rgb"])
def test_output_changes_when_only_the_colour_changes(conditioning, head):
    model = tiny_model(conditioning, head)
    for p in model.parameters():  # FiLM starts as the identity; perturb so every path is live
        p.data.add_(torch.randn_like(p) * 0.05)
    outline = batch(1)[0]
    red, blue = torch.tensor([[1.0, 0, 0]]), torch.tensor([[0, 0, 1.0]])
    vocab = list(model.cfg.vocabulary)
    tok = (lambda name: torch.tensor([vocab.index(name)])) if vocab else (lambda name: None)
    assert not torch.allclose(model(outline, red, tok("red")), model(outline, blue, tok("blue")))


def test_hard_mask_output_is_exactly_white_or_the_colour():
    model = tiny_model()
    outline, rgb, _, _ = batch()
    image = model(outline, rgb, hard=True)
    is_white = (image == 1).all(1)
    is_colour = (image == rgb[:, :, None, None]).all(1)
    assert (is_white | is_colour).all()


def test_text_mode_paints_one_predicted_colour_exactly_and_takes_raw_phrase_embeddings():
    model = tiny_model("text")
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    outline, rgb, _, token = batch(2, vocabulary=model.cfg.vocabulary)
    image = model(outline, rgb, token, hard=True)
    for one in image:  # (3, H, W): white, or one colour on the 1/255 grid
        colours = torch.unique(one.reshape(3, -1), dim=1)
        assert colours.shape[1] <= 2 and torch.equal(colours * 255, (colours * 255).round())
    embeddings = model.condition.phrases[token]  # (B, text_dim): what the encoder would give for a new phrase
    assert torch.equal(model(outline, rgb, embeddings, hard=True), image)


def test_any_size_divisible_by_two_to_the_levels():
    model = ConditionalUNet(ModelConfig(base_width=8, multipliers=(1, 2, 4), image_size=64))
    assert model(torch.zeros(2, 1, 64, 64), torch.rand(2, 3)).shape == (2, 3, 64, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(conditioning="clip"), "conditioning 'clip' is unknown"),
        (dict(head="rgba"), "head 'rgba' is unknown"),
        (dict(conditioning="embedding"), "needs a non-empty vocabulary"),
        (dict(conditioning="text"), "needs text_encoder"),
        (dict(base_width=12), "multiple of 8"),
        (dict(image_size=100), "divisible by 2**levels"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        ModelConfig(**kwargs)


def test_rgb_modes_accept_unseen_colours():
    model = tiny_model("film")
    outline = batch(1)[0]
    assert model(outline, torch.tensor([[0.123, 0.456, 0.789]])).shape == (1, 3, 128, 128)


def test_tiny_model_overfits_a_handful_of_pairs():
    torch.manual_seed(0)
    model = ConditionalUNet(ModelConfig(base_width=8))
    outline, rgb, target, _ = batch(4)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        loss = F.binary_cross_entropy_with_logits(model(outline, rgb, logits=True), target_mask(target))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    exact = (model(outline, rgb, hard=True) - target).abs().max(1).values <= 16 / 255
    assert exact.float().mean() > 0.99
