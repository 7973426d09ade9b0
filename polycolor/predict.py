"""Colorizer: load a checkpoint once, colour outlines.

    python -m polycolor.predict --checkpoint CKPT --image outline.png --color teal --out teal.png
    python -m polycolor.predict --checkpoint CKPT --data SRC --out DST [--resume]   # many, on Ray Data (polycolor.batch)
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from polycolor import checkpoint
from polycolor.colors import RGB
from polycolor.data import fill_color, ink_mask, letterbox, outline_of


def read_ink(image: Image.Image, size: int, original: bool) -> tuple[np.ndarray, tuple[tuple[int, int], np.ndarray] | None]:
    """(the outline at the model's ``size``; with ``original``, the image's ``ink_mask`` at its own size as its
    (H, W) and one bit a pixel, what an answer at that size needs of it, else None): the ink is read once."""
    ink = ink_mask(image)
    return outline_of(ink, size), (ink.shape, np.packbits(ink)) if original else None


def encode_png(rgb: np.ndarray, ink: tuple[tuple[int, int], np.ndarray] | None = None) -> bytes:
    """PNG bytes of a model's (S, S, 3) answer; at its input's size, with the input's edges (``at_size``), when
    given that input's packed ink (``read_ink``)."""
    if ink is not None:
        (height, width), bits = ink
        rgb = at_size(rgb, np.unpackbits(bits, count=height * width).reshape(height, width).astype(bool))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def at_size(rgb: np.ndarray, ink: np.ndarray) -> np.ndarray:
    """The model's (S, S, 3) answer, to the input letterboxed, at the size of the input whose (H, W) ``ink_mask``
    is ``ink``, with its edges where the input's are, not on the model's grid: each region of paper the input's
    ink closes off takes the answer most of it got (when nine tenths agree); ink, and regions whose answer is
    split (an outline with a gap the model closed), keep the nearest pixel's."""
    square, where = letterbox(ink)
    big = np.asarray(Image.fromarray(rgb).resize(square.shape, Image.Resampling.NEAREST))
    colour = fill_color(big)
    if big.shape[:2] == rgb.shape[:2] or colour is None:
        return big[where]
    regions, count = ndimage.label(~square)
    votes = ndimage.mean((big != 255).any(axis=2), regions, np.arange(1, count + 1)) if count else np.empty(0)
    verdict = np.concatenate([[-1], np.where(votes >= 0.9, 1, np.where(votes <= 0.1, 0, -1))])[regions]  # ink: -1, kept
    out = big.copy()
    out[verdict == 0] = 255
    out[verdict == 1] = colour
    return out[where]


class Colorizer:
    """A loaded model and its palette. ``colorize`` takes any image Pillow reads and a colour string."""

    def __init__(self, model: torch.nn.Module, palette: dict[str, RGB], device: str | torch.device = "cpu", batch_size: int | None = None):
        self.device = torch.device(device)
        # Small CPU batches keep activations in cache: 8 runs about twice as fast per image as 64 there.
        self.model = model.to(self.device).eval()
        self.palette, self.batch_size = palette, batch_size or (8 if self.device.type == "cpu" else 64)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None) -> Colorizer:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = checkpoint.load(path, device=device)
        return cls(loaded.model, loaded.palette, device)

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    def condition(self, colours: Sequence[str]) -> torch.Tensor:
        """The conditioning mode's tensor for ``colours`` (CPU); ValueError naming one this checkpoint cannot paint.
        The ``text`` mode takes any phrase: the model reads the colour from it."""
        return self.model.condition.prepare(colours, self.palette)

    @torch.inference_mode()
    def colorize_arrays(self, outlines: np.ndarray, cond: torch.Tensor) -> np.ndarray:
        """(N, H, W) bool ink at the model's size + N conditions (``condition``) -> (N, H, W, 3) uint8 RGB."""
        out = []
        for start in range(0, len(outlines), self.batch_size):
            ink = torch.from_numpy(np.asarray(outlines[start : start + self.batch_size])).float()[:, None].to(self.device)
            image = self.model(ink, cond[start : start + self.batch_size].to(self.device), hard=True)  # (B, 3, H, W)
            out.append((image * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out) if out else np.empty((0, self.image_size, self.image_size, 3), np.uint8)

    def colorize_batch(self, images: Sequence[Image.Image | str | Path], colours: Sequence[str], original_size: bool = False) -> list[Image.Image]:
        pils = [Image.open(i) if isinstance(i, (str, Path)) else i for i in images]
        cond = self.condition(colours)
        inks = [ink_mask(image) for image in pils]
        answers = self.colorize_arrays(np.stack([outline_of(ink, self.image_size) for ink in inks]), cond)
        return [Image.fromarray(at_size(a, ink) if original_size else a) for a, ink in zip(answers, inks)]

    def colorize(self, image: Image.Image | str | Path, colour: str, original_size: bool = False) -> Image.Image:
        """The outline filled with ``colour``: 128x128 RGB (the input letterboxed to a square), or the input's size
        with ``original_size``."""
        return self.colorize_batch([image], [colour], original_size)[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polycolor.predict", description="Colour polygon outlines with a checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or URI")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="one outline image (any format Pillow reads)")
    source.add_argument("--data", help="many, on Ray Data: a split with data.json, a folder or URI of outlines (with --color), "
                        "or a CSV/JSON list of image,colour[,output]")  # fmt: skip
    parser.add_argument("--color", "--colour", dest="color", help="colour name, #hex or rgb(r,g,b) (with --image, or a folder of outlines)")
    parser.add_argument("--out", required=True, help="output PNG (with --image), or a folder or URI (with --data)")
    parser.add_argument("--original-size", action="store_true", help="return the input's size, not the model's")
    parser.add_argument("--device", help="torch device with --image (default: cuda when available, else cpu)")
    many = parser.add_argument_group("with --data")
    many.add_argument("--resume", action="store_true", help="colour only the rows that have no output in --out yet")
    many.add_argument("--concurrency", type=int, help="Colorizer actors (default: one per GPU, else as many as the CPUs hold)")
    many.add_argument("--batch-size", type=int, default=64, help="rows per actor call (default: 64)")
    many.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    many.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor, and its torch threads (default: 1)")
    args = parser.parse_args(argv)
    if args.image and not args.color:
        parser.error("--image needs --color")

    try:
        # With --data the model runs in the actors; here it is loaded once, on the CPU, to check it before Ray starts.
        colorizer = Colorizer.from_checkpoint(args.checkpoint, device=args.device if args.image else "cpu")
        if args.image:
            colorizer.colorize(args.image, args.color, args.original_size).save(args.out)
            print(f"wrote {args.out}")
            return 0
        from polycolor import batch
        from polycolor.runs import init_ray

        found = batch.find_source(args.data, args.color)
        init_ray()
        plan = batch.Plan(args.concurrency, args.batch_size, args.gpus_per_actor, args.cpus_per_actor)
        summary = batch.colour_all(found, args.checkpoint, colorizer.image_size, args.out, plan, args.resume, args.original_size)
    except (checkpoint.CheckpointError, ImportError, ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {summary.line()}" + (f"; reasons in {batch.ERRORS}" if summary.failed else ""))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
