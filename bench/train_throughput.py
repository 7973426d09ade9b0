"""Training images/s: the plain PyTorch loop vs the Ray Train loop (1 and 2 workers), side by side.

    python bench/train_throughput.py [--pairs 480] [--batch-size 16] [--width 8] [--repeats 3]

The same model, batch and synthetic data (``polycolor.generator``, the recipe's mix) in every case; Ray's figures
are the images/s its workers measure inside the epoch (start-up excluded), and each figure comes with the share of
the epoch spent waiting for data. First, the CPU an idle Ray's own processes take. Ray's cost is judged per worker
against the same loop without Ray, measured in the same round (the plain loops, then Ray started, then its loops;
each plain loop in new processes, as Ray starts its workers): one worker against one plain process with the same
threads, two workers against plain PyTorch DDP (gloo, two processes, the same threads each). Two workers against
one plain process alone on the machine are printed too, not judged: that adds the gradient exchange and the cores'
sharing, which are not Ray's. The verdict takes each judged ratio's median over the rounds, and the bench exits 1
when one is under 0.95. Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polycolor.config import PRESETS, TrainConfig
from polycolor.data import REAL_PALETTE
from polycolor.generator import Batches
from polycolor.loop import make_optimizer, train_one_epoch
from polycolor.model import ConditionalUNet
from polycolor.runs import init_ray
from polycolor.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.95  # of the same loop without Ray, per worker (#30)


def plain(cfg: TrainConfig, processes: int, threads: int) -> tuple[float, float]:
    """Return (images/s per process, data-wait share) of the plain loop's second epoch in ``processes`` new
    processes of ``threads`` threads each, as Ray starts its workers; several train as one DDP group over gloo."""
    results = mp.get_context("spawn").SimpleQueue()
    address = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(plain_rank, (cfg, threads, processes, address, results), nprocs=processes)  # raises if a rank fails
    figures = [results.get() for _ in range(processes)]
    return statistics.mean(f[0] for f in figures), statistics.mean(f[1] for f in figures)


def plain_rank(rank: int, cfg: TrainConfig, threads: int, world: int, address: str, results) -> None:
    """Train two epochs on ``rank``'s shard, a warm-up and the timed one; put the second's figures."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ConditionalUNet(cfg.model_config())
    if world > 1:
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model)
    loader = Batches(cfg.data.train_pairs, cfg.optim.batch_size, seed=(0, 0, rank), scenes=cfg.data.scenes)
    optimizer, scheduler = make_optimizer(model, cfg.optim, 2 * len(loader))
    for epoch in range(2):
        loader.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, scheduler, cfg.optim.loss, REAL_PALETTE, torch.device("cpu"))
    if world > 1:
        dist.destroy_process_group()
    results.put((stats["images_per_s"], stats["data_wait_share"]))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
            if process.pid != ours.pid and "ray" in " ".join(process.info["cmdline"] or []):  # ray::, raylet, ray/
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
    cfg = TrainConfig().replace(  # full-size pairs every epoch, as the plain loop makes them
        train_pairs=args.pairs,
        half_size=0.0,
        batch_size=args.batch_size,
        width=args.width,
        val_pairs=PRESETS["smoke"]["val_pairs"],
    )
    cpus = os.cpu_count() or 2
    half = max(1, cpus // 2)
    one, two = f"ray, 1 worker x {cpus} threads", f"ray, 2 workers x {half} thread(s), per worker"
    ddp, alone = f"plain DDP, 2 processes x {half} thread(s), per process", f"plain, 1 process x {half} thread(s)"
    judged = {one: f"plain, 1 process x {cpus} threads", two: ddp}  # each Ray loop against itself without Ray
    shown = {two: alone}  # and against one process alone on the machine: gloo and the shared cores, not Ray
    rounds, idle = [], None
    for round_ in range(args.repeats):  # the plain loops before Ray starts: Ray's daemons are part of its cost
        figures = {alone: plain(cfg, 1, half), judged[one]: plain(cfg, 1, cpus), ddp: plain(cfg, 2, half)}
        init_ray(num_cpus=cpus)
        if idle is None:
            time.sleep(10)  # past its start-up
            idle = ray_idle_share()
            print(f"Ray's own processes, idle: {idle:.1%} of the machine's {cpus} CPUs")
        with tempfile.TemporaryDirectory() as storage:
            figures[one] = ray_loop(cfg, 1, cpus, storage)
            figures[two] = ray_loop(cfg, 2, half, storage)
        ray.shutdown()
        rounds.append(figures)
        for label, (images, waiting) in figures.items():
            print(f"round {round_ + 1}  {label:<56} {images:8.1f} images/s  data wait {waiting:6.1%}")

    def ratios_of(pairs: dict) -> dict[str, list[float]]:
        return {f"{loop} / {base}": [r[loop][0] / r[base][0] for r in rounds] for loop, base in pairs.items()}

    ratios, others = ratios_of(judged), ratios_of(shown)
    met = all(statistics.median(values) >= GOAL for values in ratios.values())
    for name, values in (ratios | others).items():
        rounds_text = ", ".join(f"{v:.3f}" for v in values)
        goal = f"goal >= {GOAL}" if name in ratios else "not judged"
        print(f"{name:<90} median {statistics.median(values):.3f}  (rounds: {rounds_text}; {goal})")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(
        json.dumps(
            {
                "config": vars(args),
                "rounds": rounds,
                "ratios": ratios,
                "not_judged": others,
                "ray_idle": idle,
                "goal": GOAL,
                "met": met,
            },
            indent=2,
        )
    )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
