"""The polygon dataset on disk: read, validate, and serve it as a torch Dataset.

Layout (the real data's, and what ``polycolor.synth`` writes)::

    DIR/{training,validation}/data.json          [{"input_polygon", "colour", "output_image"}, ...]
    DIR/{training,validation}/inputs/*.png       black outline on white
    DIR/{training,validation}/outputs/*.png      white plus the outline and what it encloses in one colour

    python -m polycolor.data check DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from polycolor import storage
from polycolor.colors import RGB
from polycolor.images import IMAGE_SIZE, ImageError, Limits, decode, fill_color, outline_array, target_array, to_rgb

SPLITS = ("training", "validation")
KEYS = ("input_polygon", "colour", "output_image")
# The real dataset's palette (its "green" is pure (0, 255, 0)): a fact about that data, what a checkpoint
# trained on synthetic data records, and what wins over CSS names of the same spelling.
REAL_PALETTE: dict[str, RGB] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the split, row, file and what was expected."""


def open_image(root: str | Path, name: str, limits: Limits = Limits()) -> Image.Image:
    """Return the image ``name`` under the folder or URI ``root``, decoded within ``limits``.

    DatasetError names ``name`` and what is wrong.
    """
    fs, base = storage.opened(str(root))
    path = f"{base.rstrip('/')}/{name}"
    if isinstance(fs, pafs.LocalFileSystem) and os.path.exists(path) and not os.path.isfile(path):
        raise DatasetError(f"{name}: not a regular file")  # a FIFO or a device would block or never end
    try:
        with fs.open_input_file(path) as stream:
            data = stream.read()
    except FileNotFoundError:
        raise DatasetError(f"{name}: file does not exist") from None
    except OSError as err:
        raise DatasetError(f"{name}: cannot be read ({' '.join(str(err).split())})") from None
    try:
        return decode(data, limits, name)
    except ImageError as err:
        raise DatasetError(str(err)) from None


# ---------------------------------------------------------------------------------------------------
# A split in memory: what the driver reads once and ships to workers through Ray's object store.


@dataclass
class Split:
    outlines: np.ndarray  # (N, H, W) bool ink
    targets: np.ndarray  # (N, H, W, 3) uint8
    colors: list[str]  # the colour name of each pair, as the dataset spells it
    inputs: list[str] = field(default_factory=list)  # file stem of each outline

    def __len__(self) -> int:
        return len(self.colors)

    @property
    def palette(self) -> dict[str, RGB]:
        """Return each colour name's RGB, as its targets use it."""
        palette: dict[str, RGB] = {}
        for name, target in zip(self.colors, self.targets):
            if name not in palette and (rgb := fill_color(target)) is not None:
                palette[name] = rgb
        return palette


def read_rows(split: str | Path) -> list[dict]:
    """Return the rows of a split's data.json, in a folder or at a URI."""
    where = storage.join(str(split), "data.json")
    try:
        return parse_rows(storage.read_bytes(where), where)
    except FileNotFoundError:
        raise DatasetError(
            f"{where}: file does not exist (expected a split with data.json, inputs/, outputs/)"
        ) from None


def parse_rows(data: bytes, where: str) -> list[dict]:
    """Return the JSON list of rows in ``data`` (read from ``where``); DatasetError when it is not one."""
    try:
        rows = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise DatasetError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(rows, list):
        raise DatasetError(f"{where}: expected a JSON list of rows, got {type(rows).__name__}")
    # A row names files inside the split, never a path: "../../x.png" or "/etc/passwd" would read or, for
    # predict --data, write outside it.
    paths = [
        f"row {i} {key} {row[key]!r}"
        for i, row in enumerate(rows)
        if isinstance(row, dict)
        for key in ("input_polygon", "output_image")
        if isinstance(row.get(key), str) and not plain_name(row[key])
    ]
    if paths:
        raise DatasetError(f"{where}: file names must be plain names inside the split, not paths: " + "; ".join(paths))
    return rows


def plain_name(name: str) -> bool:
    return name == Path(name).name and name not in ("", ".", "..") and "\\" not in name


def read_split(split_dir: str | Path, size: int = IMAGE_SIZE) -> Split:
    """Read and validate one split; DatasetError lists every problem found."""
    split_dir = Path(split_dir)
    problems = check_split(split_dir)
    if problems:
        raise DatasetError(f"{split_dir} failed its check:\n  " + "\n  ".join(problems))
    return load_split(split_dir, size)


def load_split(split_dir: Path, size: int = IMAGE_SIZE) -> Split:
    """Return ``read_split``'s split without its check, for a split ``check_split`` has passed: each image is read
    once more."""
    rows = read_rows(split_dir)
    outlines = {
        name: outline_array(open_image(split_dir, f"inputs/{name}"), size)
        for name in {r["input_polygon"] for r in rows}
    }
    return Split(
        outlines=np.stack([outlines[r["input_polygon"]] for r in rows]),
        targets=np.stack([target_array(open_image(split_dir, f"outputs/{r['output_image']}"), size) for r in rows]),
        colors=[r["colour"] for r in rows],
        inputs=[Path(r["input_polygon"]).stem for r in rows],
    )


# ---------------------------------------------------------------------------------------------------
# Validation: every problem, each naming split, row, file and what was expected.


def check_split(split_dir: Path) -> list[str]:
    split = split_dir.name
    try:
        rows = read_rows(split_dir)
    except DatasetError as err:
        return [str(err)]
    problems: list[str] = []
    seen: dict[tuple, int] = {}
    colour_of: dict[str, tuple[RGB, str]] = {}
    for i, row in enumerate(rows):
        where = f"{split} row {i}"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object with keys {list(KEYS)}, got {type(row).__name__}")
            continue
        missing, extra = set(KEYS) - set(row), set(row) - set(KEYS)
        if missing:
            problems.append(f"{where}: missing key(s) {sorted(missing)}; expected {list(KEYS)}")
        if extra:
            problems.append(f"{where}: unexpected key(s) {sorted(extra)}; expected {list(KEYS)}")
        if missing:
            continue
        bad = [k for k in KEYS if not isinstance(row[k], str) or not row[k]]
        if bad:
            problems.append(f"{where}: {bad} must be non-empty strings")
            continue
        key = tuple(row[k] for k in KEYS)
        if key in seen:
            problems.append(f"{where}: duplicates row {seen[key]} ({row['output_image']})")
        seen.setdefault(key, i)
        images = {}
        for folder, name in (("inputs", row["input_polygon"]), ("outputs", row["output_image"])):
            try:
                images[folder] = open_image(split_dir, f"{folder}/{name}")
            except DatasetError as err:
                problems.append(f"{where}: {err}; expected a PNG or JPEG")
        if len(images) < 2:
            continue
        if images["inputs"].size != images["outputs"].size:
            problems.append(
                f"{where}: outputs/{row['output_image']} is {images['outputs'].size[0]}x{images['outputs'].size[1]}, "
                f"expected the size of inputs/{row['input_polygon']} "
                f"({images['inputs'].size[0]}x{images['inputs'].size[1]})"
            )
        rgb = fill_color(np.asarray(to_rgb(images["outputs"])))
        if rgb is None:
            problems.append(f"{where}: outputs/{row['output_image']} is all white; expected a filled polygon")
            continue
        first = colour_of.setdefault(row["colour"], (rgb, row["output_image"]))
        if first[0] != rgb:
            problems.append(
                f"{where}: outputs/{row['output_image']} paints colour {row['colour']!r} as {rgb}, "
                f"but outputs/{first[1]} paints it as {first[0]}; expected one RGB per colour name"
            )
    return problems


def check(root: str | Path) -> tuple[list[str], list[str]]:
    """Return (summary lines, problems) for a dataset root holding training/ and/or validation/."""
    root = Path(root)
    if not root.is_dir():
        return [], [f"{root}: directory does not exist"]
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        return [], [f"{root}: expected subdirectories {list(SPLITS)} (each with data.json, inputs/, outputs/)"]
    summary, problems = [], []
    for name in present:
        split_problems = check_split(root / name)
        problems += split_problems
        if split_problems:
            continue
        split = load_split(root / name)
        sizes = Counter(
            "x".join(map(str, open_image(root / name, f"outputs/{p.name}").size))
            for p in (root / name / "outputs").glob("*.png")
        )
        summary.append(f"{name}: {len(split)} pairs, {len(set(split.inputs))} outlines, image sizes {dict(sizes)}")
        for colour, rgb in sorted(split.palette.items()):
            summary.append(f"  {colour:<12} {rgb}  x{split.colors.count(colour)}")
        summary.append("  shapes: " + ", ".join(f"{s} x{n}" for s, n in sorted(Counter(split.inputs).items())))
    return summary, problems


# ---------------------------------------------------------------------------------------------------
# torch Dataset.


class PolygonDataset(Dataset):
    """Pairs as (outline (1, H, W) ink in {0, 1}, target (3, H, W) in [0, 1], colour name as the data spells it).

    With ``augment`` each pair gets the same random flip / 90-degree rotation / small affine on outline
    and target; the affine fills with white and uses nearest-neighbour, so no new colour appears.
    """

    def __init__(self, split: Split, augment: bool = False, affine: bool = False):
        self.split, self.augment, self.affine = split, augment, affine

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        outline = torch.from_numpy(self.split.outlines[i]).float()[None]  # (1, H, W)
        target = torch.from_numpy(self.split.targets[i]).permute(2, 0, 1).float() / 255  # (3, H, W)
        if self.augment:
            outline, target = augment_pair(outline, target, affine=self.affine)
        return outline, target, self.split.colors[i]


def augment_pair(
    outline: torch.Tensor, target: torch.Tensor, affine: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the same random geometric transform on (1, H, W) outline and (3, H, W) target."""
    if torch.rand(()) < 0.5:
        outline, target = outline.flip(-1), target.flip(-1)
    k = int(torch.randint(4, ()))
    outline, target = outline.rot90(k, (-2, -1)), target.rot90(k, (-2, -1))
    if affine:
        angle = float(torch.empty(()).uniform_(-15, 15))
        shift = [int(v) for v in torch.randint(-8, 9, (2,))]
        nearest = TF.InterpolationMode.NEAREST
        outline = TF.affine(
            outline, angle=angle, translate=shift, scale=1.0, shear=[0.0], interpolation=nearest, fill=0.0
        )
        target = TF.affine(
            target, angle=angle, translate=shift, scale=1.0, shear=[0.0], interpolation=nearest, fill=1.0
        )
    return outline.contiguous(), target.contiguous()


# ---------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polycolor.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check_cmd = commands.add_parser("check", help="validate a dataset directory and summarise it")
    check_cmd.add_argument("dir", help="dataset root holding training/ and/or validation/")
    args = parser.parse_args(argv)
    summary, problems = check(args.dir)
    print("\n".join(summary))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"{args.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
