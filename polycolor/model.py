"""ConditionalUNet: colours a polygon outline given a colour.

Input: the outline as a (B, 1, H, W) ink mask (1 = outline pixel) and the colour as its conditioning
mode's tensor (``polycolor.conditioning``: RGB, a vocabulary index or a phrase embedding, made from colour
strings by ``model.condition.prepare``). Output: (B, 3, H, W) image in [0, 1].

Output heads: ``rgb`` predicts the three channels (the published design); ``mask`` predicts one logit per
pixel, "inside the polygon", and paints ``mask * colour + (1 - mask) * white``. The mask head makes the
colour exact by construction and, thresholded (``hard=True``), every pixel exactly white or exactly the
colour: what is left to learn is the shape, which does not depend on the colour at all. The colour it
paints is the mode's ``paint``: the given RGB, the vocabulary name's, or (``text``) read from the phrase.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from polycolor.conditioning import MODES

HEADS = ("mask", "rgb")


@dataclass(frozen=True)
class ModelConfig:
    conditioning: str = "concat"
    head: str = "mask"
    base_width: int = 16
    multipliers: tuple[int, ...] = (1, 2, 4)  # one per level: stage widths are base_width * m
    mid_dilations: tuple[int, ...] = (
        1,
        2,
        4,
    )  # bottleneck blocks; dilation grows the receptive field to the whole image
    cond_dim: int = 64
    vocabulary: tuple[str, ...] = ()  # colour names of the ``embedding`` mode, training phrases of ``text``
    text_encoder: str = ""  # ``text`` mode: the Hugging Face encoder (name or path) that embeds phrases
    text_dim: int = 384  # ``text`` mode: that encoder's embedding size
    image_size: int = 128

    def __post_init__(self):
        object.__setattr__(self, "multipliers", tuple(self.multipliers))
        object.__setattr__(self, "mid_dilations", tuple(self.mid_dilations))
        object.__setattr__(self, "vocabulary", tuple(self.vocabulary))
        if self.conditioning not in MODES:
            raise ValueError(f"conditioning {self.conditioning!r} is unknown; expected one of {tuple(MODES)}")
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r} is unknown; expected one of {HEADS}")
        MODES[self.conditioning].check(self)
        if self.base_width < 8 or self.base_width % 8:
            raise ValueError(f"base_width must be a positive multiple of 8, got {self.base_width}")
        if not self.multipliers or min(self.multipliers) < 1:
            raise ValueError(f"multipliers must be a non-empty tuple of positive integers, got {self.multipliers}")
        # Upper bounds, checked before anything is allocated: a checkpoint's config.json is input like any other.
        limits = {
            "base_width * max(multipliers)": (self.base_width * max(self.multipliers), 1024),
            "levels": (len(self.multipliers), 6),
            "mid blocks": (len(self.mid_dilations), 8),
            "cond_dim": (self.cond_dim, 4096),
            "text_dim": (self.text_dim, 8192),
            "image_size": (self.image_size, 1024),
            "vocabulary": (len(self.vocabulary), 100_000),
        }
        if over := [f"{name} = {value} (at most {most})" for name, (value, most) in limits.items() if value > most]:
            raise ValueError(f"model config out of bounds: {', '.join(over)}")
        if min(self.mid_dilations, default=1) < 1 or max(self.mid_dilations, default=1) > self.image_size:
            raise ValueError(f"mid_dilations must be between 1 and image_size, got {self.mid_dilations}")
        if self.image_size % 2 ** len(self.multipliers):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**levels = {2 ** len(self.multipliers)}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class FiLM(nn.Module):
    """x * (1 + scale) + shift, with scale and shift from the condition vector; starts as the identity."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(cond)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return x * (1 + scale) + shift


class Block(nn.Module):
    """conv 3x3 -> GroupNorm -> FiLM (when conditioned) -> SiLU."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int | None, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm = nn.GroupNorm(min(8, c_out // 4), c_out)
        self.film = FiLM(cond_dim, c_out) if cond_dim else None
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(self.conv(x))
        if self.film is not None:
            x = self.film(x, cond)
        return self.act(x)


class Stage(nn.Module):
    """Two blocks at one resolution."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int | None):
        super().__init__()
        self.blocks = nn.ModuleList([Block(c_in, c_out, cond_dim), Block(c_out, c_out, cond_dim)])

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cond)
        return x


class ConditionalUNet(nn.Module):
    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.cfg = cfg
        self.condition = MODES[cfg.conditioning](cfg)
        widths = [cfg.base_width * m for m in cfg.multipliers]
        cond_dim = self.condition.dim
        self.down = nn.ModuleList()
        c = 1 + self.condition.extra_channels
        for w in widths:
            self.down.append(Stage(c, w, cond_dim))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.ModuleList([Block(c, c, cond_dim, dilation=d) for d in cfg.mid_dilations])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for w in reversed(widths):
            self.upsample.append(nn.ConvTranspose2d(c, w, 2, stride=2))
            self.up.append(Stage(2 * w, w, cond_dim))
            c = w
        self.out = nn.Conv2d(c, 1 if cfg.head == "mask" else 3, 1)

    def logits(self, outline: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Return (B, 1, H, W) mask logits for the ``mask`` head, (B, 3, H, W) colour logits for ``rgb``."""
        x, vector = self.condition(outline, cond)
        skips = []
        for stage in self.down:
            x = stage(x, vector)
            skips.append(x)
            x = self.pool(x)
        for block in self.mid:
            x = block(x, vector)
        for upsample, stage in zip(self.upsample, self.up):
            x = stage(torch.cat([upsample(x), skips.pop()], dim=1), vector)
        return self.out(x)

    def render(self, logits: torch.Tensor, cond: torch.Tensor, hard: bool = False) -> torch.Tensor:
        """Return the (B, 3, H, W) image in [0, 1] of ``logits``; ``hard`` thresholds to exactly white or the colour."""
        if self.cfg.head == "rgb":
            image = torch.sigmoid(logits.float())
            return torch.round(image * 255) / 255 if hard else image
        mask = (logits > 0).float() if hard else torch.sigmoid(logits.float())  # (B, 1, H, W)
        colour = self.condition.paint(cond)  # (B, 3)
        colour = (torch.round(colour * 255) / 255 if hard else colour)[:, :, None, None]
        return mask * colour + (1 - mask)

    def forward(
        self, outline: torch.Tensor, cond: torch.Tensor, hard: bool = False, logits: bool = False
    ) -> torch.Tensor:
        """Return (B, 3, H, W) image in [0, 1]; the raw logits with ``logits=True`` (for losses, through DDP)."""
        out = self.logits(outline, cond)
        return out if logits else self.render(out, cond, hard)
