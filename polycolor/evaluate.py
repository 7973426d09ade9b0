"""A checkpoint's metrics (``polycolor.metrics``) on a dataset split, and a visual report of its worst and best.

    python -m polycolor.evaluate --checkpoint CKPT --data SPLIT_DIR [--report DIR] [--ray]

A large split, one in object storage, or any with ``--ray`` is scored on Ray Data (``polycolor.batch``), its
metrics summed the same way.
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

from polycolor.images import paint
from polycolor.metrics import per_image, summarize

LARGE = 2000  # pairs above which a split is scored on Ray Data, streamed, not read into memory


def evaluate_split(colorizer, split) -> tuple[dict[str, float], dict[str, np.ndarray], np.ndarray]:
    """Return (metrics, per-image metrics, predictions (N, H, W, 3) uint8) of ``colorizer`` on a ``Split``."""
    predictions = colorizer.colorize_arrays(split.outlines, colorizer.condition(split.colors))
    pred = torch.from_numpy(predictions).permute(0, 3, 1, 2).float() / 255
    target = torch.from_numpy(split.targets).permute(0, 3, 1, 2).float() / 255
    values = per_image(pred, target)
    metrics = summarize({k: float(v.sum()) for k, v in values.items()}, len(split))
    return metrics, {k: v.numpy() for k, v in values.items()}, predictions


def write_report(
    report: Path, names: list[str], colours: list[str], per: dict[str, np.ndarray], arrays, rows: int = 6
) -> None:
    """Write per_sample.json and a grid (outline | truth | prediction | error) of the worst and best samples;
    ``arrays(indices)`` gives those samples' (outlines, targets, predictions)."""
    report.mkdir(parents=True, exist_ok=True)
    samples = [
        {"input": name, "colour": colour} | {k: round(float(v[i]), 6) for k, v in per.items()}
        for i, (name, colour) in enumerate(zip(names, colours))
    ]
    (report / "per_sample.json").write_text(json.dumps(samples, indent=2))
    order = np.argsort(per["pixel_exact"], kind="stable")
    picked = list(dict.fromkeys([*order[:rows], *order[::-1][:rows]]))
    tiles = []
    for outline, target, prediction in zip(*arrays(picked)):
        outline = paint(outline)
        error = np.abs(prediction.astype(int) - target.astype(int)).max(axis=2)
        heat = np.stack([np.full_like(error, 255), 255 - error, 255 - error], axis=2).astype(np.uint8)  # red = wrong
        tiles.append(np.concatenate([outline, target, prediction, heat], axis=1))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(report / "worst_and_best.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polycolor.evaluate", description="Score a checkpoint on a dataset split."
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint directory or URI (model.safetensors + config.json)"
    )
    parser.add_argument("--data", required=True, help="a split directory or URI holding data.json, inputs/, outputs/")
    parser.add_argument("--report", help="write per-sample metrics and a worst/best PNG grid here")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--ray",
        action="store_true",
        help=f"score on Ray Data whatever the size (the default above {LARGE} pairs, and for a URI)",
    )
    args = parser.parse_args(argv)

    from polycolor import batch, storage
    from polycolor.checkpoint import CheckpointError
    from polycolor.data import DatasetError, read_split
    from polycolor.predict import Colorizer

    failed = []
    try:
        colorizer = Colorizer.from_checkpoint(args.checkpoint, device=args.device)
        source = batch.from_split(args.data)
        names, colours = [Path(n).stem for n in source.rows["image"].to_pylist()], source.rows["colour"].to_pylist()
        if args.ray or len(source.rows) > LARGE or storage.is_uri(args.data):
            from polycolor.runs import init_ray

            init_ray()
            per, scored, failed = batch.score_all(source, args.checkpoint, colorizer.image_size)
            names, colours = [names[i] for i in scored], [colours[i] for i in scored]

            def arrays(picked: list[int]):
                return picked_arrays(colorizer, source, [int(scored[i]) for i in picked])
        else:
            split = read_split(args.data, size=colorizer.image_size)
            _, per, predictions = evaluate_split(colorizer, split)

            def arrays(picked: list[int]):
                return split.outlines[picked], split.targets[picked], predictions[picked]
    except (CheckpointError, DatasetError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for row in failed:
        print(f"error: {row['error']} (colour {row['colour']!r})", file=sys.stderr)
    if not len(names):
        print(f"error: {args.data}: no pair could be scored", file=sys.stderr)
        return 2
    metrics = summarize({k: float(v.sum()) for k, v in per.items()}, len(names))
    if args.report:
        write_report(Path(args.report), names, colours, per, arrays)
    print(
        json.dumps(
            {"data": str(args.data), "pairs": len(names)}
            | ({"failed": len(failed)} if failed else {})
            | {k: round(v, 6) for k, v in metrics.items()},
            indent=2,
        )
    )
    return 1 if failed else 0


def picked_arrays(colorizer, source, rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (outlines, targets, predictions) of a few ``source`` rows, read and coloured here."""
    from polycolor.data import open_image
    from polycolor.images import outline_array, target_array

    picked = source.rows.take(rows).to_pylist()
    outlines = np.stack([outline_array(open_image(source.root, r["image"]), colorizer.image_size) for r in picked])
    targets = np.stack([target_array(open_image(source.root, r["target"]), colorizer.image_size) for r in picked])
    return outlines, targets, colorizer.colorize_arrays(outlines, colorizer.condition([r["colour"] for r in picked]))


if __name__ == "__main__":
    sys.exit(main())
