"""Image metrics, per image and summarised; used by training (every epoch) and ``polycolor.evaluate``.

Images in [0, 1]; the truth's polygon is every non-white pixel and its colour is the one it is filled with.
  l1, psnr           over all pixels and channels (psnr from the mean squared error, capped at 100 dB)
  pixel_exact        share of pixels whose three channels are all within 16/255 of the truth
  iou                polygon IoU; a predicted pixel is in the polygon when it is nearer the colour than white
  color_error        mean absolute channel error inside the true polygon (x255 for 8-bit levels)
  inside_r/g/b       the predicted image's average colour inside the true polygon, 0-255 (a debugging aid:
  true_r/g/b         beside the truth's, it shows a colour drifting, as the published write-up logged it)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch

T = TypeVar("T")

EXACT_TOLERANCE = 16 / 255
METRICS = (
    "l1",
    "mse",
    "pixel_exact",
    "iou",
    "color_error",
    "inside_r",
    "inside_g",
    "inside_b",
    "true_r",
    "true_g",
    "true_b",
)
SCORE = "pixel_exact"  # the validation metric that ranks checkpoints (higher is better), then the lowest l1


def polygon(target: torch.Tensor) -> torch.Tensor:
    """Return the (B, 1, H, W) polygon mask of a (B, 3, H, W) target: every pixel that is not white."""
    return (target < 1 - 1 / 510).any(dim=1, keepdim=True).float()


def per_image(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return a (B,) tensor per metric of a (B, 3, H, W) prediction and its truth."""
    pred, target = pred.float(), target.float()
    diff = (pred - target).abs()
    truth = polygon(target)  # (B, 1, H, W)
    area = truth.sum((1, 2, 3)).clamp(min=1)
    true_rgb = (target * truth).sum((2, 3)) / area[:, None]  # (B, 3) the fill colour
    inside_rgb = (pred * truth).sum((2, 3)) / area[:, None]  # (B, 3) the prediction's average there
    colour = true_rgb[:, :, None, None]
    inside = (pred - colour).square().sum(1) < (pred - 1).square().sum(1)  # (B, H, W) nearer the colour than white
    truth = truth[:, 0] > 0
    return {
        "l1": diff.mean((1, 2, 3)),
        "mse": diff.square().mean((1, 2, 3)),
        "pixel_exact": (diff <= EXACT_TOLERANCE + 1e-6).all(dim=1).float().mean((1, 2)),
        "iou": (truth & inside).sum((1, 2)) / (truth | inside).sum((1, 2)).clamp(min=1),
        "color_error": (diff.mean(1) * truth).sum((1, 2)) / area,
        **{f"inside_{c}": inside_rgb[:, i] * 255 for i, c in enumerate("rgb")},
        **{f"true_{c}": true_rgb[:, i] * 255 for i, c in enumerate("rgb")},
    }


def rank(metrics: Mapping[str, float]) -> tuple[float, float]:
    """Return the key that orders checkpoints, best last: validation pixel_exact, then the lowest l1."""
    return metrics[SCORE], -metrics["l1"]


def best(candidates: Iterable[tuple[T, Mapping[str, float]]]) -> tuple[T, Mapping[str, float]] | None:
    """Return the (checkpoint, metrics) pair of ``candidates`` that ranks best, or None when there is none.

    The one place a best checkpoint is chosen: a run's best (``polycolor.train``) and a search's (``tune.search``).
    """
    return max(candidates, key=lambda pair: rank(pair[1]), default=None)


def summarize(sums: dict[str, float], count: int) -> dict[str, float]:
    """Return the reported means, with psnr, of per-image sums over ``count`` images."""
    out = {name: sums[name] / max(count, 1) for name in METRICS}
    out["psnr"] = min(100.0, 10 * math.log10(1 / out["mse"])) if out["mse"] > 0 else 100.0
    return out


def colour_line(metrics: dict) -> str:
    """Return 'inside (r, g, b) vs true (r, g, b)' for the console."""
    inside = ", ".join(f"{metrics[f'inside_{c}']:.0f}" for c in "rgb")
    true = ", ".join(f"{metrics[f'true_{c}']:.0f}" for c in "rgb")
    return f"colour inside ({inside}) vs true ({true})"
