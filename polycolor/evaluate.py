"""A checkpoint's metrics (``polycolor.metrics``) on a dataset split, and a visual report of its worst and best.

    python -m polycolor.evaluate --checkpoint CKPT --data SPLIT_DIR [--report DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from polycolor.metrics import per_image, summarize


def evaluate_split(colorizer, split) -> tuple[dict[str, float], dict[str, np.ndarray], np.ndarray]:
    """(metrics, per-image metrics, predictions (N, H, W, 3) uint8) of ``colorizer`` on a ``Split``."""
    predictions = colorizer.colorize_arrays(split.outlines, colorizer.condition(split.colors))
    pred = torch.from_numpy(predictions).permute(0, 3, 1, 2).float() / 255
    target = torch.from_numpy(split.targets).permute(0, 3, 1, 2).float() / 255
    values = per_image(pred, target)
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
