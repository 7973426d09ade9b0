"""Train each preset at one budget and score its best checkpoint where it was never trained.

    python bench/train_quality.py [--presets recipe published] [--ayna ../shared/datasets/ayna] [--ship] [-- extra
    train flags]

Every preset trains for the recipe's epochs and pairs (as many pairs seen; each prints its own wall time: the
recipe's first epochs are at half size) unless the extra flags say otherwise. Evaluates on: the real validation
split, a fresh synthetic split (unseen poses and colours), and shapes the generator never draws (arrow, L,
heart, house, crescent-free concave "T") in random CSS/hex colours. Then on drawings as people make them
(``polycolor.drawings``: one shape, several, nested, anti-aliased, ink on paper, JPEG, 64-1024 px, outlines
with gaps), answered at the input's size as a user gets them, beside a flood fill of the same images. Prints
a table per preset and the wall times, writes results.json and bench/showcase.png (the README's picture,
from the first preset); ``--ship`` exports the recipe's best to polycolor/pretrained when it meets every bar.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from polycolor import checkpoint, drawings, synth
from polycolor.colors import parse_color, to_hex
from polycolor.config import PRESETS, preset
from polycolor.data import REAL_PALETTE, Split, read_split
from polycolor.evaluate import evaluate_split
from polycolor.predict import Colorizer

ROOT = Path(__file__).resolve().parents[1]
BAR = {"pixel_exact": 0.999, "iou": 0.995, "color_error": 2 / 255}

NOVEL = {  # unit-radius outlines the generator never draws
    "arrow": [(-1, -0.3), (0.2, -0.3), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.3), (-1, 0.3)],
    "ell": [(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)],
    "house": [(-0.8, 1), (-0.8, -0.2), (0, -1), (0.8, -0.2), (0.8, 1)],
    "tee": [(-1, -1), (1, -1), (1, -0.4), (0.3, -0.4), (0.3, 1), (-0.3, 1), (-0.3, -0.4), (-1, -0.4)],
    "heart": [
        (16 * np.sin(t) ** 3 / 17, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 17)
        for t in np.linspace(0, 2 * np.pi, 60, endpoint=False)
    ],
}


def novel_split(n: int, seed: int = 7) -> Split:
    rng = np.random.default_rng(seed)
    names = [c for c in synth.NAMED_COLORS if c not in REAL_PALETTE]
    outlines, targets, colours, inputs = [], [], [], []
    while len(outlines) < n:
        kind = list(NOVEL)[len(outlines) % len(NOVEL)]
        angle, radius, width = rng.uniform(0, 2 * np.pi), rng.uniform(20, 50), int(rng.integers(1, 5))
        rotation = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
        points = np.array(NOVEL[kind]) @ rotation * radius + 64
        ink = synth.draw_outline(points, width, 128)
        if ndimage.binary_fill_holes(ink).sum() < ink.sum() + 4:
            continue  # a 1 px outline that leaks under the 4-connected fill encloses nothing: not a polygon
        i = len(outlines)
        name = str(rng.choice(names)) if i % 2 else to_hex(tuple(int(v) for v in rng.integers(0, 200, 3)))
        target = np.full((128, 128, 3), 255, np.uint8)
        target[ndimage.binary_fill_holes(ink)] = parse_color(name)
        outlines.append(ink), targets.append(target), colours.append(name), inputs.append(kind)
    return Split(np.stack(outlines), np.stack(targets), colours, inputs)


def drawing_sets(n: int = 200, seed: int = 31) -> dict[str, list[drawings.Drawing]]:
    """Held-out drawings of each kind (polycolor.drawings), each set from its own seeds."""
    rng = np.random.default_rng(seed)
    sizes = [(int(h), int(w)) for h, w in rng.integers(64, 1025, (n // 4, 2))]
    return {
        "single shapes": [drawings.draw((seed, 0, i), "clean", shapes=1) for i in range(n)],
        "several shapes": [drawings.draw((seed, 1, i), "clean", shapes=2 + i % 3) for i in range(n)],
        "nested": [drawings.draw((seed, 2, i), "clean", nested=True) for i in range(n)],
        "anti-aliased": [drawings.draw((seed, 3, i), "antialiased") for i in range(n)],
        "ink on paper": [drawings.draw((seed, 4, i), "ink") for i in range(n)],
        "JPEG q40-90": [drawings.draw((seed, 5, i), "jpeg") for i in range(n)],
        "64-1024 px": [drawings.draw((seed, 6, i), "clean", size=size) for i, size in enumerate(sizes)],
        "gaps 1-3 px": [drawings.draw((seed, 7, i), "gaps") for i in range(n)],
    }


def score_drawings(colorizer: Colorizer, sets: dict[str, list[drawings.Drawing]]) -> dict[str, dict]:
    """The model (as a user calls it: any image, answered at the input's size) and a flood fill of the same
    image, on every set of drawings: mean pixel_exact and IoU over the pixels scored."""
    rows = {}
    print(
        f"\n{'drawings':<16} {'n':>4} {'model pixel_exact':>18} {'model iou':>10} {'flood-fill pixel_exact':>23} "
        f"{'flood-fill iou':>15}  bar"
    )
    for label, items in sets.items():
        answers = colorizer.colorize_batch(
            [Image.fromarray(d.image) for d in items], [d.color for d in items], original_size=True
        )
        model = [drawings.score(np.asarray(a), d) for a, d in zip(answers, items)]
        flood = [drawings.score(drawings.paint(drawings.flood_fill(d.image), d.rgb), d) for d in items]
        row = {"drawings": len(items)} | {
            f"{who}_{k}": float(np.mean([s[k] for s in scores]))
            for who, scores in (("model", model), ("flood_fill", flood))
            for k in ("pixel_exact", "iou")
        }
        row["meets_bar"] = row["model_pixel_exact"] >= BAR["pixel_exact"] and row["model_iou"] >= BAR["iou"]
        rows[label] = row
        print(
            f"{label:<16} {len(items):>4} {row['model_pixel_exact']:>18.5f} {row['model_iou']:>10.5f} "
            f"{row['flood_fill_pixel_exact']:>23.5f} "
            f"{row['flood_fill_iou']:>15.5f}  {'yes' if row['meets_bar'] else 'NO'}"
        )
    return rows


def showcase(
    colorizer: Colorizer, sets: dict[str, Split], drawn: dict[str, list[drawings.Drawing]], path: Path
) -> None:
    """Two rows: the inputs, then the model's answers: the real validation outlines, two unseen shapes, and
    drawings with several shapes, a nested one, ink on paper and gaps."""
    real, novel = sets["real validation"], sets["unseen shapes"]
    picks = [
        (np.where(s.outlines[i], 0, 255).astype(np.uint8)[..., None].repeat(3, 2), s.colors[i])
        for s, i in [(real, i) for i in range(len(real))] + [(novel, 0), (novel, 3)]
    ]
    picks += [
        (d.image, d.color)
        for label in ("several shapes", "nested", "ink on paper", "gaps 1-3 px")
        for d in drawn[label][:2]
    ]
    answers = colorizer.colorize_batch(
        [Image.fromarray(image) for image, _ in picks], [colour for _, colour in picks], original_size=True
    )
    pad = lambda row: np.concatenate([np.pad(t, ((4, 4), (4, 4), (0, 0)), constant_values=235) for t in row], axis=1)  # noqa: E731
    Image.fromarray(
        np.concatenate([pad([image for image, _ in picks]), pad([np.asarray(a) for a in answers])], axis=0)
    ).save(path)


def train(name: str, flags: list[str], out: Path) -> tuple[Path, float]:
    """Train preset ``name`` (at the recipe's epochs unless ``flags`` say) into ``out``; (best checkpoint, seconds)."""
    budget = [] if "--epochs" in flags else ["--epochs", str(preset("recipe").optim.epochs)]
    run = f"quality-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [
        sys.executable,
        "-m",
        "polycolor.train",
        "--preset",
        name,
        *budget,
        "--out",
        str(out),
        "--storage",
        str(out / "runs"),
        "--name",
        run,
        *flags,
    ]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return out / "best", time.perf_counter() - start


def score(colorizer: Colorizer, sets: dict[str, Split]) -> dict[str, dict]:
    rows = {}
    print(f"\n{'set':<20} {'pairs':>6} {'pixel_exact':>12} {'iou':>8} {'color_err*255':>14} {'psnr':>7}  bar")
    for label, split in sets.items():
        metrics, _, _ = evaluate_split(colorizer, split)
        ok = (
            all(metrics[k] >= v for k, v in BAR.items() if k != "color_error")
            and metrics["color_error"] < BAR["color_error"]
        )
        rows[label] = metrics | {"pairs": len(split), "meets_bar": ok}
        print(
            f"{label:<20} {len(split):>6} {metrics['pixel_exact']:>12.6f} {metrics['iou']:>8.5f} "
            f"{metrics['color_error'] * 255:>14.4f} {metrics['psnr']:>7.2f}  {'yes' if ok else 'NO'}"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=tuple(PRESETS), default=["recipe", "published"])
    parser.add_argument(
        "--ayna", default=os.environ.get("POLYCOLOR_AYNA_DIR", str(ROOT.parent / "shared/datasets/ayna"))
    )
    parser.add_argument("--out", default=str(ROOT / "bench/results/quality"))
    parser.add_argument("--checkpoint", help="score this checkpoint instead of training")
    parser.add_argument(
        "--ship",
        action="store_true",
        help="export the recipe's best, when it meets every bar, to polycolor/pretrained "
        "(the weights the package ships)",
    )
    parser.add_argument("train_flags", nargs="*", help="extra flags for python -m polycolor.train (after --)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    sets = {"synthetic held-out": synth.generate(1000, seed=424242), "unseen shapes": novel_split(200)}
    if (Path(args.ayna) / "validation").is_dir():
        sets = {
            "real validation": read_split(Path(args.ayna) / "validation"),
            "real training": read_split(Path(args.ayna) / "training"),
        } | sets

    drawn = drawing_sets()
    results = {}
    for name in [args.checkpoint] if args.checkpoint else args.presets:
        best, wall = (Path(name), None) if args.checkpoint else train(name, args.train_flags, out / name)
        colorizer = Colorizer.from_checkpoint(best, device="cpu")
        results[name] = {
            "checkpoint": str(best),
            "train_wall_s": wall,
            "sets": score(colorizer, sets),
            "drawings": score_drawings(colorizer, drawn),
        }
        if wall is not None:
            print(f"{name}: training wall time {wall:.0f} s ({wall / 60:.1f} min) on {os.cpu_count()} CPUs")
        if "real validation" in sets and len(results) == 1:
            showcase(colorizer, sets, drawn, ROOT / "bench" / "showcase.png")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    met = {
        name: all(r["meets_bar"] for r in [*result["sets"].values(), *result["drawings"].values()])
        for name, result in results.items()
    }
    if args.ship and met.get("recipe"):
        checkpoint.export(results["recipe"]["checkpoint"], checkpoint.PRETRAINED)
        print(f"recipe: exported to {checkpoint.PRETRAINED}")
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
