"""Synthetic polygon outlines and their fills, in the real data's conventions.

128x128 RGB, a binary black outline (1-4 px) on white; the target is the outline plus everything it
encloses (a 4-connected hole fill, which reproduces all 61 real pairs) in one pure colour. Shapes: the
eight real ones in random poses, other regular n-gons, stars, irregular convex and concave polygons,
crosses and ellipses. Colours: the real palette, CSS names and random RGB. Deterministic per seed.

    python -m polycolor.synth OUT --train 1000 --val 100 --seed 0
    split = generate(1000, seed=(seed, epoch, rank))   # in memory, e.g. one worker's shard
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from torch.utils.data import Dataset

from polycolor.colors import CSS_COLORS, RGB, parse_color, to_hex
from polycolor.data import REAL_PALETTE, Split
from polycolor.images import IMAGE_SIZE, paint

REAL_SHAPES = ("circle", "diamond", "hexagon", "octagon", "pentagon", "square", "star", "triangle")
OTHER_SHAPES = ("ngon", "nstar", "convex", "concave", "cross", "ellipse")
# Colours too close to white would leave no visible polygon (and no defined IoU): a fill must differ
# from white by at least this much summed over channels.
MIN_INK = 96
NAMED_COLORS: dict[str, RGB] = {
    name: rgb for name, rgb in (CSS_COLORS | REAL_PALETTE).items() if 3 * 255 - sum(rgb) >= MIN_INK
}


def shape_points(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Return (K, 2) vertices of a shape of unit radius centred at the origin, before pose."""

    def ring(n: int, radii: np.ndarray | float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
        angles = phase + np.arange(n) * 2 * np.pi / n
        return np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.asarray(radii)[..., None]

    match kind:
        case "circle":
            return ring(64)
        case "ellipse":
            return ring(64) * [1.0, rng.uniform(0.35, 0.9)]
        case "triangle" | "pentagon" | "hexagon" | "octagon":
            return ring({"triangle": 3, "pentagon": 5, "hexagon": 6, "octagon": 8}[kind])
        case "square":
            return ring(4, phase=np.pi / 4)
        case "diamond":
            return ring(4) * [rng.uniform(0.55, 0.85), 1.0]
        case "ngon":
            return ring(int(rng.integers(3, 13)))
        case "star" | "nstar":
            points = 5 if kind == "star" else int(rng.integers(4, 9))
            inner = rng.uniform(0.38, 0.5) if kind == "star" else rng.uniform(0.3, 0.7)
            return ring(2 * points, np.tile([1.0, inner], points))
        case "convex":
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 10))))
            return np.stack([np.cos(angles), np.sin(angles)], axis=1) * [1.0, rng.uniform(0.5, 1.0)]
        case "concave":
            n = int(rng.integers(5, 13))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            return np.stack([np.cos(angles), np.sin(angles)], axis=1) * rng.uniform(0.3, 1.0, n)[:, None]
        case "cross":
            a = rng.uniform(0.2, 0.45)  # half the arm's width
            quarter = np.array([[a, 1.0], [a, a], [1.0, a]])
            turns = [
                quarter @ np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) for t in np.arange(4) * np.pi / 2
            ]
            return np.concatenate(turns)
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {REAL_SHAPES + OTHER_SHAPES}")


def draw_outline(points: np.ndarray, width: int, size: int) -> np.ndarray:
    """Return (size, size) bool ink of a closed polyline."""
    image = Image.new("L", (size, size), 255)
    xy = [tuple(p) for p in np.vstack([points, points[:1]]).tolist()]
    ImageDraw.Draw(image).line(xy, fill=0, width=width, joint="curve")
    return np.asarray(image) < 128


def random_pair(rng: np.random.Generator, size: int, real_share: float = 0.4) -> tuple[str, np.ndarray, np.ndarray]:
    """Return (shape kind, ink, filled mask) with a random pose; redrawn until the outline encloses something."""
    while True:
        kind = str(rng.choice(REAL_SHAPES if rng.random() < real_share else OTHER_SHAPES))
        width = int(rng.choice([1, 2, 2, 2, 3, 4]))
        radius = rng.uniform(0.1, 0.45) * size
        angle = rng.uniform(0, 2 * np.pi) if rng.random() < 0.7 else 0.0
        points = shape_points(kind, rng) @ np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
        points = points * radius
        margin = width + 1
        low, high = margin - points.min(axis=0), size - 1 - margin - points.max(axis=0)
        if (low > high).any():
            continue
        points = points + rng.uniform(low, high)
        ink = draw_outline(points, width, size)
        filled = ndimage.binary_fill_holes(ink)
        if filled.sum() >= ink.sum() + 4:  # a closed outline with an interior
            return kind, ink, filled


def random_color(rng: np.random.Generator) -> tuple[str, RGB]:
    """Return a colour name and its RGB: a third the real palette, a third CSS names, a third random RGB."""
    draw = rng.random()
    if draw < 1 / 3:
        name = str(rng.choice(list(REAL_PALETTE)))
        return name, REAL_PALETTE[name]
    if draw < 2 / 3:
        name = str(rng.choice(list(NAMED_COLORS)))
        return name, NAMED_COLORS[name]
    while True:
        rgb = tuple(int(v) for v in rng.integers(0, 256, 3))
        if 3 * 255 - sum(rgb) >= MIN_INK:
            return to_hex(rgb), rgb


def sample(
    seed: Sequence[int], size: int = IMAGE_SIZE, colors: Sequence[str] | None = None
) -> tuple[str, np.ndarray, np.ndarray, str]:
    """Return one pair from its own seed: (shape kind, (H, W) bool ink, (H, W, 3) uint8 target, colour name).

    ``colors`` restricts the colours to those names (e.g. a closed vocabulary), else they are drawn widely.
    """
    rng = np.random.default_rng(seed)
    kind, ink, filled = random_pair(rng, size)
    if colors:
        name = str(rng.choice(list(colors)))
        rgb = parse_color(name, REAL_PALETTE)
    else:
        name, rgb = random_color(rng)
    return kind, ink, paint(filled, rgb), name


def generate(
    n: int, seed: int | Sequence[int] = 0, size: int = IMAGE_SIZE, colors: Sequence[str] | None = None
) -> Split:
    """Return ``n`` synthetic pairs; the same ``seed`` (an int or a tuple such as (seed, epoch, rank)) gives the same
    pairs."""
    seed = (seed,) if isinstance(seed, int) else tuple(seed)
    kinds, inks, targets, names = zip(*(sample((*seed, i), size, colors) for i in range(n))) if n else ((), (), (), ())
    return Split(
        outlines=np.stack(inks) if n else np.empty((0, size, size), bool),
        targets=np.stack(targets) if n else np.empty((0, size, size, 3), np.uint8),
        colors=list(names),
        inputs=[f"{kind}_{i:05d}" for i, kind in enumerate(kinds)],
    )


class SyntheticDataset(Dataset):
    """``length`` fresh pairs per epoch, each made on demand from (seed, epoch, index): nothing is stored,
    any DataLoader worker can make any item, and a resumed run sees exactly the pairs it would have seen.
    Items are those of ``PolygonDataset``: outline, target, colour name; ``colors`` restricts the names."""

    def __init__(self, length: int, seed: int | Sequence[int] = 0, size: int = IMAGE_SIZE, colors: Sequence[str] = ()):
        self.length, self.size, self.epoch = length, size, 0
        self.seed = (seed,) if isinstance(seed, int) else tuple(seed)
        self.colors = list(colors)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        _, ink, target, name = sample((*self.seed, self.epoch, i), self.size, self.colors or None)
        return torch.from_numpy(ink).float()[None], torch.from_numpy(target).permute(2, 0, 1).float() / 255, name


def write_split(split: Split, out: Path) -> None:
    """Write ``split`` in the real layout: data.json, inputs/, outputs/."""
    (out / "inputs").mkdir(parents=True, exist_ok=True)
    (out / "outputs").mkdir(parents=True, exist_ok=True)
    rows = []
    for stem, name, ink, target in zip(split.inputs, split.colors, split.outlines, split.targets):
        output = f"{name.lstrip('#')}_{stem}.png"
        Image.fromarray(paint(ink)).save(out / "inputs" / f"{stem}.png")
        Image.fromarray(target).save(out / "outputs" / output)
        rows.append({"input_polygon": f"{stem}.png", "colour": name, "output_image": output})
    (out / "data.json").write_text(json.dumps(rows, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polycolor.synth", description="Write a synthetic dataset in the real layout."
    )
    parser.add_argument("out", help="output directory (created)")
    parser.add_argument("--train", type=int, default=1000, help="training pairs (default 1000)")
    parser.add_argument("--val", type=int, default=100, help="validation pairs (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=IMAGE_SIZE, help="image size in pixels (default 128)")
    args = parser.parse_args(argv)
    for name, count, seed in (("training", args.train, args.seed), ("validation", args.val, args.seed + 1)):
        write_split(generate(count, seed=seed, size=args.size), Path(args.out) / name)
    print(f"wrote {args.train} training and {args.val} validation pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
