"""Drawings as people make them, with their exact truth: one to four polygons anywhere on a canvas of any
size, side by side or nested, drawn by different tools.

A drawing's geometry is a list of closed polylines in canvas pixels. From it come the *image* (what a user
would upload) and the *truth*: the clean closed outline plus everything it encloses (the real data's rule,
a 4-connected flood fill from the border), at the image's size. Styles:

Canvases are 128x128 unless ``size`` says (64-1024 px, square or not, in the benchmark's large set).

- ``clean``: the binary black-on-white outline, as in the real data.
- ``antialiased``: the same geometry drawn with anti-aliasing (drawing programs, SVG, the browser canvas).
- ``ink``: anti-aliased, in dark blue, grey or pencil ink on off-white or grey paper, with mild noise and
  uneven lighting.
- ``jpeg``: anti-aliased, then JPEG-compressed at quality 40-90.
- ``gaps``: the clean outline with 1-3 gaps of 1-3 px erased; the truth is still that of the closed outline,
  which a flood fill of the image cannot find (it leaks).

Scoring: the truth of a binary style is exact at every pixel. An anti-aliased image only says how much of a
pixel the outline covers, so its truth comes from the geometry drawn at 4x: a pixel is filled when the
filled region covers at least half of it, and a pixel the filled region covers only in part (the outer rim
of each outline, where the anti-aliased edge is) is not scored (``care`` is False there). Every other pixel
must be exactly right.

``bench/train_quality.py`` scores the model and ``flood_fill`` on held-out sets of each kind. Training draws its
pairs with ``polycolor.generator``, a batch at a time in these conventions; ``DrawingDataset`` makes them one
image at a time, the reference the generator's statistics and speed are measured against.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from polycolor.colors import RGB, parse_color
from polycolor.data import REAL_PALETTE
from polycolor.images import ink_mask, outline_array, paint
from polycolor.synth import OTHER_SHAPES, REAL_SHAPES, SyntheticDataset, random_color, shape_points

STYLES = ("clean", "antialiased", "ink", "jpeg", "gaps")
TRAINING_MIX = (
    1 / 8,
    1 / 8,
    1 / 8,
    1 / 8,
    1 / 2,
)  # each style's share of the drawings trained on: closing a gap is the hardest
SUPERSAMPLE = 4


@dataclass
class Drawing:
    image: np.ndarray  # (H, W, 3) uint8, as a user would upload it
    truth: np.ndarray  # (H, W) bool: the closed outline and everything it encloses
    care: np.ndarray  # (H, W) bool: the pixels scored (all but an anti-aliased outline's partly covered rim)
    color: str
    rgb: RGB
    shapes: int
    width: int  # of the outline's lines, in canvas pixels
    style: str

    @property
    def target(self) -> np.ndarray:
        """Return (H, W, 3) uint8: the truth painted in the drawing's colour on white."""
        return paint(self.truth, self.rgb)


def rasterize(polylines: Sequence[np.ndarray], width: int, shape: tuple[int, int], scale: int = 1) -> np.ndarray:
    """Return (H * scale, W * scale) bool: the closed ``polylines`` (canvas pixels) drawn ``width`` px wide, without
    anti-aliasing, at ``scale`` times the canvas's resolution."""
    height, wide = shape
    image = Image.new("L", (wide * scale, height * scale), 0)
    draw = ImageDraw.Draw(image)
    for points in polylines:
        xy = [tuple(p) for p in (np.vstack([points, points[:1]]) * scale + (scale - 1) / 2).tolist()]
        draw.line(xy, fill=255, width=width * scale, joint="curve")
    return np.asarray(image) > 0


def fill(outline: np.ndarray) -> np.ndarray:
    """Return the outline plus everything it encloses (4-connected from the border, as the real targets are)."""
    return ndimage.binary_fill_holes(outline)


def place(
    rng: np.random.Generator, shape: tuple[int, int], count: int, nested: bool, width: int
) -> list[np.ndarray] | None:
    """Return ``count`` shapes (the second inside the first when ``nested``, clear of its outline) that each enclose
    something, anywhere on the canvas (up to its border), their bounding circles at most just touching (so two
    outlines sometimes meet); None when this draw did not fit."""
    height, wide = shape
    side = min(height, wide)
    placed: list[tuple[np.ndarray, np.ndarray, float]] = []  # (points, centre, radius)
    for i in range(count):
        kind = str(rng.choice(REAL_SHAPES if rng.random() < 0.4 else OTHER_SHAPES))
        angle = rng.uniform(0, 2 * np.pi)
        unit = shape_points(kind, rng) @ np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
        for _ in range(50):
            if nested and i == 1:
                _, outer_centre, outer_radius = placed[0]
                radius = outer_radius * rng.uniform(0.2, 0.45)
                centre = outer_centre + rng.uniform(-0.3, 0.3, 2) * outer_radius
            else:
                top = 0.48 if count == 1 or nested else 0.9 / (count + 1)
                radius = side * rng.uniform(0.06, top) + width
                centre = np.array([rng.uniform(0, wide - 1), rng.uniform(0, height - 1)])
            points = unit * radius + centre
            margin = width / 2
            if points.min() < margin or (points.max(axis=0) > np.array([wide, height]) - 1 - margin).any():
                continue
            if not (nested and i == 1) and any(np.hypot(*(centre - c)) < 0.95 * (radius + r) for _, c, r in placed):
                continue  # the bounding circles may just touch
            placed.append((points, centre, radius))
            break
        else:
            return None
    polylines = [p for p, _, _ in placed]
    for points in polylines:
        alone = rasterize([points], width, shape)
        if fill(alone).sum() < alone.sum() + 4:
            return None  # encloses nothing
    if nested:
        inner, outer = rasterize(polylines[1:2], width, shape), rasterize(polylines[:1], width, shape)
        interior = fill(outer) & ~ndimage.binary_dilation(outer, iterations=2)
        if not (fill(inner) <= interior).all():
            return None
    return polylines


def erase_gaps(
    outline: np.ndarray, polylines: Sequence[np.ndarray], width: int, rng: np.random.Generator
) -> np.ndarray:
    """Return a copy of ``outline`` with 1-3 gaps of 1-3 px cut across its lines at random points."""
    image = Image.fromarray(np.where(outline, 255, 0).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        points = polylines[int(rng.integers(len(polylines)))]
        k = int(rng.integers(len(points)))
        a, b = points[k], points[(k + 1) % len(points)]
        along = (b - a) / max(np.hypot(*(b - a)), 1e-9)
        across = np.array([-along[1], along[0]])
        middle = a + rng.uniform(0.25, 0.75) * (b - a)
        gap, reach = int(rng.integers(1, 4)), width + 2
        corners = [middle + s * along * gap / 2 + t * across * reach for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        draw.polygon([tuple(c) for c in corners], fill=0)
    return np.asarray(image) > 0


def coverage(fine: np.ndarray) -> np.ndarray:
    """Return the share of each canvas pixel that a ``SUPERSAMPLE``-times finer bool mask covers."""
    h, w = fine.shape[0] // SUPERSAMPLE, fine.shape[1] // SUPERSAMPLE
    return fine.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))


def on_paper(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return (H, W, 3) uint8: ink of coverage ``ink`` (0-1) in a dark blue, grey or pencil tone on off-white or grey
    paper, with mild noise and lighting that falls off across the sheet."""
    height, wide = ink.shape
    paper = (
        np.array([rng.uniform(225, 255), rng.uniform(222, 252), rng.uniform(210, 248)])
        if rng.random() < 0.6
        else np.full(3, rng.uniform(205, 235))
    )
    tone = rng.choice(["blue", "grey", "pencil"])
    pen = {
        "blue": np.array([rng.uniform(10, 50), rng.uniform(20, 60), rng.uniform(90, 150)]),
        "grey": np.full(3, rng.uniform(40, 100)),
        "pencil": np.full(3, rng.uniform(70, 115)),
    }[tone]
    if tone == "pencil":  # graphite leaves grain: the stroke's darkness varies along it
        ink = ink * rng.uniform(0.75, 1.0, ink.shape)
    y, x = np.mgrid[0:height, 0:wide] / max(height, wide)
    direction = rng.uniform(-1, 1, 2)
    light = 1 - rng.uniform(0.02, 0.12) * np.clip(direction[0] * x + direction[1] * y + 0.5, 0, 1.5)
    image = (paper * (1 - ink[..., None]) + pen * ink[..., None]) * light[..., None]
    image += rng.normal(0, rng.uniform(1, 5), image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def draw(
    seed: Sequence[int] | int,
    style: str = "clean",
    shapes: int | None = None,
    nested: bool = False,
    size: tuple[int, int] = (128, 128),
) -> Drawing:
    """Return one drawing from its own seed: ``shapes`` (1-4; random when None) shapes, the second inside the first
    when ``nested``, line widths 1-6 px, on a (height, width) canvas, in ``style``."""
    if style not in STYLES:
        raise ValueError(f"style {style!r} is unknown; expected one of {STYLES}")
    rng = np.random.default_rng(seed)
    while True:
        count = 2 if nested else shapes or int(rng.integers(1, 5))
        width = int(rng.integers(1, 7))
        polylines = place(rng, size, count, nested, width)
        if polylines is None:
            continue
        outline = rasterize(polylines, width, size)
        if style in ("clean", "gaps"):
            truth, care = fill(outline), np.ones(size, bool)
            if style == "gaps":
                outline = erase_gaps(outline, polylines, width, rng)
                if (fill(outline) == truth).all():
                    continue  # no gap opened the outline: draw again
            image = paint(outline)
        else:
            fine = rasterize(polylines, width, size, SUPERSAMPLE)
            inside = coverage(fill(fine))
            truth, care = inside >= 0.5, (inside == 0) | (inside == 1)
            ink = coverage(fine)
            image = (
                on_paper(ink, rng)
                if style == "ink"
                else np.repeat(np.rint(255 * (1 - ink)).astype(np.uint8)[..., None], 3, axis=2)
            )
            if style == "jpeg":
                image = jpeg(image, int(rng.integers(40, 91)))
        color, rgb = random_color(rng)
        return Drawing(image, truth, care, color, rgb, count, width, style)


def flood_fill(image: np.ndarray) -> np.ndarray:
    """Return the algorithm's answer for a drawing: its ink (read as the model's input is, ``ink_mask``) and everything
    that ink encloses."""
    return fill(ink_mask(Image.fromarray(image)))


def score(painted: np.ndarray, drawing: Drawing) -> dict[str, float]:
    """Return, over the pixels scored, pixel_exact (the share exactly the truth's colour) and the IoU of what is painted
    (not white) with the truth, of an (H, W, 3) answer."""
    right = (painted == drawing.target).all(axis=2)[drawing.care]
    filled = (painted != 255).any(axis=2) & drawing.care
    union = (filled | drawing.truth & drawing.care).sum()
    return {"pixel_exact": float(right.mean()), "iou": float((filled & drawing.truth).sum() / union) if union else 1.0}


class DrawingDataset(SyntheticDataset):
    """A ``SyntheticDataset`` whose pairs are, in the share ``scenes``, drawings in a random style (in the shares
    of ``TRAINING_MIX``; a fifth of them nested), read as the model reads an upload (``outline_array``), with the
    fill of their closed outline as the target."""

    def __init__(self, length: int, seed: int | Sequence[int] = 0, colors: Sequence[str] = (), scenes: float = 0.6):
        super().__init__(length, seed, colors=colors)
        self.scenes = scenes

    def __getitem__(self, i: int):
        seed = (*self.seed, self.epoch, i)
        rng = np.random.default_rng((*seed, 1))
        if rng.random() >= self.scenes:
            return super().__getitem__(i)
        drawing = draw((*seed, 2), str(rng.choice(STYLES, p=TRAINING_MIX)), nested=rng.random() < 0.2)
        name = str(rng.choice(self.colors)) if self.colors else drawing.color
        target = paint(drawing.truth, parse_color(name, REAL_PALETTE)) if self.colors else drawing.target
        ink = outline_array(Image.fromarray(drawing.image))
        return torch.from_numpy(ink).float()[None], torch.from_numpy(target).permute(2, 0, 1).float() / 255, name
