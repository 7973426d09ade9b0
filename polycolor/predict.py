"""Colorizer: load a checkpoint once, colour outlines; its command line.

    python -m polycolor.predict --checkpoint CKPT --image outline.png --color teal --out teal.png
    python -m polycolor.predict --checkpoint CKPT --data SRC --out DST [--resume]   # many, on Ray Data

``Colorizer`` is the one predictor: this command, batch prediction (``polycolor.batch``) and Serve
(``polycolor.serve``) all colour through it.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from polycolor import checkpoint, images
from polycolor.colors import RGB


@dataclass(frozen=True)
class Card:
    """What a loaded checkpoint can do: its outlines' size, its conditioning mode and palette, the names of a
    closed vocabulary, whether it reads the colour lexicons (names, modifiers, notations), and whether it
    takes free text phrases."""

    location: str
    image_size: int
    conditioning: str
    palette: dict[str, RGB]
    vocabulary: tuple[str, ...]
    reads_lexicons: bool
    free_text: bool


class Colorizer:
    """A loaded model and its palette; ``colorize`` takes any image Pillow reads and a colour string."""

    def __init__(
        self,
        model: torch.nn.Module,
        palette: dict[str, RGB],
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        location: str = "",
    ):
        self.device = torch.device(device)
        # Small CPU batches keep activations in cache: 8 runs about twice as fast per image as 64 there.
        self.model = model.to(self.device).eval()
        self.palette, self.batch_size = palette, batch_size or (8 if self.device.type == "cpu" else 64)
        self.location = location
        self.graph: torch.jit.ScriptModule | None = None  # the model traced, on the first batch (see ``forward``)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None) -> Colorizer:
        """Load the checkpoint at ``path`` (a directory or URI); a text encoder it names is loaded from local
        files only, never fetched (ValueError otherwise)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = checkpoint.load(path, device=device)
        loaded.model.condition.check_serving(load=False)
        return cls(loaded.model, loaded.palette, device, location=str(path))

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    def card(self) -> Card:
        """Return what this checkpoint can do (see ``Card``)."""
        mode = self.model.condition
        return Card(
            self.location,
            self.image_size,
            mode.name,
            dict(self.palette),
            tuple(self.model.cfg.vocabulary),
            mode.reads_lexicons,
            mode.free_text,
        )

    def prepare(self) -> None:
        """Load now whatever the first request would otherwise wait for (a text mode's encoder and lexicon)."""
        self.model.condition.check_serving(load=True)

    def costly(self, colour: object) -> bool:
        """Return whether ``colour`` costs more than a name lookup (a text encoder run); False for one refused."""
        try:
            return self.model.condition.costly(colour, self.palette)
        except ValueError:
            return False

    def condition(self, colours: Sequence[str]) -> torch.Tensor:
        """Return the conditioning mode's tensor for ``colours`` (on the CPU).

        ValueError names a colour this checkpoint cannot paint. The ``text`` mode takes any phrase.
        """
        return self.model.condition.prepare(colours, self.palette)

    def forward(self, ink: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Return the model's hard (B, 3, S, S) image of a batch, run as one traced graph.

        Eager, each of the model's ~80 operations takes the GIL back from whatever other thread of the process
        holds it (a replica's event loop, say), waiting up to Python's switch interval (5 ms) each time: beside a
        thread running Python a batch took 5-7x its time, traced 1.2-1.4x (bench/serve_load.py's first line, four
        runs). The traced graph gives the same pixels; alone it ran at 0.9-1.15x the eager time.
        """
        if self.graph is None:
            with warnings.catch_warnings():
                # torch.jit's deprecation notice (its successor, torch.compile, builds C++ when a replica starts)
                warnings.simplefilter("ignore", FutureWarning)
                # GroupNorm's check that a batch holds more than one value per channel, fixed at trace time: the
                # test of other batch sizes is tests/test_predict.py's.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self.graph = torch.jit.trace(Hard(self.model), (ink, cond), check_trace=False)
        return self.graph(ink, cond)

    @torch.inference_mode()
    def colorize_arrays(self, outlines: np.ndarray, cond: torch.Tensor) -> np.ndarray:
        """Colour (N, S, S) bool outlines at the model's size with N conditions; return (N, S, S, 3) uint8 RGB."""
        out = []
        for start in range(0, len(outlines), self.batch_size):
            ink = (
                torch.from_numpy(np.asarray(outlines[start : start + self.batch_size])).float()[:, None].to(self.device)
            )
            image = self.forward(ink, cond[start : start + self.batch_size].to(self.device))  # (B, 3, S, S)
            out.append((image * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out) if out else np.empty((0, self.image_size, self.image_size, 3), np.uint8)

    def colorize_batch(
        self, pictures: Sequence[Image.Image], colours: Sequence[str], original_size: bool = False
    ) -> list[Image.Image]:
        """Colour each image with its colour: 128x128 RGB, or each input's size with ``original_size``."""
        cond = self.condition(colours)
        inks = [images.ink_mask(picture) for picture in pictures]
        answers = self.colorize_arrays(np.stack([images.outline_of(ink, self.image_size) for ink in inks]), cond)
        return [Image.fromarray(images.at_size(a, ink) if original_size else a) for a, ink in zip(answers, inks)]

    def colorize(self, picture: Image.Image | str | Path, colour: str, original_size: bool = False) -> Image.Image:
        """Return the outline filled with ``colour``: 128x128 RGB (the input letterboxed to a square), or the
        input's size with ``original_size``. A path is read within ``images.Limits()``."""
        if isinstance(picture, (str, Path)):
            try:
                picture = images.decode(Path(picture).read_bytes())
            except images.ImageError as err:
                raise images.ImageError(f"{picture}: {err}") from None
        return self.colorize_batch([picture], [colour], original_size)[0]


class Hard(torch.nn.Module):
    """The model's hard output (exactly white or the colour) as a module of two tensors, for tracing."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ink: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model(ink, cond, hard=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polycolor.predict", description="Colour polygon outlines with a checkpoint."
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or URI")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="one outline image (any format Pillow reads)")
    source.add_argument(
        "--data",
        help="many, on Ray Data: a split with data.json, a folder or URI of outlines (with --color), "
        "or a CSV/JSON list of image,colour[,output]",
    )
    parser.add_argument(
        "--color",
        "--colour",
        dest="color",
        help="colour name, #hex or rgb(r,g,b) (with --image, or a folder of outlines)",
    )
    parser.add_argument("--out", required=True, help="output PNG (with --image), or a folder or URI (with --data)")
    parser.add_argument("--original-size", action="store_true", help="return the input's size, not the model's")
    parser.add_argument("--device", help="torch device with --image (default: cuda when available, else cpu)")
    many = parser.add_argument_group("with --data")
    many.add_argument("--resume", action="store_true", help="colour only the rows that have no output in --out yet")
    many.add_argument(
        "--concurrency", type=int, help="Colorizer actors (default: one per GPU, else as many as the CPUs hold)"
    )
    many.add_argument("--batch-size", type=int, default=64, help="rows per actor call (default: 64)")
    many.add_argument(
        "--gpus-per-actor", type=float, help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)"
    )
    many.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="CPUs per actor, and its torch threads (default: 1)"
    )
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
        summary = batch.colour_all(
            found, args.checkpoint, colorizer.image_size, args.out, plan, args.resume, args.original_size
        )
    except (checkpoint.CheckpointError, ImportError, ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {summary.line()}" + (f"; reasons in {batch.ERRORS}" if summary.failed else ""))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
