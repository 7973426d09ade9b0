"""polycolor.images: decoding within limits, reading the ink, outlines and answers at any size, bounded memory."""

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from polycolor import images
from polycolor.images import Limits, at_size, decode, outline_array, outline_of, target_array

from conftest import png_bytes


def outline_image(size=128, width=2):
    ink = np.zeros((size, size), bool)
    ink[20:100, 20 : 20 + width] = ink[20:100, 100 - width : 100] = True
    ink[20 : 20 + width, 20:100] = ink[100 - width : 100, 20:100] = True
    return ink


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (its data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16", "I", "LA", "1", "CMYK"])
def test_any_mode_gives_the_same_outline(mode):
    """Every mode Pillow reads gives the outline an 8-bit grey image of the same drawing gives."""
    ink = outline_image()
    gray = np.where(ink, 0, 255).astype(np.uint8)
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)
    elif mode == "I":
        image = Image.fromarray(gray.astype(np.int32) * 257, mode="I")
    else:
        image = Image.fromarray(gray).convert(mode)
    assert (outline_array(image) == ink).all(), mode


def test_transparent_background_counts_as_white():
    rgba = np.zeros((128, 128, 4), np.uint8)  # fully transparent black...
    rgba[outline_image()] = (0, 0, 0, 255)  # ...except the opaque outline
    assert (outline_array(Image.fromarray(rgba, "RGBA")) == outline_image()).all()


def test_downscaling_keeps_thin_outlines():
    big = np.zeros((512, 512), bool)
    big[80:400, 80] = big[80:400, 399] = big[80, 80:400] = big[399, 80:400] = True  # 1 px in 512 px
    small = outline_array(Image.fromarray(np.where(big, 0, 255).astype(np.uint8)))
    filled = ndimage.binary_fill_holes(small)
    assert filled.sum() > small.sum() + 3000  # still closed: it encloses its interior


def test_targets_resize_nearest_without_new_colours():
    target = np.full((256, 256, 3), 255, np.uint8)
    target[40:200, 40:200] = (255, 165, 0)
    colours = {tuple(c) for c in target_array(Image.fromarray(target)).reshape(-1, 3)}
    assert colours == {(255, 255, 255), (255, 165, 0)}


SHAPES = [(1, 1), (3, 200), (61, 97), (127, 40), (128, 128), (129, 300), (300, 129), (511, 512), (1000, 7), (2, 4000)]


@pytest.mark.parametrize("shape", SHAPES)
def test_outline_is_the_letterboxed_square_pooled(shape):
    """S7: the outline is what the model read before: the ink centred on a square of paper, max-pooled (or, when
    smaller than the model's input, resized to the nearest pixel) to 128x128; made without the square."""
    ink = np.random.default_rng(sum(shape)).random(shape) < 0.02
    square = torch.from_numpy(images.letterbox(ink)[0])[None, None].float()
    if square.shape[-1] >= 128:
        expected = F.adaptive_max_pool2d(square, 128)
    else:
        expected = F.interpolate(square, size=(128, 128), mode="nearest-exact")
    assert np.array_equal(outline_of(ink), expected[0, 0].numpy() > 0.5)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_target_is_the_letterboxed_square_resized(shape):
    """A target is its image centred on white and resized to the nearest pixel, as Pillow resizes, without the
    square."""
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    square = Image.fromarray(images.letterbox(rgb, paper=255)[0])
    assert np.array_equal(
        target_array(Image.fromarray(rgb)), np.asarray(square.resize((128, 128), Image.Resampling.NEAREST))
    )


def peak_bytes(work) -> int:
    """The most memory ``work()`` held at once beyond what it started with (Python and numpy allocations)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape", [(256, 65536), (65536, 256), (1, 4_000_000), (4_000_000, 1)])
def test_an_outline_costs_what_its_pixels_cost(shape):
    """S7: a long thin outline (a 65536x256 PNG of a few kB drove a replica to 20.8 GB) costs memory of its own
    size, not of a square of its longer side: here under twice the ink's bytes plus a megabyte."""
    ink = np.zeros(shape, bool)
    ink[: shape[0] // 2 + 1, : shape[1] // 2 + 1] = True
    peak = peak_bytes(lambda: outline_of(ink))
    assert peak < 2 * ink.nbytes + 2**20, (shape, peak)


def test_an_answer_at_a_large_size_costs_its_pixels():
    """S7: the answer at a 4096x4096 input's size, with its edges, holds under 12 bytes a pixel at once (labels,
    the RGB answer, a mask); the square the input was letterboxed on is never made."""
    ink = np.zeros((3000, 4096), bool)
    ink[500:2500, 500] = ink[500:2500, 3500] = ink[500, 500:3500] = ink[2500, 500:3501] = True
    answer = images.paint(ndimage.binary_fill_holes(outline_of(ink)), (10, 20, 30))
    peak = peak_bytes(lambda: at_size(answer, ink))
    assert peak < 12 * ink.size, peak
    out = at_size(answer, ink)
    assert out.shape == (3000, 4096, 3) and (out[1500, 2000] == (10, 20, 30)).all() and (out[10, 10] == 255).all()


LIMITS = Limits(max_pixels=4096 * 4096, max_side=4096, formats=("PNG", "JPEG"))


@pytest.mark.parametrize(
    "data, kind, message",
    [
        (
            png_header(65536, 256),
            images.ImageTooLarge,
            "image is 65536x256; the limit is 4096 pixels on the longer side",
        ),
        (png_header(1, 16777216), images.ImageTooLarge, "the limit is 4096 pixels on the longer side"),
        (png_header(5000, 5000), images.ImageTooLarge, "image is 5000x5000 = 25000000 pixels; the limit is 16777216"),
        (png_header(100_000, 100_000), images.ImageTooLarge, "more pixels than Pillow will open"),
        (b"", images.ImageError, "image is empty; expected a PNG or JPEG"),
        (b"GIF89a" + bytes(40), images.ImageError, "image is not a readable PNG or JPEG"),
        (
            png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)))[:2000],
            images.ImageError,
            "image is truncated or corrupt",
        ),
    ],
)
def test_decode_refuses_from_the_header_naming_the_limit(data, kind, message):
    """S4, S7: oversized images are refused from their header, before any pixel is decoded."""
    with pytest.raises(kind, match=message):
        decode(data, LIMITS)


def test_decode_refuses_a_format_not_asked_for():
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    with pytest.raises(images.UnsupportedFormat, match="image is GIF, which is not accepted; expected a PNG or JPEG"):
        decode(gif.getvalue(), LIMITS)
    assert decode(gif.getvalue()).size == (8, 8)  # any format Pillow reads when none is named


def test_an_animated_png_is_read_at_its_first_frame():
    frames = [Image.fromarray(np.where(outline_image(), 0, 255).astype(np.uint8)), Image.new("L", (128, 128), 0)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    assert (outline_array(decode(buffer.getvalue(), LIMITS)) == outline_image()).all()


@pytest.mark.parametrize("mode", sorted(Image.MODES))
def test_every_mode_is_an_outline_or_an_image_error(mode):
    """A mode Pillow cannot convert to colours is a named ImageError (a 422), never another exception (a 500)."""
    try:
        image = Image.new(mode, (8, 8))
    except (ValueError, KeyError):
        pytest.skip(f"Pillow cannot make a {mode} image")
    try:
        assert images.ink_mask(image).shape == (8, 8)
    except images.ImageError as err:
        assert f"image mode {mode} cannot be read" in str(err)
