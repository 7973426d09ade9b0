"""Every pixel in and out: decode with limits, read the ink, letterbox, outline, paint, encode.

An outline is an "ink" mask, (H, W) bool with True on the outline, so zero padding is paper. The model reads
it at (S, S) (``outline_of``): letterboxed (centred on a square of paper) so a drawing keeps its proportions,
then max-pooled so thin lines survive. Nothing here allocates more than the decoded image and a few arrays of
its size, whatever its shape: a 65536x256 outline costs what its pixels cost, not a 65536x65536 square.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from polycolor.colors import RGB

IMAGE_SIZE = 128  # the model's input side
WHITE = (255, 255, 255)
HIGH_DEPTH = ("I", "I;16", "I;16L", "I;16B", "F")


class ImageError(ValueError):
    """An image that cannot be used; the message says what is wrong and what was expected."""


class ImageTooLarge(ImageError):
    """An image over a size limit, refused from its header before it is decoded."""


class UnsupportedFormat(ImageError):
    """An image in a format the caller does not accept."""


@dataclass(frozen=True)
class Limits:
    """What ``decode`` accepts: at most ``max_pixels`` pixels and ``max_side`` on the longer side, in one of
    ``formats`` (any format Pillow reads when empty)."""

    max_pixels: int = 4096 * 4096
    max_side: int = 4096
    formats: tuple[str, ...] = ()

    def expected(self) -> str:
        """Return what an image must be, as a message says it: "a PNG or JPEG", or "an image"."""
        return "a " + " or ".join(self.formats) if self.formats else "an image"


def decode(data: bytes, limits: Limits = Limits(), name: str = "image") -> Image.Image:
    """Return the image in ``data``, loaded; its size is checked from the header before any pixel is decoded.

    Errors name the image as ``name``.
    """
    if not data:
        raise ImageError(f"{name} is empty; expected {limits.expected()}")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:  # Pillow's own cap, far above ours: refused from the header alone
        raise ImageTooLarge(
            f"{name} declares more pixels than Pillow will open; the limit is {limits.max_pixels}"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError(f"{name} is not a readable {' or '.join(limits.formats) or 'image'}") from None
    if limits.formats and image.format not in limits.formats:
        raise UnsupportedFormat(f"{name} is {image.format}, which is not accepted; expected {limits.expected()}")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"{name} is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    if max(width, height) > limits.max_side:
        raise ImageTooLarge(f"{name} is {width}x{height}; the limit is {limits.max_side} pixels on the longer side")
    if width < 1 or height < 1:
        raise ImageError(f"{name} is {width}x{height}; expected at least one pixel")
    try:
        image.load()
    except Exception:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, struct.error) for a bad stream
        raise ImageError(f"{name} is truncated or corrupt") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as 8-bit RGB from any Pillow mode, transparency composited on white."""
    try:
        if image.mode in HIGH_DEPTH:
            return Image.fromarray(high_depth_grey(image)).convert("RGB")
        if image.mode in ("RGBA", "LA", "PA", "P", "La") or "transparency" in image.info:
            rgba = image if image.mode == "RGBA" else image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as err:  # a mode Pillow cannot convert (LAB, HSV, ...)
        raise ImageError(f"image mode {image.mode} cannot be read as colours ({err})") from None


def high_depth_grey(image: Image.Image) -> np.ndarray:
    """Return a 16-bit, 32-bit or float image as (H, W) uint8 grey, scaled to 8 bits (16-bit images by 65535)."""
    values = np.asarray(image)
    if values.dtype.kind == "f":
        scale = 65535.0 if values.max(initial=0) > 255 else 255.0
        return np.clip(np.rint(values / scale * 255), 0, 255).astype(np.uint8)
    scale = 65535 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255
    # Integer rounding (no ties exist at either scale), in place in one uint32 array: no float64 temporaries.
    scaled = np.empty(values.shape, np.uint32)
    np.clip(values, 0, scale, out=scaled, casting="unsafe")
    scaled *= 255
    scaled += scale // 2
    scaled //= scale
    return scaled.astype(np.uint8)


def ink_mask(image: Image.Image) -> np.ndarray:
    """Return the (H, W) bool ink of ``image`` at its own size.

    Ink is what is darker than Otsu's threshold between the paper and the ink (so a pencil on grey paper is
    read as well as black on white), where the two differ by at least 48 grey levels; else, with no clear
    ink, what is darker than mid-grey.
    """
    grey_image = to_rgb(image).convert("L")
    grey, counts = np.asarray(grey_image), np.array(grey_image.histogram(), np.float64)  # Pillow counts without a copy
    below, weight = np.cumsum(counts), np.cumsum(counts * np.arange(256))  # pixels at or below each level, summed
    above = below[-1] - below
    with np.errstate(divide="ignore", invalid="ignore"):
        dark, light = weight / below, (weight[-1] - weight) / above
        between = np.nan_to_num(below * above * (light - dark) ** 2)  # Otsu's between-class variance, up to a factor
    level = int(np.argmax(between))
    return grey <= level if light[level] - dark[level] >= 48 else grey < 128


def nearest(n_in: int, n_out: int) -> np.ndarray:
    """Return the source index of each of ``n_out`` samples of ``n_in``, as Pillow's NEAREST resize picks them."""
    step = n_in / n_out
    return np.minimum(np.cumsum(np.r_[step / 2, np.full(n_out - 1, step)]).astype(np.int64), n_in - 1)


def placement(shape: tuple[int, int]) -> tuple[int, int, int]:
    """Return (side, top, left): the square an (H, W) image is letterboxed on, and where the image lies in it."""
    height, width = shape
    side = max(height, width)
    return side, (side - height) // 2, (side - width) // 2


def letterbox(image: np.ndarray, paper=False) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Return an (H, W, ...) array centred on a square of ``paper``, and where in that square it lies."""
    side, top, left = placement(image.shape[:2])
    where = (slice(top, top + image.shape[0]), slice(left, left + image.shape[1]))
    square = np.full((side, side, *image.shape[2:]), paper, image.dtype)
    square[where] = image
    return square, where


def pool_windows(side: int, offset: int, length: int, size: int) -> list[tuple[int, int]]:
    """Return, per output cell of an adaptive max pool of ``side`` to ``size``, its window in an image that
    starts at ``offset`` in the square and is ``length`` long, clipped (empty where it covers paper only)."""
    cells = np.arange(size)
    starts, ends = cells * side // size, -(-(cells + 1) * side // size)  # torch's adaptive pooling windows
    return [(min(max(s - offset, 0), length), min(max(e - offset, 0), length)) for s, e in zip(starts, ends)]


def outline_of(ink: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Return an (H, W) ink mask at the model's (size, size), letterboxed.

    Downscaling keeps any ink in a cell (an adaptive max pool), so thin outlines survive; upscaling picks the
    nearest pixel. The pool runs on the image itself, the longer side first, so memory stays at the image's.
    """
    side, top, left = placement(ink.shape)
    if ink.shape == (size, size):
        return ink.copy()  # already the model's input: every cell of the pool is one pixel
    if side < size:  # a small image: its square is smaller than the model's input
        square = letterbox(ink)[0]
        picked = np.minimum(np.floor((np.arange(size) + 0.5) * side / size).astype(np.int64), side - 1)  # nearest-exact
        return square[picked][:, picked]
    rows, cols = pool_windows(side, top, ink.shape[0], size), pool_windows(side, left, ink.shape[1], size)

    def pool(mask: np.ndarray, windows, axis: int) -> np.ndarray:
        cells = [mask[s:e].any(axis=0) if axis == 0 else mask[:, s:e].any(axis=1) for s, e in windows]
        return np.stack(cells, axis=axis)

    if ink.shape[1] >= ink.shape[0]:
        return pool(pool(ink, cols, 1), rows, 0)  # (H, size), then (size, size)
    return pool(pool(ink, rows, 0), cols, 1)


def outline_array(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """Return the (size, size) bool outline of ``image`` as the model reads it."""
    return outline_of(ink_mask(image), size)


def target_array(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """Return a target as (size, size, 3) uint8 RGB, letterboxed on white as its outline is, resized to the
    nearest pixel so that no new colour appears."""
    rgb = np.asarray(to_rgb(image))
    side, top, left = placement(rgb.shape[:2])
    if side == size:
        return letterbox(rgb, paper=255)[0]
    rows, cols = nearest(side, size) - top, nearest(side, size) - left
    inside = ((rows >= 0) & (rows < rgb.shape[0]))[:, None] & ((cols >= 0) & (cols < rgb.shape[1]))[None, :]
    out = rgb[np.clip(rows, 0, rgb.shape[0] - 1)][:, np.clip(cols, 0, rgb.shape[1] - 1)]
    out[~inside] = 255
    return out


def paint(mask: np.ndarray, rgb: RGB = (0, 0, 0)) -> np.ndarray:
    """Return (H, W, 3) uint8: an (H, W) ``mask`` in ``rgb`` on white (in black: an ink mask as drawn)."""
    image = np.full((*mask.shape, 3), 255, np.uint8)
    image[mask] = rgb
    return image


def fill_color(target: np.ndarray, weights: np.ndarray | None = None) -> RGB | None:
    """Return the most common non-white colour of an (H, W, 3) target, or None for an all-white one; each
    pixel counts ``weights`` times (its (H, W) copies in a resized image), once by default."""
    pixels, counts = (
        target.reshape(-1, 3),
        np.ones(target.shape[0] * target.shape[1]) if weights is None else weights.ravel(),
    )
    coloured = (pixels != 255).any(axis=1) & (counts > 0)
    if not coloured.any():
        return None
    values, which = np.unique(pixels[coloured], axis=0, return_inverse=True)
    return tuple(int(v) for v in values[np.bincount(which.ravel(), weights=counts[coloured]).argmax()])


Packed = tuple[tuple[int, ...], np.ndarray]  # a bool array's shape and its bits, packed eight to a byte
PackedInk = Packed  # an (H, W) ink mask, packed


def read_ink(image: Image.Image, size: int, original: bool) -> tuple[np.ndarray, PackedInk | None]:
    """Return the outline at the model's ``size`` and, with ``original``, the image's ink at its own size, packed
    (what an answer at that size needs of it); the ink is read once."""
    ink = ink_mask(image)
    return outline_of(ink, size), (ink.shape, np.packbits(ink)) if original else None


def pack(mask: np.ndarray) -> Packed:
    """Return a bool array packed eight pixels to a byte, with its shape (an eighth of its size to send)."""
    return mask.shape, np.packbits(mask)


def unpack(packed: Packed) -> np.ndarray:
    """Return the bool array that ``pack`` (or ``read_ink``) packed."""
    shape, bits = packed
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


def pack_answers(rgb: np.ndarray) -> tuple:
    """Return (N, S, S, 3) answers compactly: each one's painted pixels (packed) and its colour when every answer is
    white plus one colour (the mask head's always are), else the array itself."""
    painted = (rgb != 255).any(axis=3)  # (N, S, S)
    colours = np.array(
        [image[mask][0] if mask.any() else (255, 255, 255) for image, mask in zip(rgb, painted)], np.uint8
    )
    if all((image[mask] == colour).all() for image, mask, colour in zip(rgb, painted, colours)):
        return "masks", pack(painted), colours.reshape(-1, 3)
    return "rgb", rgb


def unpack_answers(packed: tuple) -> np.ndarray:
    """Return the (N, S, S, 3) uint8 answers that ``pack_answers`` packed."""
    if packed[0] == "rgb":
        return packed[1]
    painted, colours = unpack(packed[1]), packed[2]
    rgb = np.full((*painted.shape, 3), 255, np.uint8)
    for image, mask, colour in zip(rgb, painted, colours):
        image[mask] = colour
    return rgb


def at_size(rgb: np.ndarray, ink: np.ndarray) -> np.ndarray:
    """Return the model's (S, S, 3) answer at the size of the input whose (H, W) ink mask is ``ink``.

    The answer's edges are the input's, not the model's grid: each region of paper the input's ink closes off
    takes the answer most of it got (when nine tenths agree); ink, and regions whose answer is split (an
    outline with a gap the model closed), keep the nearest pixel's.
    """
    side, top, left = placement(ink.shape)
    rows, cols = (
        nearest(rgb.shape[0], side)[top : top + ink.shape[0]],
        nearest(rgb.shape[1], side)[left : left + ink.shape[1]],
    )
    big = rgb[rows][:, cols]  # (H, W, 3) the answer, nearest pixel, at the input's size
    colour = fill_color(rgb, weights=np.outer(*(np.bincount(nearest(n, side), minlength=n) for n in rgb.shape[:2])))
    if side == rgb.shape[0] or colour is None:
        return big
    regions, count = ndimage.label(~ink)  # (H, W) int32: 0 on the ink, 1..count the regions of paper
    painted = (rgb != 255).any(axis=2)[rows][:, cols]  # (H, W) bool
    sizes, hits = np.zeros(count + 1), np.zeros(count + 1)
    for start in range(0, len(regions), 256):  # in bands: bincount copies its input as int64
        band = regions[start : start + 256]
        sizes += np.bincount(band.ravel(), minlength=count + 1)
        hits += np.bincount(band[painted[start : start + 256]], minlength=count + 1)
    del painted
    votes = hits / np.maximum(sizes, 1)  # the share of each region the model painted
    table = np.where(votes >= 0.9, 1, np.where(votes <= 0.1, 0, -1)).astype(np.int8)
    table[0] = -1  # the ink keeps the nearest pixel's answer
    verdict = table[regions]
    del regions
    np.copyto(
        big, np.uint8(255), where=(verdict == 0)[..., None]
    )  # a boolean index would make 16 bytes a pixel of indices
    np.copyto(big, np.array(colour, np.uint8), where=(verdict == 1)[..., None])
    return big


def encode_png(rgb: np.ndarray, ink: PackedInk | None = None) -> bytes:
    """Return PNG bytes of a model's (S, S, 3) answer; at its input's size, with the input's edges
    (``at_size``), when given that input's packed ink (``read_ink``)."""
    if ink is not None:
        rgb = at_size(rgb, unpack(ink))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
