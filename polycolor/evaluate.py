"""Metrics and a visual report for a checkpoint on a dataset split.

    python -m polycolor.evaluate --checkpoint CKPT --data SPLIT_DIR [--report DIR]

Metrics (images in [0, 1]):
  l1, psnr           over all pixels and channels (psnr from the split's mean squared error, capped at 100 dB)
  pixel_exact        share of pixels whose three channels are all within 16/255 of the truth
  iou                polygon IoU; a predicted pixel is in the polygon when it is nearer the colour than white
  color_error        mean absolute channel error inside the true polygon (x255 for 8-bit levels)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

EXACT_TOLERANCE = 16 / 255
METRICS = ("l1", "mse", "pixel_exact", "iou", "color_error")


def per_image(pred: torch.Tensor, target: torch.Tensor, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 3, H, W) prediction and truth, (B, 3) colour -> a (B,) tensor per metric."""
    pred, target, colour = pred.float(), target.float(), rgb.float()[:, :, None, None]
    diff = (pred - target).abs()
    truth = (target < 1 - 1 / 510).any(dim=1)  # (B, H, W) the true polygon: every non-white pixel
    inside = (pred - colour).square().sum(1) < (pred - 1).square().sum(1)  # (B, H, W) nearer colour than white
    union = (truth | inside).sum((1, 2)).clamp(min=1)
    area = truth.sum((1, 2)).clamp(min=1)
    return {
        "l1": diff.mean((1, 2, 3)),
        "mse": diff.square().mean((1, 2, 3)),
        "pixel_exact": (diff <= EXACT_TOLERANCE + 1e-6).all(dim=1).float().mean((1, 2)),
        "iou": (truth & inside).sum((1, 2)) / union,
        "color_error": (diff.mean(1) * truth).sum((1, 2)) / area,
    }


def summarize(sums: dict[str, float], count: int) -> dict[str, float]:
    """Per-image sums over ``count`` images -> the reported means, with psnr."""
    out = {name: sums[name] / max(count, 1) for name in METRICS}
    out["psnr"] = min(100.0, 10 * math.log10(1 / out["mse"])) if out["mse"] > 0 else 100.0
    return out


def evaluate_split(colorizer, split, batch_size: int = 32) -> tuple[dict[str, float], dict[str, np.ndarray], np.ndarray]:
    """(metrics, per-image metrics, predictions (N, H, W, 3) uint8) of ``colorizer`` on a ``Split``."""
    rgbs = split.rgbs()
    predictions = colorizer.colorize_arrays(split.outlines, split.colors)
    pred = torch.from_numpy(predictions).permute(0, 3, 1, 2).float() / 255
    target = torch.from_numpy(split.targets).permute(0, 3, 1, 2).float() / 255
    values = per_image(pred, target, torch.from_numpy(rgbs).float() / 255)
    metrics = summarize({k: float(v.sum()) for k, v in values.items()}, len(split))
    return metrics, {k: v.numpy() for k, v in values.items()}, predictions


def write_report(report: Path, split, per: dict[str, np.ndarray], predictions: np.ndarray, rows: int = 6) -> None:
    """per_sample.json and a grid (outline | truth | prediction | error) of the worst and best samples."""
    report.mkdir(parents=True, exist_ok=True)
    samples = [
        {"input": split.inputs[i] if split.inputs else str(i), "colour": split.colors[i]}
        | {k: round(float(v[i]), 6) for k, v in per.items()}
        for i in range(len(split))
    ]
    (report / "per_sample.json").write_text(json.dumps(samples, indent=2))
    order = np.argsort(per["pixel_exact"], kind="stable")
    picked = list(dict.fromkeys([*order[:rows], *order[::-1][:rows]]))
    tiles = []
    for i in picked:
        outline = np.repeat(np.where(split.outlines[i], 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        error = np.abs(predictions[i].astype(int) - split.targets[i].astype(int)).max(axis=2)
        heat = np.stack([np.full_like(error, 255), 255 - error, 255 - error], axis=2).astype(np.uint8)  # red = wrong
        tiles.append(np.concatenate([outline, split.targets[i], predictions[i], heat], axis=1))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(report / "worst_and_best.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polycolor.evaluate", description="Score a checkpoint on a dataset split.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (model.safetensors + config.json)")
    parser.add_argument("--data", required=True, help="a split directory holding data.json, inputs/, outputs/")
    parser.add_argument("--report", help="write per-sample metrics and a worst/best PNG grid here")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)

    from polycolor.checkpoint import CheckpointError
    from polycolor.data import DatasetError, read_split
    from polycolor.predict import Colorizer

    try:
        colorizer = Colorizer.from_checkpoint(args.checkpoint, device=args.device)
        split = read_split(args.data, size=colorizer.image_size)
        metrics, per, predictions = evaluate_split(colorizer, split)
    except (CheckpointError, DatasetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.report:
        write_report(Path(args.report), split, per, predictions)
    print(json.dumps({"data": str(args.data), "pairs": len(split)} | {k: round(v, 6) for k, v in metrics.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
