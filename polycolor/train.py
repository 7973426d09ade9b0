"""Train the conditional UNet on Ray Train: the worker (data, model, resume, report), the driver, the CLI.

    python -m polycolor.train --out runs/first            # the recommended CPU recipe, synthetic data
    python -m polycolor.train --preset published          # the design as first published
    python -m polycolor.train --data DATASET_DIR --workers 2 --epochs 20
    python -m polycolor.train --name first --resume       # continue a run whose driver died

Starts a local Ray unless RAY_ADDRESS names a cluster. Each epoch every worker reports train loss, the
validation metrics of ``polycolor.metrics`` and images/s; rank 0 writes the checkpoint, with the config.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset, DataLoader, Subset

from polycolor import checkpoint, ray_compat, storage
from polycolor.colors import RGB
from polycolor.conditioning import MODES
from polycolor.config import FIELDS, PRESETS, SECTIONS, RunSettings, TrainConfig, add_flags, preset
from polycolor.data import REAL_PALETTE, PolygonDataset
from polycolor.generator import Batches
from polycolor.images import IMAGE_SIZE
from polycolor.loop import evaluate, make_optimizer, metrics_from_sums, train_one_epoch
from polycolor.metrics import SCORE, best, colour_line
from polycolor.model import ConditionalUNet
from polycolor.runs import (
    add_run_flags,
    check_location,
    init_ray,
    preset_of,
    prune_unregistered,
    read_dataset,
    recover,
    resume_config,
)
from polycolor.synth import NAMED_COLORS

# A worker's lines go through logging, as Ray Train expects: a print there is logged, and echoed, so it shows twice.
log = logging.getLogger("polycolor")

# ---------------------------------------------------------------------------------------------------
# Data and model for one worker.


def build_model(cfg: TrainConfig, palette: dict[str, RGB], vocabulary: Sequence[str]) -> ConditionalUNet:
    """Return the UNet for ``cfg`` knowing ``vocabulary`` (when its mode has one), fitted to ``palette``."""
    mode = MODES[cfg.model.conditioning]
    vocabulary = vocabulary if mode.needs_vocabulary else ()
    model = ConditionalUNet(cfg.model_config(vocabulary, **mode.model_fields(cfg.model.text_encoder)))
    model.condition.fit(palette)
    return model


def make_loaders(cfg: TrainConfig, rank: int, world: int, colors: Sequence[str], splits, device: torch.device):
    """Return this rank's (training batches, validation batches). Synthetic pairs are made on ``device``, one shard
    per rank from (seed, rank), drawing from ``colors`` when the mode has a closed vocabulary; the validation pairs
    are made once. A dataset on disk is read through a DataLoader with a DistributedSampler."""
    data, batch_size = cfg.data, cfg.optim.batch_size
    if splits is None:
        train = Batches(data.train_pairs // world, batch_size, (data.seed, 0, rank), data.scenes, colors, device)
        val = Batches(data.val_pairs, data.val_pairs, (data.seed, 1), data.scenes, colors, device)
        outline, target, names = (part[rank::world] for part in next(iter(val)))
        return train, [(outline[k : k + 64], target[k : k + 64], names[k : k + 64]) for k in range(0, len(names), 64)]
    import ray.train.torch

    base = PolygonDataset(splits[0], augment=True)
    workers = cfg.run.loader_workers if cfg.run.loader_workers is not None else 4 if device.type == "cuda" else 0
    train = DataLoader(
        ConcatDataset([base] * max(1, data.train_pairs // len(base))),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    val = PolygonDataset(splits[1])
    return (
        ray.train.torch.prepare_data_loader(train, move_to_device=False),
        DataLoader(Subset(val, range(rank, len(val), world)), batch_size=64),
    )


# ---------------------------------------------------------------------------------------------------
# The Ray Train worker.


def train_loop_per_worker(config: dict, after_epoch: Callable[[int], None] | None = None) -> None:
    """Run one Ray Train worker: ``config`` holds the TrainConfig as a dict, and what the driver computed for this
    cluster (threads per worker, the dataset's object reference, the wandb directory). ``after_epoch(epoch)``
    runs after each report (fault-injection tests use it)."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(config["config"])
    ray_compat.quiet_train_reports()  # each epoch is one line below, not a dump of its report too
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    is_rank0 = rank == 0
    device = ray.train.torch.get_device()
    torch.set_num_threads(config["threads"])

    splits = ray.get(config["splits"]) if config["splits"] is not None else None
    palette = splits[1].palette | splits[0].palette if splits else dict(REAL_PALETTE)  # what the checkpoint records
    vocabulary = MODES[cfg.model.conditioning].vocabulary(
        palette, NAMED_COLORS if splits is None else ()
    )  # synthetic: CSS names too
    torch.manual_seed(cfg.data.seed)  # identical initialisation on every rank
    model = build_model(cfg, palette, vocabulary).to(device)
    # 1. Data: synthetic pairs made where the model trains, or the dataset through a DataLoader.
    train_loader, val_loader = make_loaders(cfg, rank, world, model.cfg.vocabulary, splits, device)

    # 2. Model, optimiser, schedule.
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(model, cfg.optim, cfg.optim.epochs * len(train_loader))

    # 3. Resume from the latest checkpoint Ray hands back (after a worker failure or --resume), or the one
    # build_trainer recovered when Ray could not use its checkpoint list (cut off by a kill, or its latest gone).
    start_epoch, loaded = 0, None
    recovered = config.get("recovered")
    if resumed := ray.train.get_checkpoint() or (recovered and ray.train.Checkpoint(recovered)):
        with resumed.as_directory() as directory:
            loaded = checkpoint.load(directory)
            model.load_state_dict(loaded.model.state_dict())
            state = checkpoint.load_train_state(directory, shown=resumed.path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        if is_rank0:
            log.info(
                f"[polycolor] resuming {cfg.run.name} at epoch {start_epoch} from {resumed.path} with {world} worker(s)"
            )

    if start_epoch >= cfg.optim.epochs:
        # Already finished (a search killed before it recorded that): say the final metrics again, or the Tune
        # trial that started this run anew ends with no result.
        ray.train.report(loaded.metrics | {"diverged": False})
        return

    model = ray.train.torch.prepare_model(model)
    if cfg.run.compile:
        model = torch.compile(model)
    run = start_wandb(cfg, config["wandb_dir"], resume=start_epoch > 0) if cfg.run.wandb and is_rank0 else None

    meters = TrainMeters(cfg.run.name, rank)
    for epoch in range(start_epoch, cfg.optim.epochs):
        started = time.perf_counter()
        # Every random draw of an epoch derives from (seed, epoch, rank): a resumed epoch replays exactly.
        torch.manual_seed(hash((cfg.data.seed, epoch, rank)) % 2**63)
        if cfg.run.idle_cpus and device.type == "cpu":  # a search's last trials take the cores the others left
            torch.set_num_threads(config["threads"] + int(ray_compat.idle_cpus_here() // world))
        if isinstance(train_loader, Batches):
            train_loader.set_epoch(epoch)
            train_loader.resize(IMAGE_SIZE // 2 if epoch < cfg.half_size_epochs else IMAGE_SIZE)
        elif world > 1:
            train_loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(
            model, train_loader, optimizer, scheduler, cfg.optim.loss, palette, device, cfg.optim.bf16
        )
        sums = evaluate(model, val_loader, palette, device, cfg.optim.bf16)
        loss = torch.tensor(
            [stats["train_loss"], stats["images_per_s"], stats["data_wait_share"]], dtype=torch.float64, device=device
        )
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(loss)
        metrics = metrics_from_sums(sums) | {
            "epoch": epoch,
            "train_loss": loss[0].item() / world,
            "images_per_s": loss[1].item(),
            "images_per_s_per_worker": loss[1].item() / world,
            "data_wait_share": loss[2].item() / world,
            "lr": scheduler.get_last_lr()[0],
        }
        meters.record(
            metrics | {"images_per_s": stats["images_per_s"], "data_wait_share": stats["data_wait_share"]},
            time.perf_counter() - started,
        )
        diverged = not math.isfinite(metrics["train_loss"])
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if is_rank0 and not diverged:
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch}
                checkpoint.write_into(Path(directory), model, palette, metrics, state, train=cfg.to_dict())
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics | {"diverged": diverged}, checkpoint=saved)
        if is_rank0 and cfg.run.epoch_lines:
            log.info(
                f"[polycolor] epoch {epoch + 1}/{cfg.optim.epochs}  loss {metrics['train_loss']:.4f}  "
                f"pixel_exact {metrics['pixel_exact']:.5f}  iou {metrics['iou']:.4f}  psnr {metrics['psnr']:.1f}  "
                f"{colour_line(metrics)}  {metrics['images_per_s']:.0f} img/s"
            )
        if is_rank0 and run is not None:
            log_wandb(run, model, val_loader, palette, device, metrics)
        if after_epoch is not None:
            after_epoch(epoch)
        if diverged:
            break
    if run is not None:
        run.finish()


class TrainMeters:
    """A worker's training metrics, exported by Ray's metrics agent (Prometheus, ``ray_`` prefixed), tagged with
    the run's name and the worker's rank; cluster/grafana-training.json charts them."""

    def __init__(self, run: str, rank: int):
        from ray.util import metrics

        self.tags = {"run": run, "rank": str(rank)}
        keys = tuple(self.tags)
        self.gauges = {
            "images_per_s": metrics.Gauge("polycolor_train_images_per_s", "training images/s of this worker", keys),
            "data_wait_share": metrics.Gauge(
                "polycolor_train_data_wait_share", "share of an epoch spent waiting for data", keys
            ),
            "train_loss": metrics.Gauge("polycolor_train_loss", "training loss of the last epoch", keys),
            "pixel_exact": metrics.Gauge(
                "polycolor_train_pixel_exact", "validation pixel_exact of the last epoch", keys
            ),
            "iou": metrics.Gauge("polycolor_train_iou", "validation polygon IoU of the last epoch", keys),
            "epoch": metrics.Gauge("polycolor_train_epoch", "the last epoch finished (from 0)", keys),
            "epoch_seconds": metrics.Gauge("polycolor_train_epoch_seconds", "wall seconds of the last epoch", keys),
        }

    def record(self, values: dict, seconds: float) -> None:
        """Set every gauge from one epoch's ``values`` (this worker's throughput, the run's metrics) and its
        ``seconds``."""
        for name, gauge in self.gauges.items():
            value = seconds if name == "epoch_seconds" else values[name]
            if math.isfinite(value):
                gauge.set(value, tags=self.tags)


def start_wandb(cfg: TrainConfig, directory: str | None, resume: bool):
    """Return a wandb run on rank 0 with a stable id; offline unless WANDB_API_KEY is set, so it never blocks."""
    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    name = cfg.run.name
    return wandb.init(
        project="polycolor",
        name=name,
        id=name.replace("/", "-"),
        resume="allow",
        mode=mode,
        dir=directory,
        config=cfg.to_dict(),
        settings=wandb.Settings(silent=True, init_timeout=60),
    )


def log_wandb(run, model, val_loader, palette, device, metrics: dict) -> None:
    import wandb

    outline, target, colours = (part[:4] for part in next(iter(val_loader)))
    net = checkpoint.unwrap(model)
    with torch.no_grad():
        pred = net(outline.to(device), net.condition.prepare(colours, palette).to(device), hard=True).cpu()
    rows = torch.cat([outline.expand(-1, 3, -1, -1).neg().add(1), target, pred], dim=3)  # (B, 3, H, 3W)
    run.log(metrics | {"samples": [wandb.Image(r.permute(1, 2, 0).numpy()) for r in rows]}, step=metrics["epoch"])


# ---------------------------------------------------------------------------------------------------
# The driver: build a TorchTrainer, run it, export the best checkpoint.


def worker_resources(run: RunSettings, cluster: dict) -> dict:
    """Return one worker's {"CPU": threads} (and {"GPU": 1}) on a cluster with ``cluster`` resources: a GPU when it has
    one (unless told), and its CPUs shared by the workers unless ``threads`` is given."""
    use_gpu = cluster.get("GPU", 0) > 0 if run.gpu is None else run.gpu
    threads = run.threads or (1 if use_gpu else max(1, int(cluster.get("CPU", 1)) // run.workers))
    return {"CPU": threads} | ({"GPU": 1} if use_gpu else {})


def build_trainer(
    cfg: TrainConfig,
    location: str,
    callbacks: Sequence = (),
    loop: Callable[[dict], None] = train_loop_per_worker,
    startup_minutes: float = 5.0,
    trainer_cls=None,
    splits=None,
):
    """Return a TorchTrainer (or ``trainer_cls``) for ``cfg`` on the connected cluster, ``splits`` an object reference
    to a dataset's. Workers that cannot be placed within ``startup_minutes`` fail the run (Ray retries without
    end by default, which turns a cluster whose CPUs are held into a hang)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray_compat.set_worker_startup_timeout(startup_minutes * 60)  # Train's controller inherits it
    run, resources = cfg.run, worker_resources(cfg.run, ray.cluster_resources())
    wandb_dir = None if storage.is_uri(location) else str(Path(location) / run.name)
    return (trainer_cls or TorchTrainer)(
        loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "threads": int(resources["CPU"]),
            "splits": splits,
            "wandb_dir": wandb_dir,
            "recovered": recover(location, run.name),
        },
        scaling_config=ScalingConfig(
            num_workers=run.workers, use_gpu="GPU" in resources, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=location,
            callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=run.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(
                num_to_keep=run.keep, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
        ),
    )


def best_of(result) -> tuple[object, dict]:
    """Return the (Checkpoint, metrics) of the run's best checkpoint (``metrics.best``)."""
    if (chosen := best(result.best_checkpoints or [])) is None:
        raise RuntimeError("the run reported no checkpoint")
    return chosen


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m polycolor.train", description="Train the conditional UNet on Ray Train."
    )
    add_flags(p, *SECTIONS.values())
    add_run_flags(p, "run")
    p.add_argument("--out", help="where to export best/: a directory or URI (default STORAGE/NAME)")
    args = p.parse_args(argv)
    args.preset = preset_of(p, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    location = storage.resolve(args.storage or storage.default())
    try:
        cfg = preset(args.preset).replace(**given).named()
        if args.resume:
            cfg = resume_config(location, cfg.run.name, PRESETS[args.preset] | given, cfg)
        splits = read_dataset(cfg.data.data)
        check_location(location, cfg.run.name, args.resume, "run")
    except ValueError as err:  # StorageError is one
        print(f"error: {err}", file=sys.stderr)
        return 2

    import ray

    init_ray()
    try:
        trainer = build_trainer(cfg, location, splits=ray.put(splits) if splits is not None else None)
    except ValueError as err:  # a run whose checkpoints all fail to load is not started over
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = "GPU" if trainer.scaling_config.use_gpu else "CPU"
    print(
        f"[polycolor] run {cfg.run.name}: {cfg.run.workers} worker(s) on {device}, storage {storage.redact(location)}",
        flush=True,
    )
    start = time.perf_counter()
    result = trainer.fit()
    chosen, metrics = best_of(result)
    if orphans := prune_unregistered([c.path for c, _ in result.best_checkpoints or []], location, cfg.run.name):
        print(f"[polycolor] removed {len(orphans)} unregistered checkpoint(s) left by an interrupted driver")
    out = storage.join(args.out or storage.join(location, cfg.run.name), "best")
    with chosen.as_directory() as directory:
        checkpoint.export(directory, out)
    shown = {k: round(v, 6) for k, v in metrics.items() if isinstance(v, float)}
    print(
        f"[polycolor] done in {time.perf_counter() - start:.0f}s; "
        f"best epoch {metrics['epoch'] + 1} -> {storage.redact(out)}"
    )
    print(f"[polycolor] best metrics: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
