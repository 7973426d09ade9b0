"""ConditionalUNet: colours a polygon outline given a colour.

Input: the outline as a (B, 1, H, W) ink mask (1 = outline pixel) and the colour as (B, 3) RGB in [0, 1],
plus a ``token``: (B,) vocabulary indices for the ``embedding`` and ``text`` modes, or (B, D) phrase
embeddings for ``text`` phrases outside the vocabulary. Output: (B, 3, H, W) image in [0, 1].

Conditioning modes (one place, ``Condition``): ``concat`` appends the RGB as 3 input channels (the
published recommendation); ``film``, ``embedding`` and ``text`` produce one vector that FiLM applies in
every block. ``text`` reads the colour phrase through a frozen pretrained encoder (``polycolor.text``);
the model keeps the encoder's embeddings of its training phrases, so seen phrases need no encoder.

Output heads: ``rgb`` predicts the three channels (the published design); ``mask`` predicts one logit per
pixel, "inside the polygon", and paints ``mask * colour + (1 - mask) * white``. The mask head makes the
colour exact by construction and, thresholded (``hard=True``), every pixel exactly white or exactly the
colour: what is left to learn is the shape, which does not depend on the colour at all. In ``text`` mode
the RGB is not given, so the mask head also reads it from the phrase: one colour per image, a linear map
of the phrase embedding solved on the training phrases (``Condition.fit_colour``), returned as 3 extra
channels (constant over the image) after the mask logit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

CONDITIONING_MODES = ("concat", "film", "embedding", "text")
HEADS = ("mask", "rgb")


@dataclass(frozen=True)
class ModelConfig:
    conditioning: str = "concat"
    head: str = "mask"
    base_width: int = 16
    multipliers: tuple[int, ...] = (1, 2, 4)  # one per level: stage widths are base_width * m
    mid_dilations: tuple[int, ...] = (1, 2, 4)  # bottleneck blocks; dilation grows the receptive field to the whole image
    cond_dim: int = 64
    vocabulary: tuple[str, ...] = ()  # colour names of the ``embedding`` mode, training phrases of ``text``
    text_encoder: str = ""  # ``text`` mode: the Hugging Face encoder (name or path) that embeds phrases
    text_dim: int = 384  # ``text`` mode: that encoder's embedding size
    image_size: int = 128

    def __post_init__(self):
        object.__setattr__(self, "multipliers", tuple(self.multipliers))
        object.__setattr__(self, "mid_dilations", tuple(self.mid_dilations))
        object.__setattr__(self, "vocabulary", tuple(self.vocabulary))
        if self.conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning {self.conditioning!r} is unknown; expected one of {CONDITIONING_MODES}")
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r} is unknown; expected one of {HEADS}")
        if self.conditioning == "embedding" and not self.vocabulary:
            raise ValueError("conditioning 'embedding' needs a non-empty vocabulary of colour names")
        if self.conditioning == "text" and (not self.text_encoder or self.text_dim < 1):
            raise ValueError("conditioning 'text' needs text_encoder (a model name or path) and a positive text_dim")
        if self.base_width < 8 or self.base_width % 8:
            raise ValueError(f"base_width must be a positive multiple of 8, got {self.base_width}")
        if not self.multipliers or min(self.multipliers) < 1:
            raise ValueError(f"multipliers must be a non-empty tuple of positive integers, got {self.multipliers}")
        if self.image_size % 2 ** len(self.multipliers):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**levels = {2 ** len(self.multipliers)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def predicts_colour(self) -> bool:
        """The mask head paints a given RGB, except in ``text`` mode, where it reads the colour from the phrase."""
        return self.head == "mask" and self.conditioning == "text"


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


class Condition(nn.Module):
    """Turns the colour into what the UNet consumes: extra input channels (concat) or a vector (FiLM)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mode = cfg.conditioning
        self.extra_channels = 3 if self.mode == "concat" else 0
        self.dim = None if self.mode == "concat" else cfg.cond_dim
        if self.mode == "film":
            self.encode = nn.Sequential(nn.Linear(3, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim))
        elif self.mode == "embedding":
            self.encode = nn.Sequential(nn.Embedding(len(cfg.vocabulary), cfg.cond_dim), nn.SiLU())
        elif self.mode == "text":
            # The frozen encoder's embeddings of the vocabulary: saved with the weights, never trained.
            self.register_buffer("phrases", torch.zeros(len(cfg.vocabulary), cfg.text_dim))
            self.encode = nn.Sequential(nn.Linear(cfg.text_dim, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim))
        # Phrase embedding -> RGB, solved by ``fit_colour`` rather than trained: every training phrase's colour is known.
        self.colour = nn.Linear(cfg.text_dim, 3).requires_grad_(False) if cfg.predicts_colour else None

    def forward(self, outline: torch.Tensor, rgb: torch.Tensor, token: torch.Tensor | None):
        """(UNet input, FiLM vector or None, (B, 3) colour read from the phrase or None)."""
        if self.mode == "concat":
            colour = rgb[:, :, None, None].expand(-1, -1, *outline.shape[-2:])  # (B, 3, H, W)
            return torch.cat([outline, colour.to(outline.dtype)], dim=1), None, None
        if self.mode in ("embedding", "text") and (token is None or (token.ndim == 1 and (token < 0).any())):
            raise ValueError(f"the {self.mode} mode needs a token in its vocabulary for every colour")
        if self.mode == "embedding":
            return outline, self.encode(token), None
        if self.mode == "text":
            text = (self.phrases[token] if token.ndim == 1 else token).to(self.phrases.dtype)  # (B, text_dim)
            return outline, self.encode(text), self.colour(text) if self.colour is not None else None
        return outline, self.encode(rgb), None

    @torch.no_grad()
    def fit_colour(self, rgb: torch.Tensor, ridge: float = 1e-5) -> None:
        """Solve the phrase -> colour map on the vocabulary: ridge least squares from ``phrases`` (V, text_dim)
        to ``rgb`` (V, 3) in [0, 1]. SGD on it from image batches underfits (17 levels off after 3 epochs)."""
        x = torch.cat([self.phrases, torch.ones(len(self.phrases), 1, device=self.phrases.device)], dim=1).double()
        w = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype, device=x.device), x.T @ rgb.to(x))
        self.colour.weight.copy_(w[:-1].T)
        self.colour.bias.copy_(w[-1])


class ConditionalUNet(nn.Module):
    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.cfg = cfg
        self.condition = Condition(cfg)
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

    def logits(self, outline: torch.Tensor, rgb: torch.Tensor, token: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, H, W) mask logits for the ``mask`` head (then 3 colour channels when it predicts the colour),
        (B, 3, H, W) colour logits for ``rgb``."""
        x, cond, colour = self.condition(outline, rgb, token)
        skips = []
        for stage in self.down:
            x = stage(x, cond)
            skips.append(x)
            x = self.pool(x)
        for block in self.mid:
            x = block(x, cond)
        for upsample, stage in zip(self.upsample, self.up):
            x = stage(torch.cat([upsample(x), skips.pop()], dim=1), cond)
        out = self.out(x)
        if colour is not None:  # (B, 3) read from the phrase: constant channels after the mask logit
            out = torch.cat([out, colour[:, :, None, None].expand(-1, -1, *out.shape[-2:]).to(out.dtype)], dim=1)
        return out

    def render(self, logits: torch.Tensor, rgb: torch.Tensor, hard: bool = False) -> torch.Tensor:
        """Logits -> (B, 3, H, W) image in [0, 1]; ``hard`` thresholds to exactly white or the colour."""
        if self.cfg.head == "rgb":
            image = torch.sigmoid(logits.float())
            return torch.round(image * 255) / 255 if hard else image
        mask = (logits[:, :1] > 0).float() if hard else torch.sigmoid(logits[:, :1].float())  # (B, 1, H, W)
        colour = self.colour(logits, rgb, hard)[:, :, None, None]  # (B, 3, 1, 1)
        return mask * colour + (1 - mask)

    def colour(self, logits: torch.Tensor, rgb: torch.Tensor, hard: bool = False) -> torch.Tensor:
        """(B, 3) the colour the mask head paints: the given RGB, or the one predicted from the phrase."""
        if not self.cfg.predicts_colour:
            return rgb.float()
        colour = logits[:, 1:, 0, 0].float().clamp(0, 1)
        return torch.round(colour * 255) / 255 if hard else colour

    def forward(self, outline: torch.Tensor, rgb: torch.Tensor, token: torch.Tensor | None = None,
                hard: bool = False, logits: bool = False) -> torch.Tensor:  # fmt: skip
        """(B, 3, H, W) image in [0, 1]; the raw logits with ``logits=True`` (for losses, through DDP)."""
        out = self.logits(outline, rgb, token)
        return out if logits else self.render(out, rgb, hard)


def target_mask(target: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) target image -> (B, 1, H, W) polygon mask: every pixel that is not white."""
    return (target < 1 - 1 / 510).any(dim=1, keepdim=True).float()


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
