"""Training images/s: the plain PyTorch loop vs the Ray Train loop (1 and 2 workers), side by side.

    python bench/train_throughput.py [--pairs 480] [--batch-size 16] [--width 8]

The same model, batch and synthetic data (``polycolor.generator``, the recipe's mix) in every case; Ray's figures
are the images/s its workers measure inside the epoch (start-up excluded), and each figure comes with the share
of the epoch spent waiting for data. Per-worker ratios compare each Ray worker with a plain loop given the same
number of threads. Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from polycolor.config import PRESETS, TrainConfig
from polycolor.data import REAL_PALETTE
from polycolor.generator import Batches
from polycolor.loop import make_optimizer, train_one_epoch
from polycolor.model import ConditionalUNet
from polycolor.runs import init_ray
from polycolor.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=480, help="pairs per worker per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args()
    cfg = TrainConfig().replace(
        train_pairs=args.pairs, batch_size=args.batch_size, width=args.width, val_pairs=PRESETS["smoke"]["val_pairs"]
    )
    cpus = os.cpu_count() or 2

    half = max(1, cpus // 2)
    figures = {f"plain, {t} thread(s)": plain(cfg, t) for t in sorted({half, cpus})}
    init_ray(num_cpus=cpus)
    with tempfile.TemporaryDirectory() as storage:
        figures[f"ray, 1 worker x {cpus} threads"] = ray_loop(cfg, 1, cpus, storage)
        figures[f"ray, 2 workers x {half} thread(s), per worker"] = ray_loop(cfg, 2, half, storage)
    ratios = {
        "ray 1 worker / plain (same threads)": figures[f"ray, 1 worker x {cpus} threads"][0]
        / figures[f"plain, {cpus} thread(s)"][0],
        "ray 2 workers, per worker / plain (same threads)": figures[f"ray, 2 workers x {half} thread(s), per worker"][0]
        / figures[f"plain, {half} thread(s)"][0],
    }
    for label, (images, waiting) in figures.items():
        print(f"{label:<45} {images:8.1f} images/s  data wait {waiting:6.1%}")
    for label, value in ratios.items():
        print(f"{label:<45} {value:8.3f}  (goal >= 0.95)")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(
        json.dumps(
            {
                "config": vars(args),
                "images_per_s": {k: v[0] for k, v in figures.items()},
                "data_wait_share": {k: v[1] for k, v in figures.items()},
                "ratios": ratios,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
