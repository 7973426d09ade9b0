"""Training pairs made a whole batch at a time with torch, on the training device, in the conventions of
``polycolor.synth`` (single shapes in the real data's style) and ``polycolor.drawings`` (drawings as people make
them), which still draw the files and the held-out sets.

Pairs come in blocks, each from its own seed (the run's seed, the epoch, the rank, the block's index), so an
epoch replays exactly when a run resumes. A block's geometry is drawn on the CPU with numpy, a few vertices and
numbers a pair; its pixels are made on the device, a row at a time: where each row crosses the capsule around each
edge gives the stroke, and where it crosses the edges themselves gives the winding number, nonzero inside. Each
span adds one where it begins and takes one away after it ends, and a running sum along the rows counts the spans
on every pixel. So the truth is exact by construction: the closed outline and everything it encloses, before any
gap is cut or any ink is smudged. What the model reads is made as it reads an upload: the drawing in a style (a
binary outline; anti-aliased; ink on paper with grain, lighting and noise; JPEG-compressed), then its ink at Otsu's
threshold.

    batches = Batches(2000, batch_size=16, seed=(0, rank), scenes=0.6, device="cpu")
    batches.set_epoch(epoch)
    for outline, target, colours in batches: ...      # (B, 1, S, S) ink, (B, 3, S, S) target in [0, 1], names
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from polycolor.colors import parse_color, to_hex
from polycolor.data import REAL_PALETTE
from polycolor.drawings import STYLES, TRAINING_MIX
from polycolor.images import IMAGE_SIZE
from polycolor.synth import MIN_INK, NAMED_COLORS, OTHER_SHAPES, REAL_SHAPES, shape_points

PLAIN, CLEAN, ANTIALIASED, INK, JPEG, GAPS = range(6)  # a pair's style: PLAIN is synth's single shape
BLOCK = 128  # pairs made in one go
NAMES = (list(REAL_PALETTE), list(NAMED_COLORS))
PIECE = 8  # rows an edge's piece spans at most
TRIES = 50  # places tried for a shape before its drawing starts again
SUPER = 2  # sub-pixels a side of an anti-aliased stroke (drawings draws 4: the ink read differs on 0.25% of pixels)


@dataclass
class Geometry:
    """A batch's shapes, in canvas pixels: polygon edges, each owned by a shape of a pair."""

    edges: np.ndarray  # (E, 4) x0, y0, x1, y1
    edge_shape: np.ndarray  # (E,) the shape each edge belongs to
    shape_pair: np.ndarray  # (S,) the pair each shape belongs to
    gaps: np.ndarray  # (G, 6) centre x, y, unit direction along the line x, y, half length, reach across it
    gap_pair: np.ndarray  # (G,)
    width: np.ndarray  # (B,) stroke width in pixels
    style: np.ndarray  # (B,) PLAIN ... GAPS
    paper: np.ndarray  # (B, 9) for INK: paper RGB, pen RGB, how much light falls off, noise level, pencil (1) or not
    quality: np.ndarray  # (B,) JPEG quality
    names: list[str]
    rgb: np.ndarray  # (B, 3) uint8


def pose(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Return a shape's unit vertices (``synth.shape_points``: an ellipse is a 64-gon), rotated at random."""
    angle = rng.uniform(0, 2 * np.pi)
    return shape_points(kind, rng) @ np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])


def signed_area(points: np.ndarray) -> float:
    """Return the area of the closed polygon ``points``, positive where its vertices run anticlockwise on screen."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(x[:-1] @ y[1:] - y[:-1] @ x[1:] + x[-1] * y[0] - y[-1] * x[0])


def inside_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Return whether each of (N, 2) ``points`` lies inside the closed ``polygon`` (crossing number)."""
    a, b = polygon, np.roll(polygon, -1, axis=0)
    x, y = points[:, :1], points[:, 1:]
    crosses = ((a[:, 1] > y) != (b[:, 1] > y)) & (
        x < a[:, 0] + (y - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1] + 1e-12)
    )
    return crosses.sum(axis=1) % 2 == 1


def edge_distance(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Return the distance of each of (N, 2) ``points`` to the nearest edge of the closed ``polygon``."""
    a, b = polygon[None], np.roll(polygon, -1, axis=0)[None]
    d = b - a
    t = np.clip(((points[:, None] - a) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0, 1)
    return np.linalg.norm(points[:, None] - (a + t[..., None] * d), axis=-1).min(axis=1)


class Batches:
    """``length`` pairs an epoch, ``batch_size`` at a time, made on ``device``: ``scenes`` of them drawings (in
    ``mix``, the shares of ``drawings.STYLES``; a fifth nested), the rest single shapes as ``synth`` draws them;
    ``colors`` restricts the names."""

    def __init__(
        self,
        length: int,
        batch_size: int,
        seed: int | Sequence[int] = 0,
        scenes: float = 0.6,
        colors: Sequence[str] = (),
        device: str | torch.device = "cpu",
        size: int = IMAGE_SIZE,
        mix: Sequence[float] = TRAINING_MIX,
    ):
        self.length, self.batch_size, self.scenes = length, batch_size, scenes
        self.mix = np.asarray(mix, float) / sum(mix)
        self.seed = (seed,) if isinstance(seed, int) else tuple(seed)
        self.colors, self.device, self.epoch = list(colors), torch.device(device), 0
        self.resize(size)

    def resize(self, size: int) -> None:
        """Make the pairs ``size`` px square from now on (a recipe trains its first epochs at half size)."""
        self.size = size
        centres = (torch.arange(size, dtype=torch.float32) + 0.5).to(self.device)
        self.ys, self.xs = torch.meshgrid(centres, centres, indexing="ij")  # (S, S) pixel centres
        self.work: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.length // self.batch_size  # whole batches only, as drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        per_block = max(1, BLOCK // self.batch_size)  # batches made at once: per-call costs spread over more pairs
        for first in range(0, len(self), per_block):
            count = min(per_block, len(self) - first)
            outline, target, names = self.block(first // per_block, count * self.batch_size)
            for k in range(0, count * self.batch_size, self.batch_size):
                yield outline[k : k + self.batch_size], target[k : k + self.batch_size], names[k : k + self.batch_size]

    def block(self, index: int, count: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Return the current epoch's block ``index`` of ``count`` pairs: (outline, target, colour names)."""
        seed = (*self.seed, self.epoch, index)
        geometry = self.geometry(np.random.default_rng(seed), count)
        generator = torch.Generator(self.device).manual_seed(int(np.random.default_rng((*seed, 1)).integers(2**62)))
        return render(geometry, self.xs, self.ys, generator, self.work)

    # -----------------------------------------------------------------------------------------------
    # Geometry, on the CPU.

    def geometry(self, rng: np.random.Generator, count: int) -> Geometry:
        """Return ``count`` pairs' shapes, styles and colours."""
        drawing = rng.random(count) < self.scenes
        style = np.where(drawing, rng.choice(len(STYLES), count, p=self.mix) + 1, PLAIN)
        nested = drawing & (rng.random(count) < 0.2)
        edges, edge_shape, shape_pair, gaps, gap_pair, width = [], [], [], [], [], []
        for pair in range(count):
            shapes, stroke = self.shapes(rng, int(style[pair]), bool(nested[pair]))
            for polygon in shapes:
                polygon = polygon if signed_area(polygon) > 0 else polygon[::-1]  # one sense: windings add up
                edges.append(np.concatenate([polygon, np.roll(polygon, -1, axis=0)], axis=1))
                edge_shape.append(np.full(len(polygon), len(shape_pair)))
                shape_pair.append(pair)
            if style[pair] == GAPS:
                for centre, along, half in self.gap_cuts(rng, shapes):
                    # PIL's fill, which drawings erases with, covers about 3/4 px more than the rectangle
                    gaps.append([*centre, *along, half + 0.375, stroke / 2 + 2])
                    gap_pair.append(pair)
            width.append(stroke)
        names, rgb = self.colours(rng, count)
        return Geometry(
            **pieces(np.concatenate(edges).astype(np.float32), np.concatenate(edge_shape)),
            shape_pair=np.array(shape_pair),
            gaps=np.array(gaps, np.float32).reshape(-1, 6),
            gap_pair=np.array(gap_pair, int),
            width=np.array(width, np.float32),
            style=style,
            paper=papers(rng, count),
            quality=rng.integers(40, 91, count),
            names=names,
            rgb=rgb,
        )

    def colours(self, rng: np.random.Generator, count: int) -> tuple[list[str], np.ndarray]:
        """Return ``count`` colour names and their (count, 3) uint8 RGB: from ``colors`` when given, else as
        ``synth.random_color`` draws them (a third the real palette, a third CSS names, a third random RGB)."""
        if self.colors:
            names = [self.colors[k] for k in rng.integers(len(self.colors), size=count)]
            return names, np.array([parse_color(name, REAL_PALETTE) for name in names], np.uint8)
        rgb = rng.integers(0, 256, (count, 3))
        while (weak := 3 * 255 - rgb.sum(axis=1) < MIN_INK).any():  # too pale to see on white: draw again
            rgb[weak] = rng.integers(0, 256, (int(weak.sum()), 3))
        names = [to_hex(tuple(int(v) for v in colour)) for colour in rgb]
        source = rng.integers(3, size=count)
        for pair in np.flatnonzero(source < 2):
            table = NAMES[source[pair]]
            names[pair] = table[int(rng.integers(len(table)))]
            rgb[pair] = REAL_PALETTE.get(names[pair]) or NAMED_COLORS[names[pair]]
        return names, rgb.astype(np.uint8)

    def shapes(self, rng: np.random.Generator, kind: int, nested: bool) -> tuple[list, float]:
        """Return the pair's shapes' vertices and their stroke width: ``synth``'s single
        shape for PLAIN, else ``drawings.place``'s 1-4 shapes anywhere (the second inside the first when nested)."""
        while True:
            if kind == PLAIN:
                width = float(rng.choice([1, 2, 2, 2, 3, 4]))
                count, nested = 1, False
            else:
                width = float(rng.integers(1, 7))
                count = 2 if nested else int(rng.integers(1, 5))
            placed: list[tuple] = []  # (vertices, centre, radius)
            for i in range(count):
                inner = nested and i == 1
                for _ in range(4 if inner else 1):  # an inner shape gets other poses before the drawing starts again
                    if shape := self.place(rng, kind, placed, inner, count, nested, width):
                        placed.append(shape)
                        break
                else:
                    break
            if len(placed) == count:
                return [p for p, _, _ in placed], width

    def place(self, rng: np.random.Generator, kind: int, placed: list, inner: bool, count: int, nested: bool, width):
        """Return a shape placed beside the ``placed`` ones (inside the first when ``inner``), as (vertices, centre,
        radius), or None when none of ``TRIES`` places fits."""
        size = self.size
        if inner and placed[0][2] < 4 * width + 4:
            return None  # no room inside for a shape clear of the outline: as good as never fits (< 1 in 100)
        kinds = REAL_SHAPES if rng.random() < 0.4 else OTHER_SHAPES
        unit = pose(kinds[int(rng.integers(len(kinds)))], rng)
        (left, top), (right, bottom) = unit.min(axis=0), unit.max(axis=0)
        area, around = abs(signed_area(unit)), perimeter(unit)
        if inner:
            _, outer_centre, outer_radius = placed[0]
            radius = outer_radius * rng.uniform(0.2, 0.45, TRIES)
            centre = outer_centre + rng.uniform(-0.3, 0.3, (TRIES, 2)) * outer_radius
        elif kind == PLAIN:
            radius = np.minimum(rng.uniform(0.1, 0.45, TRIES) * size, (size - 3) / 2 - width)  # binds below 128 px
            centre = rng.uniform(width + 1 + radius[:, None], size - 2 - width - radius[:, None], (TRIES, 2))
        else:
            most = 0.48 if count == 1 or nested else 0.9 / (count + 1)
            radius = size * rng.uniform(0.06, most, TRIES) + width
            centre = rng.uniform(0, size - 1, (TRIES, 2))
        near, far = width / 2 + 0.5, size - 1.5 - width / 2
        fits = (
            (area * radius * radius - 0.5 * width * around * radius >= 4)  # encloses more than its own stroke
            & (centre + radius[:, None] * [left, top] >= near).all(axis=1)
            & (centre + radius[:, None] * [right, bottom] <= far).all(axis=1)
        )
        if not inner:
            for _, c, r in placed:  # bounding circles at most just touching
                fits &= np.hypot(*(centre - c).T) >= 0.95 * (radius + r)
        elif fits.any():  # inside the outer shape, clear of its outline (judged at the vertices)
            tried = np.flatnonzero(fits)[:2]
            points = (unit[None] * radius[tried, None, None] + centre[tried, None]).reshape(-1, 2) + 0.5
            outer = placed[0][0]
            clear = inside_polygon(points, outer) & (edge_distance(points, outer) > 2 * width + 2)
            fits[:] = False
            fits[tried] = clear.reshape(len(tried), -1).all(axis=1)
        if not fits.any():
            return None
        k = int(fits.argmax())
        return unit * radius[k] + centre[k] + 0.5, centre[k], radius[k]

    @staticmethod
    def gap_cuts(rng: np.random.Generator, polygons: list[np.ndarray]) -> list:
        """Return 1-3 gaps of 1-3 px, each across a random edge of a random shape, as (centre, unit direction,
        half length)."""
        cuts = []
        for _ in range(int(rng.integers(1, 4))):
            points = polygons[int(rng.integers(len(polygons)))]
            k = int(rng.integers(len(points)))
            a, b = points[k], points[(k + 1) % len(points)]
            along = (b - a) / max(np.hypot(*(b - a)), 1e-9)
            cuts.append((a + rng.uniform(0.25, 0.75) * (b - a), along, int(rng.integers(1, 4)) / 2))
        return cuts


def papers(rng: np.random.Generator, count: int) -> np.ndarray:
    """Return (count, 9) INK drawings' paper RGB and pen RGB (as ``drawings.on_paper`` picks them), how much light
    falls off, the noise's level, and 1 for a pencil."""
    white = rng.random(count) < 0.6
    paper = np.where(
        white[:, None],
        rng.uniform([225, 222, 210], [255, 252, 248], (count, 3)),
        rng.uniform(205, 235, (count, 1)),
    )
    tone = rng.integers(3, size=count)  # dark blue, grey, pencil
    pens = np.stack(
        [
            rng.uniform([10, 20, 90], [50, 60, 150], (count, 3)),
            rng.uniform(40, 100, (count, 3)),
            rng.uniform(70, 115, (count, 3)),
        ]
    )
    pens[1:] = pens[1:, :, :1]  # grey and pencil: one level in all three channels
    pen = pens[tone, np.arange(count)]
    light, noise = rng.uniform(0.02, 0.12, (count, 1)), rng.uniform(1, 5, (count, 1))
    return np.concatenate([paper, pen, light, noise, (tone == 2)[:, None]], axis=1).astype(np.float32)


def pieces(edges: np.ndarray, shape: np.ndarray) -> dict[str, np.ndarray]:
    """Return ``edges`` (E, 4) cut into collinear pieces at most ``PIECE`` rows tall, and the shape of each: the same
    strokes and crossings, each drawn on a few rows rather than the whole canvas."""
    parts = np.maximum(1, np.ceil(np.abs(edges[:, 3] - edges[:, 1]) / PIECE)).astype(np.int64)
    edge = np.repeat(np.arange(len(edges)), parts)
    j = np.arange(len(edge)) - np.repeat(np.cumsum(parts) - parts, parts)
    a, b = edges[edge, :2], edges[edge, 2:]
    t0, t1 = (j / parts[edge])[:, None], ((j + 1) / parts[edge])[:, None]
    ends = np.concatenate([a + t0 * (b - a), np.where(t1 == 1, b, a + t1 * (b - a))], axis=1)
    return {"edges": ends.astype(np.float32), "edge_shape": shape[edge]}


def perimeter(points: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(points, axis=0, append=points[:1]), axis=1).sum())


# ---------------------------------------------------------------------------------------------------
# Pixels, on the device.

JPEG_LUMA = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)


def dct_matrix(n: int = 8) -> torch.Tensor:
    k, i = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


def band(segments: np.ndarray, radius: np.ndarray, rows: int, scale: int = 1) -> tuple[np.ndarray, int]:
    """Return the first of the rows (``scale`` a pixel, ``rows`` in all) that each segment's capsule of ``radius``
    can reach, (N,), and how many rows every capsule spans at most: a segment is drawn on those rows only."""
    top = np.minimum(segments[:, 1], segments[:, 3]) - radius
    first = np.clip(np.floor(top * scale - 0.5), 0, rows - 1).astype(np.int64)
    reach = np.abs(segments[:, 3] - segments[:, 1]) + 2 * radius
    return first, int(np.ceil(reach.max(initial=0) * scale)) + 2


def add_spans(
    diff: torch.Tensor, owner: torch.Tensor, row: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: int = 1
) -> None:
    """Add one to ``diff`` (owners, H, W + 1) where each row's span [lo, hi] (in canvas pixels, ``scale``
    sub-pixels a pixel) begins and take it away after it ends: a running sum along the row then counts the spans on
    each pixel. ``owner`` (N,) names the owner of each of the N things whose spans on rows ``row`` (N, R) these are."""
    n = diff.shape[-1] - 1
    start = torch.ceil(lo * scale - 0.5).clamp(0, n).long()
    end = (torch.floor(hi * scale - 0.5) + 1).clamp(0, n).long()
    thing, k = torch.nonzero((start < end) & (row < n), as_tuple=True)  # most rows miss most things
    at = (owner[thing] * n + row[thing, k]) * (n + 1)
    ones = torch.ones(len(at), device=diff.device)
    diff.view(-1).index_add_(0, torch.cat([at + start[thing, k], at + end[thing, k]]), torch.cat([ones, -ones]))


def draw_capsules(diff: torch.Tensor, owner: torch.Tensor, segments: np.ndarray, radius: np.ndarray, scale: int = 1):
    """Add to ``diff`` (owners, H, W + 1) the capsules of ``radius`` (N,) around ``segments`` (N, 4), owned by
    ``owner`` (N,), at ``scale`` rows a pixel."""
    if not len(segments):
        return
    first, height = band(segments, radius, diff.shape[1], scale)
    device = diff.device
    row = torch.from_numpy(first).to(device)[:, None] + torch.arange(height, device=device)
    e, r = torch.from_numpy(segments).to(device), torch.from_numpy(radius).to(device)[:, None]
    add_spans(diff, owner, row, *capsules(e, r, (row + 0.5) / scale), scale)


def covered(diff: torch.Tensor) -> torch.Tensor:
    """Return where the running sum of ``diff`` along its rows is not zero (exactly: its terms are whole numbers),
    without its last column."""
    return diff.cumsum(-1).bool()[..., :-1]  # (bool() is != 0, and several times faster)


def capsules(e: torch.Tensor, radius: torch.Tensor, rows: torch.Tensor):
    """Return (lo, hi), (E, R): where each row (at height ``rows``) crosses the capsule of points within ``radius``
    (E, 1) of each segment ``e`` (E, 4); lo > hi where it does not."""
    ax, ay, bx, by = (e[:, k : k + 1] for k in range(4))
    dx, dy = bx - ax, by - ay
    length = torch.sqrt(dx * dx + dy * dy).clamp(min=1e-9)
    ux, uy = dx / length, dy / length  # along the segment; its normal is (-uy, ux)
    lo = torch.full((len(e), rows.shape[-1]), float("inf"), device=e.device)
    hi = -lo
    for cx, cy in ((ax, ay), (bx, by)):  # the two round ends
        reach = radius * radius - (rows - cy) ** 2
        half = torch.sqrt(reach.clamp(min=0))
        lo = torch.where(reach >= 0, torch.minimum(lo, cx - half), lo)
        hi = torch.where(reach >= 0, torch.maximum(hi, cx + half), hi)
    # The body: |normal . (p - a)| <= radius and 0 <= along . (p - a) <= length, for p = (x, row): two slabs, each
    # an interval in x (the whole row or none where the slab runs along it).
    left, right = lo.clone().fill_(-float("inf")), hi.clone().fill_(float("inf"))
    for slope, offset, low, high in (
        (-uy, ux * (rows - ay) + uy * ax, -radius, radius),
        (ux, uy * (rows - ay) - ux * ax, torch.zeros_like(length), length),
    ):
        flat = slope.abs() < 1e-9
        safe = torch.where(flat, 1.0, slope)
        a, b = (low - offset) / safe, (high - offset) / safe
        between = (offset >= low) & (offset <= high)
        left = torch.maximum(
            left, torch.where(flat, torch.where(between, -float("inf"), float("inf")), torch.minimum(a, b))
        )
        right = torch.minimum(
            right, torch.where(flat, torch.where(between, float("inf"), -float("inf")), torch.maximum(a, b))
        )
    has = left <= right
    return torch.where(has, torch.minimum(lo, left), lo), torch.where(has, torch.maximum(hi, right), hi)


def strokes(g: Geometry, diff: torch.Tensor, slot: np.ndarray, scale: int) -> None:
    """Add to ``diff`` (owners, H, W + 1) the capsules of the shapes' edges; ``slot`` maps each pair to its owner,
    or -1 for a pair left out."""
    owner = slot[g.shape_pair[g.edge_shape]]
    keep = owner >= 0
    draw_capsules(diff, torch.from_numpy(owner[keep]).to(diff.device), g.edges[keep], g.width[owner[keep]] / 2, scale)


def windings(g: Geometry, diff: torch.Tensor, slot: np.ndarray, scale: int) -> None:
    """Add to ``diff`` (owners, H, W + 1) each row's crossings with the shapes' edges, signed by direction, at the
    first pixel whose centre is past the crossing: their running sum along the row is the winding number, nonzero
    inside a shape (every shape runs the same way round). ``slot`` maps each pair to its owner, or -1."""
    owner = slot[g.shape_pair[g.edge_shape]]
    keep = owner >= 0
    edges, device, n = g.edges[keep], diff.device, diff.shape[-1] - 1
    first, height = band(edges, np.zeros(len(edges), np.float32), n, scale)
    row = torch.from_numpy(first).to(device)[:, None] + torch.arange(height, device=device)
    centre = (row + 0.5) / scale
    x0, y0, x1, y1 = (torch.from_numpy(np.ascontiguousarray(edges[:, k])).to(device) for k in range(4))
    up = (y0[:, None] <= centre) & (y1[:, None] > centre)
    down = (y1[:, None] <= centre) & (y0[:, None] > centre)
    edge, k = torch.nonzero(up | down, as_tuple=True)
    x = x0[edge] + (centre[edge, k] - y0[edge]) * (x1 - x0)[edge] / (y1 - y0)[edge]
    column = torch.floor(x * scale + 0.5).clamp(0, n).long()
    at = (torch.from_numpy(owner[keep]).to(device)[edge] * n + row[edge, k]) * (n + 1) + column
    diff.view(-1).index_add_(0, at, up[edge, k].float() - down[edge, k].float())


def pocketless(mask: torch.Tensor) -> torch.Tensor:
    """Return (B, 1, H, W) ``mask`` with every pixel its four neighbours enclose added: the pixel two outlines (or a
    sharp notch) pen in between them, which is no shape's inside, as a flood fill sees it."""
    around = F.pad(mask, (1, 1, 1, 1))
    return mask | around[..., :-2, 1:-1] & around[..., 2:, 1:-1] & around[..., 1:-1, :-2] & around[..., 1:-1, 2:]


def zeros(work: dict, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Return the first ``shape[0]`` rows of ``work[name]``, zeroed, made anew only when it is too small: a fresh
    allocation each batch costs more than clearing the last one."""
    if (buffer := work.get(name)) is None or len(buffer) < shape[0] or buffer.shape[1:] != shape[1:]:
        buffer = work[name] = torch.empty(shape, device=device)
    return buffer[: shape[0]].zero_()


def render(g: Geometry, xs: torch.Tensor, ys: torch.Tensor, generator: torch.Generator, work: dict):
    """Return (outline (B, 1, S, S), target (B, 3, S, S) in [0, 1], names) of a batch's geometry, on xs' device;
    ``work`` keeps the scratch buffers from one batch to the next."""
    device, batch, size = xs.device, len(g.style), xs.shape[0]
    tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    style = tensor(g.style)
    counts = zeros(work, "counts", (3 * batch, size, size + 1), device)  # strokes, winding, gaps: one running sum
    strokes(g, counts, np.arange(batch), 1)
    windings(g, counts, np.arange(batch) + batch, 1)
    if len(g.gaps):  # a gap is the segment across its line, widened along the line (a capsule with a round end)
        centre, along, half, reach = g.gaps[:, 0:2], g.gaps[:, 2:4], g.gaps[:, 4], g.gaps[:, 5:6]
        across = np.stack([-along[:, 1], along[:, 0]], axis=1)
        ends = np.concatenate([centre - reach * across, centre + reach * across], axis=1)
        draw_capsules(counts, tensor(g.gap_pair) + 2 * batch, ends, half)
    stroke, enclosed, cut = covered(counts).reshape(3, batch, 1, size, size)
    truth = pocketless(stroke | enclosed)  # the closed outline and everything it encloses
    outline = stroke & ~cut

    soft_pairs = np.flatnonzero(np.isin(g.style, (ANTIALIASED, INK, JPEG)))
    soft = tensor(soft_pairs)
    if len(soft):  # the soft styles: coverage of a finer raster, on paper, compressed, then read at Otsu's threshold
        slot = np.full(batch, -1)
        slot[soft_pairs] = np.arange(len(soft))
        fine = zeros(work, "fine", (2 * len(soft), size * SUPER, size * SUPER + 1), device)
        strokes(g, fine, slot, SUPER)
        windings(g, fine, np.where(slot >= 0, slot + len(soft), -1), SUPER)
        fine_stroke, fine_inside = covered(fine).reshape(2, len(soft), 1, size * SUPER, size * SUPER)
        ink = F.avg_pool2d(fine_stroke.float(), SUPER)  # (K, 1, S, S) the share of each pixel inked
        # As drawings score them: a pixel is truth when the closed outline and its inside cover half of it or more.
        truth[soft] = pocketless(F.avg_pool2d((fine_stroke | fine_inside).float(), SUPER) >= 0.5)
        grey = 255 * (1 - ink)
        kind = style[soft]
        if (on := torch.nonzero(kind == INK).flatten()).numel():
            grey[on] = on_paper(ink[on], tensor(g.paper)[soft[on]], xs, ys, generator)
        if (on := torch.nonzero(kind == JPEG).flatten()).numel():
            grey[on] = jpeg_like(grey[on], tensor(g.quality)[soft[on]])
        outline[soft] = otsu_ink(grey.clamp(0, 255).round())
    rgb = tensor(g.rgb).float()[:, :, None, None] / 255
    target = (truth.float() * (rgb - 1)).add_(1)  # the colour on the truth, white elsewhere (torch.where is slower)
    return outline.float(), target, g.names


def on_paper(
    ink: torch.Tensor, paper: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Return the grey of ink of coverage ``ink`` in its pen on its paper (``drawings.on_paper``'s tones, as
    grey), with pencil grain, light falling off across the sheet and mild noise."""
    size = xs.shape[0]
    to_grey = torch.tensor([0.299, 0.587, 0.114], device=ink.device)
    paper_grey, pen_grey = (paper[:, 0:3] @ to_grey), (paper[:, 3:6] @ to_grey)  # (B,)
    pencil = paper[:, 8] > 0.5
    grain = torch.empty(ink.shape, device=ink.device).uniform_(0.75, 1.0, generator=generator)
    ink = torch.where(pencil.reshape(-1, 1, 1, 1), ink * grain, ink)  # graphite: the stroke's darkness varies along it
    amount = paper[:, 6].reshape(-1, 1, 1, 1)
    direction = torch.empty((len(ink), 2), device=ink.device).uniform_(-1, 1, generator=generator)
    slope = (direction[:, 0, None, None] * xs + direction[:, 1, None, None] * ys) / size + 0.5  # (B, S, S)
    light = 1 - amount * slope[:, None].clamp(0, 1.5)
    grey = (paper_grey.reshape(-1, 1, 1, 1) * (1 - ink) + pen_grey.reshape(-1, 1, 1, 1) * ink) * light
    return grey + torch.randn(ink.shape, device=ink.device, generator=generator) * paper[:, 7].reshape(-1, 1, 1, 1)


def jpeg_like(grey: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Return ``grey`` after JPEG's loss on the luma: 8x8 DCTs quantised with its table at ``quality``."""
    batch, _, size, _ = grey.shape
    dct = dct_matrix().to(grey.device)
    scale = torch.where(quality < 50, 5000 / quality, 200 - 2 * quality).float() / 100  # libjpeg's quality scaling
    table = (JPEG_LUMA.to(grey.device)[None] * scale[:, None, None]).round().clamp(min=1)  # (B, 8, 8)
    blocks = (grey - 128).reshape(batch, size // 8, 8, size // 8, 8).permute(0, 1, 3, 2, 4)  # (B, n, n, 8, 8)
    coefficients = dct @ blocks @ dct.T
    quantised = (coefficients / table[:, None, None]).round() * table[:, None, None]
    return (dct.T @ quantised @ dct).permute(0, 1, 3, 2, 4).reshape(batch, 1, size, size) + 128


def otsu_ink(grey: torch.Tensor) -> torch.Tensor:
    """Return the (B, 1, S, S) bool ink of grey images as ``images.ink_mask`` reads it: darker than Otsu's
    threshold where paper and ink differ by at least 48 levels, else darker than mid-grey."""
    batch = grey.shape[0]
    levels = grey.reshape(batch, -1).long()
    counts = torch.zeros((batch, 256), dtype=torch.float64, device=grey.device).scatter_add_(
        1, levels, torch.ones_like(levels, dtype=torch.float64)
    )
    values = torch.arange(256, dtype=torch.float64, device=grey.device)
    below, weight = counts.cumsum(1), (counts * values).cumsum(1)
    above = below[:, -1:] - below
    dark, light = weight / below, (weight[:, -1:] - weight) / above
    between = torch.nan_to_num(below * above * (light - dark) ** 2)
    level = between.argmax(1)
    contrast = (light - dark).gather(1, level[:, None]).squeeze(1)
    threshold = torch.where(contrast >= 48, level.double(), torch.full_like(level, 127, dtype=torch.float64)).reshape(
        -1, 1, 1, 1
    )
    return grey <= threshold
