"""Colour many outlines on Ray Data: one streaming pipeline from a source of outlines to a folder of PNGs.

    rows -> decode -> colour in batches (Colorizer actors) -> encode + write PNGs (or score against the truths)

On CPUs each actor decodes, colours and writes its own batches (Ray fuses the stages), so only names and
outcomes move between processes; with GPUs, CPU tasks decode and write and the GPU actors only colour.

A source (``Source``) is one of
  - a split in our layout: ``data.json`` names each row's outline, colour and output file;
  - a folder or URI of outlines, all in one ``--color``: each output is the outline's path with ``.png``;
  - a CSV or JSON list of rows ``image, colour[, output]``, images relative to the list's folder.
A row that cannot be done (a missing or corrupt image, an unknown colour, a failed write) is recorded with
its reason and the rest go on. Outputs appear complete or not at all, so ``resume`` does only the rows that
have none. ``python -m polycolor.predict --data`` and ``python -m polycolor.evaluate`` run on this.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from polycolor import storage
from polycolor.data import DatasetError, open_image, parse_rows, read_rows
from polycolor.images import ImageError, encode_png, read_ink, target_array

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ERRORS = "errors.jsonl"


@dataclass(frozen=True)
class Source:
    """Rows to colour: ``root`` (a folder or URI) and a table of ``image`` (relative to it), ``colour``, ``output``
    (relative to the destination), plus ``target`` (relative to root) for a split that has its truths."""

    root: str
    rows: pa.Table


def relative_name(name: object, where: str) -> str:
    """Return ``name`` as a path inside its folder; DatasetError for an absolute path, ``..`` or anything not a
    string."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise DatasetError(f"{where}: {name!r} must be a relative path inside the folder, without '..'")
    return str(PurePosixPath(*parts))


def find_source(src: str, colour: str | None) -> Source:
    """Return the rows of ``src`` (see the module docstring); DatasetError naming the file, row or flag that is
    wrong."""
    fs, path = storage.filesystem(src)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise DatasetError(f"--data {storage.redact(src)}: nothing there")
    if kind == pafs.FileType.File:
        if colour:
            raise DatasetError(
                f"--data {storage.redact(src)}: a list names each row's colour; --color is for a folder of outlines"
            )
        return from_list(src, fs, path)
    if fs.get_file_info(f"{path}/data.json").type == pafs.FileType.File:
        if colour:
            raise DatasetError(
                f"--data {storage.redact(src)}: its data.json names each row's colour; "
                "--color is for a folder of outlines"
            )
        return from_split(src)
    if not colour:
        raise DatasetError(
            f"--data {storage.redact(src)}: a folder of outlines needs --color "
            "(or give a split with data.json, or a CSV/JSON list)"
        )
    names = sorted(
        n
        for n, kind in storage.listing(src, recursive=True).items()
        if kind in (pafs.FileType.File, pafs.FileType.Unknown) and n.lower().endswith(IMAGE_SUFFIXES)
    )  # Unknown: a FIFO, named when read
    if not names:
        raise DatasetError(f"--data {storage.redact(src)}: no images there (expected {', '.join(IMAGE_SUFFIXES)})")
    return Source(
        src, table(names, [colour] * len(names), [as_png(n) for n in names], where=f"--data {storage.redact(src)}")
    )


def from_split(src: str) -> Source:
    where, rows = storage.join(src, "data.json"), read_rows(src)
    bad = [
        f"row {i}"
        for i, r in enumerate(rows)
        if not isinstance(r, dict) or not {"input_polygon", "colour", "output_image"} <= set(r)
    ]
    if bad:
        raise DatasetError(f"{where}: {', '.join(bad[:5])} lack input_polygon, colour or output_image")
    columns = {
        "image": [f"inputs/{r['input_polygon']}" for r in rows],
        "colour": [str(r["colour"]) for r in rows],
        "output": [r["output_image"] for r in rows],
        "target": [f"outputs/{r['output_image']}" for r in rows],
    }
    return Source(src, checked(pa.table(columns), where))


def from_list(src: str, fs: pafs.FileSystem, path: str) -> Source:
    """Return a CSV (header ``image,colour[,output]``) or a JSON list of such objects."""
    with fs.open_input_stream(path) as stream:
        text = stream.read().decode("utf-8-sig")
    if path.lower().endswith(".json"):
        rows = parse_rows(text.encode(), src)
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    bad = [
        f"row {i}"
        for i, r in enumerate(rows)
        if not isinstance(r, dict) or not r.get("image") or not (r.get("colour") or r.get("color"))
    ]
    if bad:
        raise DatasetError(
            f"{storage.redact(src)}: {', '.join(bad[:5])} lack an image or a colour; expected image,colour[,output]"
        )
    images = [relative_name(r["image"], f"{storage.redact(src)} row {i} image") for i, r in enumerate(rows)]
    outputs = [r.get("output") or as_png(image) for r, image in zip(rows, images)]
    return Source(
        storage.parent(src),
        table(images, [r.get("colour") or r["color"] for r in rows], outputs, where=storage.redact(src)),
    )


def as_png(name: str) -> str:
    return str(PurePosixPath(name).with_suffix(".png"))


def table(images: list[str], colours: list[str], outputs: list[str], where: str) -> pa.Table:
    return checked(pa.table({"image": images, "colour": colours, "output": outputs}), where)


def checked(rows: pa.Table, where: str) -> pa.Table:
    """Return ``rows`` whose outputs are distinct relative paths; DatasetError naming the first clash."""
    outputs = [relative_name(o, f"{where} row {i} output") for i, o in enumerate(rows["output"].to_pylist())]
    seen: dict[str, int] = {}
    for i, output in enumerate(outputs):
        if (first := seen.setdefault(output, i)) != i:
            raise DatasetError(f"{where}: rows {first} and {i} both write {output!r}; give each row its own output")
    return rows.set_column(rows.schema.get_field_index("output"), "output", pa.array(outputs))


# ---------------------------------------------------------------------------------------------------
# The stages. Each takes and returns a batch (dict of numpy columns); a row's "error" is "" while it is good.


def decode(batch: dict, root: str, size: int, targets: bool = False, original_size: bool = False) -> dict:
    """Read and decode each row's outline at the model's ``size``; ``targets`` also reads the truths, and
    ``original_size`` keeps each image's ink at its own size (``read_ink``) for its answer at that size."""
    n = len(batch["image"])
    outlines = np.zeros((n, size, size), bool)
    truths = np.full((n, size, size, 3), 255, np.uint8) if targets else None
    shapes, inks = np.zeros((n, 2), np.int32), np.empty(n, dtype=object)
    errors = list(batch["error"]) if "error" in batch else [""] * n
    for i, name in enumerate(batch["image"]):
        inks[i] = np.zeros(0, np.uint8)
        try:
            outlines[i], ink = read_ink(open_image(root, name), size, original_size)
            if ink is not None:
                shapes[i], inks[i] = ink
            if targets:
                truths[i] = target_array(open_image(root, batch["target"][i]), size)
        except (DatasetError, ImageError) as err:  # a bad row is a row in errors.jsonl, never a failed job
            errors[i] = str(err)
    out = {k: v for k, v in batch.items() if k != "target"} | {
        "outline": outlines,
        "error": np.array(errors, dtype=object),
    }
    return out | ({"truth": truths} if targets else {}) | ({"shape": shapes, "ink": inks} if original_size else {})


class Painter:
    """A Ray Data actor: one Colorizer, loaded once, colouring each batch's good rows, then ``finish``ing them
    when given."""

    def __init__(self, checkpoint: str, device: str, threads: int, finish=None):
        from polycolor.predict import Colorizer

        torch.set_num_threads(threads)
        self.colorizer, self.finish = Colorizer.from_checkpoint(checkpoint, device=device), finish
        self.condition = lru_cache(maxsize=4096)(self.one_condition)

    def one_condition(self, colour: str) -> torch.Tensor | str:
        """Return the colour's condition row, or the reason this checkpoint cannot paint it."""
        try:
            return self.colorizer.condition([colour])
        except ValueError as err:
            return str(err)

    def __call__(self, batch: dict) -> dict:
        errors, conditions = batch["error"].copy(), {}  # row -> its condition, for the rows still good
        for i, colour in enumerate(batch["colour"]):
            if not errors[i]:
                cond = self.condition(colour)
                errors[i], conditions[i] = (cond, None) if isinstance(cond, str) else ("", cond)
        good = [i for i, cond in conditions.items() if cond is not None]
        size = batch["outline"].shape[1]
        rgb = np.full((len(errors), size, size, 3), 255, np.uint8)
        if good:
            rgb[good] = self.colorizer.colorize_arrays(batch["outline"][good], torch.cat([conditions[i] for i in good]))
        coloured = {k: v for k, v in batch.items() if k != "outline"} | {"rgb": rgb, "error": errors}
        return self.finish(coloured) if self.finish else coloured


def write(batch: dict, dst: str, original_size: bool) -> dict:
    """Encode each good row as PNG (at its input's size with ``original_size``) and write it to ``dst``, whole or
    not at all."""
    fs, base = storage.opened(dst)
    local = isinstance(fs, pafs.LocalFileSystem)
    errors = batch["error"].copy()
    for i, output in enumerate(batch["output"]):
        if errors[i]:
            continue
        encoded = encode_png(batch["rgb"][i], (tuple(batch["shape"][i]), batch["ink"][i]) if original_size else None)
        path = f"{base.rstrip('/')}/{output}"
        try:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            # A local file is written beside its name and renamed into place; an object store publishes an
            # object only when its upload completes.
            staging = (
                f"{path.rsplit('/', 1)[0]}/.{PurePosixPath(path).name}.tmp-{uuid.uuid4().hex[:8]}" if local else path
            )
            with fs.open_output_stream(staging) as stream:
                stream.write(encoded)
            if local:
                os.replace(staging, path)
        except OSError as err:
            errors[i] = f"{output}: cannot be written ({' '.join(str(err).split())})"
    return {"image": batch["image"], "colour": batch["colour"], "output": batch["output"], "error": errors}


def score(batch: dict) -> dict:
    """Return the per-image metrics (``polycolor.metrics``) of each good row against its truth."""
    from polycolor.metrics import per_image

    pred = torch.from_numpy(batch["rgb"]).permute(0, 3, 1, 2).float() / 255
    truth = torch.from_numpy(batch["truth"]).permute(0, 3, 1, 2).float() / 255
    values = {k: v.numpy() for k, v in per_image(pred, truth).items()}
    return {"row": batch["row"], "image": batch["image"], "colour": batch["colour"], "error": batch["error"]} | values


# ---------------------------------------------------------------------------------------------------
# The pipeline.


@dataclass(frozen=True)
class Plan:
    """How the work is spread: ``concurrency`` Colorizer actors of ``batch_size`` rows, each with these resources."""

    concurrency: int | None = None
    batch_size: int = 64
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0

    def resolved(self) -> Plan:
        """Return this plan with its defaults from the cluster: one actor per GPU when there are GPUs, else as many as
        the CPUs hold."""
        import ray

        total = ray.cluster_resources()
        gpus = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if total.get("GPU") else 0.0)
        per = int(total.get("GPU", 0) / gpus) if gpus else int(total.get("CPU", 1) / self.cpus_per_actor)
        return Plan(self.concurrency or max(1, per), self.batch_size, gpus, self.cpus_per_actor)


def pipeline(source: Source, checkpoint: str, image_size: int, plan: Plan, finish, targets: bool = False, **kwargs):
    """Return the Ray Data dataset of ``source``'s rows (with ``row``, their index) decoded, coloured and then passed
    through the ``finish`` stage (``write`` or ``score``) with ``kwargs``."""
    import ray

    rows = source.rows.append_column("row", pa.array(np.arange(len(source.rows))))
    step = plan.batch_size * 4
    # On CPUs, decoding asks what an actor asks, so Ray fuses it into the actors, and each actor finishes its own
    # rows: nothing but names and outcomes moves between processes. With GPUs, CPU tasks decode and finish, and
    # the GPU actors only colour.
    on_gpu = bool(plan.gpus_per_actor)
    coloured = (
        ray.data.from_arrow([rows.slice(start, step) for start in range(0, len(rows), step)])
        .map_batches(
            decode,
            fn_kwargs={
                "root": source.root,
                "size": image_size,
                "targets": targets,
                "original_size": kwargs.get("original_size", False),
            },
            batch_size=plan.batch_size,
            batch_format="numpy",
            num_cpus=1 if on_gpu else plan.cpus_per_actor,
        )
        .map_batches(
            Painter,
            fn_constructor_kwargs={
                "checkpoint": checkpoint,
                "device": "cuda" if on_gpu else "cpu",
                "threads": max(1, int(plan.cpus_per_actor)),
                "finish": None if on_gpu else partial(finish, **kwargs),
            },
            batch_size=plan.batch_size,
            batch_format="numpy",
            concurrency=plan.concurrency,
            num_cpus=plan.cpus_per_actor,
            num_gpus=plan.gpus_per_actor,
        )
    )
    return (
        coloured.map_batches(finish, fn_kwargs=kwargs, batch_size=plan.batch_size, batch_format="numpy")
        if on_gpu
        else coloured
    )


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.done / self.seconds if self.seconds else 0.0
        counts = f"done {self.done}, failed {self.failed}, skipped {self.skipped}"
        return f"{counts} in {self.seconds:.1f} s ({rate:.1f} images/s)"


def failed_rows(batch: dict) -> list[dict]:
    """Return the rows of a result batch that failed, as JSON-ready dicts with their reason."""
    keys = [k for k in ("image", "colour", "output", "error") if k in batch]
    return [{k: str(batch[k][i]) for k in keys} for i, e in enumerate(batch["error"]) if e]


def colour_all(
    source: Source,
    checkpoint: str,
    image_size: int,
    dst: str,
    plan: Plan = Plan(),
    resume: bool = False,
    original_size: bool = False,
) -> Summary:
    """Colour every row of ``source`` into ``dst``; failed rows go to ``dst/errors.jsonl``. ``resume`` skips rows
    whose output exists; without it, ``dst`` may hold none of them (nothing already written is overwritten)."""
    started, summary = time.perf_counter(), Summary()
    storage.check_writable(dst)
    there = {n for n, kind in storage.listing(dst, recursive=True).items() if kind == pafs.FileType.File}
    clean_partials(dst, there)
    done_before = np.array([o in there for o in source.rows["output"].to_pylist()], dtype=bool)
    if done_before.any() and not resume:
        raise DatasetError(
            f"--out {storage.redact(dst)} already holds {int(done_before.sum())} of the outputs; "
            "pass --resume to do only the rest, or pick another --out"
        )
    summary.skipped = int(done_before.sum())
    todo = Source(source.root, source.rows.filter(pa.array(~done_before)))
    errors = []
    if len(todo.rows):
        written = pipeline(todo, checkpoint, image_size, plan.resolved(), write, dst=dst, original_size=original_size)
        for batch in written.iter_batches(batch_size=None, batch_format="numpy"):
            bad = failed_rows(batch)
            summary.done, summary.failed = summary.done + len(batch["error"]) - len(bad), summary.failed + len(bad)
            errors.extend(bad)
    fs, path = storage.filesystem(dst)
    with fs.open_output_stream(f"{path.rstrip('/')}/{ERRORS}") as out:
        out.write("".join(json.dumps(r) + "\n" for r in errors).encode())
    summary.seconds = time.perf_counter() - started
    return summary


def clean_partials(dst: str, there: set[str]) -> None:
    """Delete the half-written temporaries a killed run left (``.NAME.tmp-*`` beside NAME)."""
    fs, path = storage.filesystem(dst)
    for name in [n for n in there if PurePosixPath(n).name.startswith(".") and ".tmp-" in n]:
        fs.delete_file(f"{path.rstrip('/')}/{name}")
        there.discard(name)


def score_all(
    source: Source, checkpoint: str, image_size: int, plan: Plan = Plan()
) -> tuple[dict[str, np.ndarray], np.ndarray, list[dict]]:
    """Return (per-image metrics of the rows that could be scored, those rows' indices, the rows that could not), in
    ``source``'s order."""
    from polycolor.metrics import METRICS

    scored = pipeline(source, checkpoint, image_size, plan.resolved(), score, targets=True)
    rows, values, errors = [], {k: [] for k in METRICS}, []
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        good = np.array([not e for e in batch["error"]], dtype=bool)
        rows.append(batch["row"][good])
        for k in METRICS:
            values[k].append(batch[k][good])
        errors += failed_rows(batch)
    order = np.argsort(np.concatenate(rows)) if rows else np.array([], int)
    per = {k: np.concatenate(v)[order] if v else np.array([]) for k, v in values.items()}
    return per, np.concatenate(rows)[order] if rows else order, errors
