"""polycolor.conditioning: each mode is one class; what each mode reads and what a phrase costs."""

import pytest
import torch

from polycolor import checkpoint, synth
from polycolor.conditioning import MODES
from polycolor.data import REAL_PALETTE
from polycolor.model import ConditionalUNet, ModelConfig

from conftest import tiny_model


def test_rgb_modes_take_any_colour_vocabularies_refuse():
    """RGB modes accept any colour; vocabulary modes refuse unknown names."""
    film, embedding = tiny_model("film"), tiny_model("embedding")
    outline = torch.from_numpy(synth.generate(1, seed=0).outlines).float()[:, None]  # (1, 1, 128, 128)
    assert film(outline, film.condition.prepare(["#1f74c9"], REAL_PALETTE)).shape == (1, 3, 128, 128)
    with pytest.raises(
        ValueError, match="'teal' is not in this checkpoint's vocabulary; did you mean 'cyan', 'green', 'blue'\\?"
    ):
        embedding.condition.prepare(["teal"], REAL_PALETTE)  # suggestions from its own vocabulary only, nearest in hue


def test_a_new_mode_is_one_class_and_its_registration(monkeypatch, tmp_path):
    """A new conditioning mode is one class and its line in MODES."""
    from torch import nn

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


def test_only_an_unknown_phrase_costs_an_encoder_run():
    """Only a phrase neither the vocabulary nor the lexicons hold costs an encoder run."""
    text, concat = tiny_model("text"), tiny_model()
    assert not any(text.condition.costly(c, REAL_PALETTE) for c in ("red", "navy blue", "very pale teal", "#123"))
    assert text.condition.costly("zorp flamingo", REAL_PALETTE) and not concat.condition.costly(
        "zorp flamingo", REAL_PALETTE
    )
