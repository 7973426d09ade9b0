"""Training images/s: the plain PyTorch loop vs the Ray Train loop (1 and 2 workers), side by side.

    python bench/train_throughput.py [--pairs 480] [--batch-size 16] [--width 8] [--repeats 3]

The same model, batch and synthetic data (``polycolor.generator``, the recipe's mix) in every case; Ray's figures
are the images/s its workers measure inside the epoch (start-up excluded), and each figure comes with the share
of the epoch spent waiting for data. First, the CPU an idle Ray's own processes take. Per-worker ratios compare
each Ray worker with a plain loop given the same number of threads, measured in the same round (the plain loops,
then Ray started, then its loops); the verdict takes each ratio's median over the rounds, and the bench exits 1
when one is under 0.95. Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import ray
import torch

from polycolor.config import PRESETS, TrainConfig
from polycolor.data import REAL_PALETTE
from polycolor.generator import Batches
from polycolor.loop import make_optimizer, train_one_epoch
from polycolor.model import ConditionalUNet
from polycolor.runs import init_ray
from polycolor.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.95  # of the plain loop per worker, with the same threads (#30)


def plain(cfg: TrainConfig, threads: int) -> tuple[float, float]:
    """Return (images/s, data-wait share) of the plain loop's second epoch on ``threads`` threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ConditionalUNet(cfg.model_config())
    loader = Batches(cfg.data.train_pairs, cfg.optim.batch_size, seed=(0, 0, 0), scenes=cfg.data.scenes)
    optimizer, scheduler = make_optimizer(model, cfg.optim, 2 * len(loader))
    for epoch in range(2):  # a warm-up epoch, then the timed one
        loader.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, scheduler, cfg.optim.loss, REAL_PALETTE, torch.device("cpu"))
    return stats["images_per_s"], stats["data_wait_share"]


def ray_loop(cfg: TrainConfig, workers: int, threads: int, storage: str) -> tuple[float, float]:
    """Return (images/s per worker, data-wait share) of a Ray Train run's second epoch."""
    cfg = cfg.replace(
        workers=workers,
        threads=threads,
        epochs=2,
        train_pairs=cfg.data.train_pairs * workers,
        name=f"throughput-{workers}",
    )
    metrics = build_trainer(cfg, storage).fit().metrics  # the second (warm) epoch's
    return metrics["images_per_s_per_worker"], metrics["data_wait_share"]


def ray_idle_share(seconds: float = 30) -> float:
    """Return the CPU Ray's own processes (its daemons, dashboard and idle workers) take while nothing runs, as a
    share of this machine's CPUs: what a Ray loop cannot have on a machine its loops fill."""
    ours = psutil.Process()

    def spent() -> dict[int, float]:
        times = {}
        for process in psutil.process_iter(["cmdline"]):
            if process.pid != ours.pid and "ray" in " ".join(process.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    times[process.pid] = sum(process.cpu_times()[:2])
        return times

    before = spent()
    time.sleep(seconds)
    after = spent()
    return sum(after[pid] - before[pid] for pid in after.keys() & before.keys()) / seconds / (os.cpu_count() or 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=480, help="pairs per worker per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every loop, each ratio within its round")
    args = parser.parse_args()
    cfg = TrainConfig().replace(
        train_pairs=args.pairs, batch_size=args.batch_size, width=args.width, val_pairs=PRESETS["smoke"]["val_pairs"]
    )
    cpus = os.cpu_count() or 2
    half = max(1, cpus // 2)
    one, two = f"ray, 1 worker x {cpus} threads", f"ray, 2 workers x {half} thread(s), per worker"
    held_to = {one: f"plain, {cpus} thread(s)", two: f"plain, {half} thread(s)"}  # each against a worker's threads
    rounds = []
    for round_ in range(args.repeats):  # the plain loops before Ray starts: Ray's daemons are part of its cost
        figures = {f"plain, {t} thread(s)": plain(cfg, t) for t in sorted({half, cpus})}
        init_ray(num_cpus=cpus)
        if not rounds:
            time.sleep(10)  # past its start-up
            idle = ray_idle_share()
            print(f"Ray's own processes, idle: {idle:.1%} of the machine's {cpus} CPUs")
        with tempfile.TemporaryDirectory() as storage:
            figures[one] = ray_loop(cfg, 1, cpus, storage)
            figures[two] = ray_loop(cfg, 2, half, storage)
        ray.shutdown()
        rounds.append(figures)
        for label, (images, waiting) in figures.items():
            print(f"round {round_ + 1}  {label:<45} {images:8.1f} images/s  data wait {waiting:6.1%}")
    ratios = {f"{loop} / {base}": [r[loop][0] / r[base][0] for r in rounds] for loop, base in held_to.items()}
    met = all(statistics.median(values) >= GOAL for values in ratios.values())
    for name, values in ratios.items():
        rounds_text = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name:<70} median {statistics.median(values):.3f}  (rounds: {rounds_text}; goal >= {GOAL})")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(
        json.dumps(
            {"config": vars(args), "rounds": rounds, "ratios": ratios, "ray_idle": idle, "goal": GOAL, "met": met},
            indent=2,
        )
    )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
