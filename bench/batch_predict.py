"""Offline colourisation: the Ray Data pipeline (``polycolor.batch``) against the in-process Colorizer loop.

    python bench/batch_predict.py [--images 20000] [--small 5000] [--cpus 2]

On one local Ray of ``--cpus`` CPUs it colours the same rows (a split in our layout over 1,000 synthetic
128x128 outlines, each row its own colour and output; the default recipe's model shape), reading PNGs and
writing PNGs, four ways:
  in-process   the Colorizer's own loop in one process, torch on all ``--cpus`` threads
  1 actor      ``python -m polycolor.predict --data`` (the Ray Data pipeline) with one actor on all the CPUs
  2 actors     the same with two actors, half the CPUs each
  2 actors     again on ``--small`` rows, to show that memory does not grow with the input
It prints images/s, each as a ratio of in-process (goal: 2 actors >= 0.9), and the peak RSS of the
pipeline's driver and of its largest actor (private, USS), sampled every 0.2 s (goal: the same at --small and --images).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from polycolor import checkpoint, synth
from polycolor.config import preset
from polycolor.data import open_image
from polycolor.model import ConditionalUNet
from polycolor.predict import Colorizer


class PeakRSS:
    """Peak private memory (USS: resident and not shared, so not the object store's pages a process maps) of
    the driver process and of Ray's actor workers, sampled while a block runs."""

    def __init__(self, driver: int, every: float = 0.2):
        self.pid, self.every, self.driver, self.actor, self.actors_seen = driver, every, 0, 0, set()

    def sample(self) -> None:
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid == self.pid:
                    self.driver = max(self.driver, p.memory_full_info().uss)
                if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::MapWorker"):
                    self.actor = max(self.actor, p.memory_full_info().uss)
                    self.actors_seen.add(p.pid)
            except psutil.Error:
                continue

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def dataset(root: Path, n: int, unique: int = 1000) -> Path:
    """A split of ``n`` rows over ``unique`` synthetic outlines, each row its own colour and output file."""
    synth.write_split(synth.generate(unique, seed=0), root)
    rows = json.loads((root / "data.json").read_text())
    names = sorted(synth.NAMED_COLORS)
    many = [dict(rows[i % unique], colour=names[i % len(names)], output_image=f"{i:06d}.png") for i in range(n)]
    (root / "data.json").write_text(json.dumps(many))
    return root


def in_process(split_dir: Path, ckpt: Path, out: Path, threads: int) -> float:
    """The Colorizer's own loop in this process: read, colour 64 at a time, write."""
    torch.set_num_threads(threads)
    colorizer = Colorizer.from_checkpoint(ckpt, "cpu")
    rows = json.loads((split_dir / "data.json").read_text())
    out.mkdir(parents=True)
    start = time.perf_counter()
    for first in range(0, len(rows), 64):
        chunk = rows[first : first + 64]
        pictures = [open_image(split_dir / "inputs", r["input_polygon"]) for r in chunk]  # as the pipeline reads
        for row, image in zip(chunk, colorizer.colorize_batch(pictures, [r["colour"] for r in chunk])):
            image.save(out / row["output_image"])
    return len(rows) / (time.perf_counter() - start)


def pipelined(split_dir: Path, ckpt: Path, out: Path, actors: int, cpus: int, address: str) -> tuple[float, PeakRSS]:
    """``python -m polycolor.predict --data`` as its own driver on the running Ray: (images/s, peak memory)."""
    command = [
        sys.executable,
        "-m",
        "polycolor.predict",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(split_dir),
        "--out",
        str(out),
        "--concurrency",
        str(actors),
        "--cpus-per-actor",
        str(cpus / actors),
        "--gpus-per-actor",
        "0",
    ]
    env = os.environ | {"RAY_ADDRESS": address}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    with PeakRSS(driver.pid) as peak:
        stdout, _ = driver.communicate()
    found = re.search(r"done (\d+), failed (\d+), skipped \d+ in [\d.]+ s \(([\d.]+) images/s\)", stdout)
    rows = len(json.loads((split_dir / "data.json").read_text()))
    if driver.returncode or not found or int(found[1]) != rows:
        sys.exit(f"error: the pipeline did not colour all {rows} rows (exit {driver.returncode}): {stdout[-500:]}")
    if len(peak.actors_seen) < actors or not peak.driver:
        sys.exit(
            f"error: saw {len(peak.actors_seen)} actor processes (expected {actors}) and driver {peak.driver} B; no "
            "memory figure to print"
        )
    return float(found[3]), peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--small", type=int, default=5000)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="polycolor-bench-"))
    try:
        data = {n: dataset(work / f"data{n}", n) for n in {args.images, args.small}}
        ckpt = checkpoint.write(work / "ckpt", ConditionalUNet(preset("recipe").model_config()), synth.NAMED_COLORS)
        print(
            f"{args.images} rows of 128x128 outlines, recipe-sized model, {args.cpus} CPUs (this machine: "
            f"{os.cpu_count()})"
        )
        local = in_process(data[args.images], ckpt, work / "out-local", args.cpus)
        context = ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
        rows = [("in-process", args.images, local, None)]
        for actors, n in ((1, args.images), (2, args.images), (2, args.small)):
            rate, peak = pipelined(
                data[n], ckpt, work / f"out-{actors}-{n}", actors, args.cpus, context.address_info["gcs_address"]
            )
            rows.append((f"{actors} actor{'s' * (actors > 1)}", n, rate, peak))
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'way':<12} {'images':>7} {'images/s':>9} {'x in-proc':>9} {'driver MB':>10} {'actor MB':>9}")
    for name, n, rate, peak in rows:
        memory = f"{peak.driver / 2**20:>10.0f} {peak.actor / 2**20:>9.0f}" if peak else f"{'':>10} {'':>9}"
        print(f"{name:<12} {n:>7} {rate:>9.1f} {rate / local:>9.2f} {memory}")
    big, small = rows[2][3], rows[3][3]
    print(
        f"peak memory at {args.images} / at {args.small} rows: driver {big.driver / small.driver:.2f}x, actor "
        f"{big.actor / small.actor:.2f}x (goal: 1.0)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
