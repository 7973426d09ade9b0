"""Conditioning modes: each is one class that owns how a colour reaches the UNet.

A mode turns colour strings into its condition tensor (``prepare``), names the vocabulary it needs, says
which colours it reads (``reads_lexicons``, ``free_text``), and is itself the module the UNet consumes:
extra input channels (``concat``) or one vector that FiLM applies in every block (the others). ``paint`` is
the colour the mask head paints. A new mode is one class here plus its line in ``MODES``.

    concat      (B, 3) RGB in [0, 1], appended as 3 constant input channels (the published recommendation)
    film        (B, 3) RGB in [0, 1] -> MLP -> FiLM vector
    embedding   (B,) index into a closed vocabulary of colour names -> learned embedding -> FiLM vector
    text        (B, text_dim + 3) frozen-encoder embedding of any phrase (``polycolor.text``) -> MLP -> FiLM vector,
                and the phrase's RGB for the mask head: from the lexicons, else from the embedding's nearest names
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from polycolor import text as text_encoders
from polycolor.colors import RGB, check_phrase, normalize_name, parse_color, phrase, read_color, suggestion, to_oklab


def rgb_of(colours: Sequence[str], palette: Mapping[str, RGB]) -> torch.Tensor:
    """Return (B, 3) RGB in [0, 1] of colour strings, the palette's names first; ValueError for an unknown one."""
    return torch.tensor([parse_color(c, palette) for c in colours], dtype=torch.float32).reshape(-1, 3) / 255


class Conditioning(nn.Module):
    """The base: a mode that takes any colour string ``parse_color`` reads, as (B, 3) RGB, and paints it."""

    name: ClassVar[str]
    extra_channels: ClassVar[int] = 0  # input channels added to the outline's one
    needs_vocabulary: ClassVar[bool] = False  # colours are known by name: an index into ``cfg.vocabulary``
    reads_lexicons: ClassVar[bool] = True  # takes any colour ``parse_color`` reads, not only its vocabulary's
    free_text: ClassVar[bool] = False  # takes any phrase at all, placing its colour by a text encoder

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.dim = cfg, cfg.cond_dim  # dim: the FiLM vector's size; None: no FiLM
        self.index = {normalize_name(n): i for i, n in enumerate(cfg.vocabulary)}

    @staticmethod
    def vocabulary(palette: Mapping[str, RGB], named: Iterable[str] = ()) -> tuple[str, ...]:
        """Return the names the mode must know before training, from the data's palette (and ``named`` colours)."""
        return ()

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ValueError for a model config the mode cannot be built from."""
        if cls.needs_vocabulary and not cfg.vocabulary:
            raise ValueError(f"conditioning {cls.name!r} needs a non-empty vocabulary of colour names")

    @classmethod
    def require(cls) -> None:
        """Raise ImportError with the install command when the mode needs an extra that is missing."""

    @classmethod
    def available(cls) -> bool:
        try:
            cls.require()
        except ImportError:
            return False
        return True

    @classmethod
    def model_fields(cls, text_encoder: str) -> dict:
        """Return the ModelConfig fields the mode adds to a run's settings (loading what it must to know them)."""
        return {}

    def fit(self, palette: Mapping[str, RGB]) -> None:
        """Learn before training what the mode knows of its vocabulary (colours, embeddings) from ``palette``."""

    def check_serving(self, load: bool = True) -> None:
        """Raise ValueError when serving would load something from outside this machine; ``load`` it now."""

    def costly(self, colour: str, palette: Mapping[str, RGB]) -> bool:
        """Return whether preparing ``colour`` costs more than a known name's lookup (Serve budgets such phrases)."""
        return False

    def tokens(self, colours: Sequence[str]) -> list[int]:
        """Return the vocabulary index of each colour, -1 where it has none."""
        return [self.index.get(normalize_name(check_phrase(c)), -1) for c in colours]

    def prepare(self, colours: Sequence[str], palette: Mapping[str, RGB]) -> torch.Tensor:
        """Return the condition tensor (B, ...) of colour strings; ValueError naming one this mode cannot paint."""
        return rgb_of(colours, palette)

    def forward(self, outline: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (UNet input, FiLM vector (B, dim) or None)."""
        return outline, self.encode(cond)

    def paint(self, cond: torch.Tensor) -> torch.Tensor:
        """Return (B, 3) the colour the mask head paints, in [0, 1]."""
        return cond.float()


class Concat(Conditioning):
    name, extra_channels = "concat", 3

    def __init__(self, cfg):
        super().__init__(cfg)
        self.dim = None

    def forward(self, outline, cond):
        colour = cond[:, :, None, None].expand(-1, -1, *outline.shape[-2:])  # (B, 3, H, W)
        return torch.cat([outline, colour.to(outline.dtype)], dim=1), None


class FiLMRGB(Conditioning):
    name = "film"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.encode = nn.Sequential(nn.Linear(3, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim))


class Embedding(Conditioning):
    name, needs_vocabulary, reads_lexicons = "embedding", True, False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.encode = nn.Sequential(nn.Embedding(len(cfg.vocabulary), cfg.cond_dim), nn.SiLU())
        self.register_buffer("rgb", torch.zeros(len(cfg.vocabulary), 3))  # (V, 3) each name's colour, set by ``fit``

    @staticmethod
    def vocabulary(palette, named=()):
        return tuple(sorted(palette))

    def fit(self, palette):
        self.rgb.copy_(rgb_of(self.cfg.vocabulary, palette))

    def prepare(self, colours, palette):
        """Return (B,) vocabulary indices."""
        tokens = self.tokens(colours)
        if -1 in tokens:
            colour = colours[tokens.index(-1)]
            raise ValueError(
                f"colour {colour!r} is not in this checkpoint's vocabulary"
                + suggestion(colour, palette, only=self.cfg.vocabulary)
            )
        return torch.tensor(tokens, dtype=torch.long)

    def paint(self, cond):
        return self.rgb[cond]


class Text(Conditioning):
    name, needs_vocabulary, free_text = "text", True, True

    def __init__(self, cfg):
        super().__init__(cfg)
        # The frozen encoder's embeddings of the vocabulary: saved with the weights, never trained.
        self.register_buffer("phrases", torch.zeros(len(cfg.vocabulary), cfg.text_dim))
        self.encode = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim)
        )

    @staticmethod
    def vocabulary(palette, named=()):
        return tuple(sorted(set(palette) | {phrase(name) for name in named}))

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if not cfg.text_encoder or cfg.text_dim < 1:
            raise ValueError("conditioning 'text' needs text_encoder (a model name or path) and a positive text_dim")

    @classmethod
    def require(cls) -> None:
        text_encoders.require()

    @classmethod
    def model_fields(cls, text_encoder):
        return {"text_encoder": text_encoder, "text_dim": text_encoders.load(text_encoder).dim}

    def check_serving(self, load=True) -> None:
        self.require()
        text_encoders.check_local(self.cfg.text_encoder)
        if load:
            text_encoders.load(self.cfg.text_encoder, local_only=True).lexicon()

    @torch.no_grad()
    def fit(self, palette) -> None:
        """Embed the vocabulary, one encoder run per phrase."""
        self.phrases.copy_(text_encoders.load(self.cfg.text_encoder).embed(self.cfg.vocabulary))

    def prepare(self, colours, palette):
        """Return (B, text_dim + 3): an embedding of the phrase and its RGB in [0, 1]. The RGB is read through the
        lexicons (``read_color``: the palette, CSS and survey names, modifiers, notations) wherever they can,
        and such a phrase outside the vocabulary borrows the saved embedding of the vocabulary phrase nearest
        its colour (the mask's shape does not depend on it). Only a phrase the lexicons cannot read goes to the
        encoder, and is painted at the OKLab mean of its nearest lexicon names (``TextEncoder.nearest_colour``)."""
        tokens, rgb = self.tokens(colours), [read_color(c, palette) for c in colours]
        if borrow := [i for i, (t, c) in enumerate(zip(tokens, rgb)) if t < 0 and c is not None]:
            known = to_oklab(np.array(rgb_of(self.cfg.vocabulary, palette)) * 255)  # (V, 3)
            for i in borrow:
                tokens[i] = int(np.linalg.norm(known - to_oklab(rgb[i]), axis=1).argmin())
        embeddings = self.phrases.cpu()[torch.tensor(tokens, dtype=torch.long).clamp(min=0)]
        if new := [i for i, t in enumerate(tokens) if t < 0]:
            encoder = text_encoders.load(self.cfg.text_encoder)
            embeddings[new] = encoder.embed([colours[i] for i in new])
            for i in new:
                rgb[i] = encoder.nearest_colour(embeddings[i])
        return torch.cat([embeddings, torch.tensor(rgb, dtype=torch.float32) / 255], dim=1)

    def costly(self, colour, palette):
        """Return a phrase neither the vocabulary nor the lexicons hold: it takes an encoder run."""
        return self.tokens([colour]) == [-1] and read_color(colour, palette) is None

    def forward(self, outline, cond):
        return outline, self.encode(cond[:, :-3].to(self.phrases.dtype))

    def paint(self, cond):
        return cond[:, -3:].float()


MODES: dict[str, type[Conditioning]] = {mode.name: mode for mode in (Concat, FiLMRGB, Embedding, Text)}
