"""Train the conditional UNet: a plain-PyTorch epoch and evaluation, a thin Ray Train wrapper, a CLI.

    python -m polycolor.train --out runs/first            # the recommended CPU recipe, synthetic data
    python -m polycolor.train --data DATASET_DIR --workers 2 --epochs 20
    python -m polycolor.train --name first --resume       # continue a run whose driver died

Starts a local Ray unless RAY_ADDRESS names a cluster. Each epoch every worker reports train loss,
validation l1 / psnr / pixel_exact / iou / color_error and images/s; rank 0 writes the checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Subset

from polycolor import checkpoint, storage, text
from polycolor.colors import RGB, parse_color, phrase
from polycolor.data import PolygonDataset, Split, check, read_split
from polycolor.evaluate import METRICS, per_image, summarize
from polycolor.model import CONDITIONING_MODES, HEADS, ConditionalUNet, ModelConfig, target_mask
from polycolor.synth import NAMED_COLORS, REAL_PALETTE, SyntheticDataset

LOSSES = ("bce", "l1", "mse")
SCORE = "pixel_exact"  # the validation metric that ranks checkpoints (higher is better)


@dataclass
class TrainConfig:
    """Everything a training worker needs; Ray hands it over as a dict (``to_dict``)."""

    data: str = "synthetic"  # "synthetic" or a dataset directory (read by the driver, shipped as ``splits``)
    epochs: int = 8
    lr: float = 3e-3
    loss: str = "bce"
    batch_size: int = 16
    conditioning: str = "concat"
    text_encoder: str = text.DEFAULT_ENCODER  # the ``text`` mode's frozen encoder: a Hugging Face name or path
    head: str = "mask"
    base_width: int = 8
    levels: int = 3
    train_pairs: int = 2000  # pairs per epoch, all workers together
    val_pairs: int = 256  # synthetic validation pairs
    seed: int = 0
    workers: int = 1
    threads: int = 0  # torch CPU threads per worker; 0 = torch's default
    use_gpu: bool = False
    bf16: bool = True  # autocast on GPU
    compile: bool = False
    loader_workers: int = 0  # DataLoader processes per worker (GPU runs want several)
    name: str = "polycolor"
    wandb: bool = False
    wandb_dir: str = ""
    splits: object = None  # ray.ObjectRef of (train Split, validation Split) for a dataset directory

    def __post_init__(self):
        checks = {
            "epochs": self.epochs >= 1, "lr": self.lr > 0 and math.isfinite(self.lr), "batch_size": self.batch_size >= 1,
            "workers": self.workers >= 1, "train_pairs": self.train_pairs >= self.workers, "val_pairs": self.val_pairs >= 1,
            "levels": self.levels >= 1, "threads": self.threads >= 0, "loader_workers": self.loader_workers >= 0,
        }  # fmt: skip
        for field_name, ok in checks.items():
            if not ok:
                raise ValueError(f"{field_name} = {getattr(self, field_name)!r} is out of range")
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} is unknown; expected one of {LOSSES}")
        self.model_config(vocabulary=("_",))  # validates conditioning, head, widths
        if self.conditioning == "text" and not text.available():
            raise ValueError(text.INSTALL_HINT)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def model_config(self, vocabulary: Sequence[str] = (), text_dim: int = 384) -> ModelConfig:
        return ModelConfig(
            conditioning=self.conditioning, head=self.head, base_width=self.base_width,
            multipliers=tuple(2**i for i in range(self.levels)), vocabulary=tuple(vocabulary),
            text_encoder=self.text_encoder if self.conditioning == "text" else "", text_dim=text_dim,
        )  # fmt: skip


SMOKE = dict(epochs=2, base_width=8, levels=2, train_pairs=64, val_pairs=32, batch_size=8)


# ---------------------------------------------------------------------------------------------------
# Plain PyTorch: one epoch, one evaluation. No Ray here.


def compute_loss(model: torch.nn.Module, kind: str, outline, rgb, target, token) -> torch.Tensor:
    """``bce`` on the mask logits (on the channel logits for the ``rgb`` head); ``l1``/``mse`` on the image."""
    net = checkpoint.unwrap(model)
    logits = model(outline, rgb, token, logits=True)  # through the DDP wrapper, so gradients sync
    if kind == "bce":
        if net.cfg.head == "mask":
            return F.binary_cross_entropy_with_logits(logits[:, :1].float(), target_mask(target))
        return F.binary_cross_entropy_with_logits(logits.float(), target)
    image = net.render(logits, rgb)
    return F.l1_loss(image, target) if kind == "l1" else F.mse_loss(image, target)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else nullcontext()


def to_device(batch, device: torch.device, channels_last: bool = False):
    outline, rgb, target, token = (t.to(device, non_blocking=True) for t in batch)
    if channels_last:
        outline = outline.contiguous(memory_format=torch.channels_last)
    return outline, rgb, target, token


def train_one_epoch(model, loader, optimizer, scheduler, loss: str, device: torch.device, bf16: bool = True) -> dict:
    """One pass over ``loader``; returns {"train_loss", "images_per_s"} for this process."""
    model.train()
    total, images, start = 0.0, 0, time.perf_counter()
    for batch in loader:
        outline, rgb, target, token = to_device(batch, device, channels_last=device.type == "cuda")
        with autocast(device, bf16):
            value = compute_loss(model, loss, outline, rgb, target, token)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        scheduler.step()
        total += float(value.detach()) * len(outline)
        images += len(outline)
    return {"train_loss": total / max(images, 1), "images_per_s": images / (time.perf_counter() - start)}


@torch.no_grad()
def evaluate(model, loader, device: torch.device, bf16: bool = True) -> torch.Tensor:
    """Per-image metric sums and the image count, as one (len(METRICS) + 1,) tensor (ready to all-reduce)."""
    model.eval()
    net = checkpoint.unwrap(model)
    sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=device)
    for batch in loader:
        outline, rgb, target, token = to_device(batch, device)
        with autocast(device, bf16):
            pred = net(outline, rgb, token, hard=True)
        values = per_image(pred, target, rgb)
        sums[:-1] += torch.stack([values[k].sum() for k in METRICS]).double()
        sums[-1] += len(outline)
    return sums


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    values = sums.tolist()
    return summarize(dict(zip(METRICS, values[:-1])), int(values[-1]))


# ---------------------------------------------------------------------------------------------------
# Data for one worker.


def palette_of(cfg: TrainConfig, splits: tuple[Split, Split] | None) -> dict[str, RGB]:
    """The colours the checkpoint records: a dataset's own palette, or the real data's for synthetic."""
    if splits is None:
        return dict(REAL_PALETTE)
    return splits[1].palette | splits[0].palette


def vocabulary_of(cfg: TrainConfig, palette: dict[str, RGB]) -> tuple[str, ...]:
    """The closed vocabulary of ``embedding``; the training phrases of ``text`` (synthetic data: every CSS name too)."""
    if cfg.conditioning == "embedding":
        return tuple(sorted(palette))
    if cfg.conditioning == "text":
        return tuple(sorted(set(palette) | ({phrase(name) for name in NAMED_COLORS} if cfg.data == "synthetic" else set())))
    return ()


def build_model(cfg: TrainConfig, vocabulary: Sequence[str], palette: dict[str, RGB]) -> ConditionalUNet:
    """The UNet; in ``text`` mode with the frozen encoder's embedding of every phrase (one encoder run each)
    and, for the mask head, the phrase -> colour map solved on them."""
    if cfg.conditioning != "text":
        return ConditionalUNet(cfg.model_config(vocabulary))
    encoder = text.load(cfg.text_encoder)
    model = ConditionalUNet(cfg.model_config(vocabulary, encoder.dim))
    model.condition.phrases.copy_(encoder.embed(vocabulary))
    if model.cfg.predicts_colour:
        model.condition.fit_colour(torch.tensor([parse_color(p, palette) for p in vocabulary]) / 255)
    return model


def make_datasets(cfg: TrainConfig, rank: int, world: int, vocabulary: Sequence[str], splits):
    """(this rank's training dataset, this rank's validation shard). Synthetic shards come from (seed, rank)."""
    if splits is None:
        train = SyntheticDataset(cfg.train_pairs // world, seed=(cfg.seed, 0, rank), vocabulary=vocabulary)
        val = SyntheticDataset(cfg.val_pairs, seed=(cfg.seed, 1), vocabulary=vocabulary)
    else:
        base = PolygonDataset(splits[0], vocabulary, augment=True)
        train = ConcatDataset([base] * max(1, cfg.train_pairs // len(base)))
        val = PolygonDataset(splits[1], vocabulary)
    return train, Subset(val, range(rank, len(val), world))


# ---------------------------------------------------------------------------------------------------
# The Ray Train worker.


def train_loop_per_worker(config: dict, after_epoch: Callable[[int], None] | None = None) -> None:
    """Ray Train entry point. ``after_epoch(epoch)`` runs after each report (fault-injection tests use it)."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    is_rank0 = rank == 0
    device = ray.train.torch.get_device()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    splits = ray.get(cfg.splits) if cfg.splits is not None else None
    palette = palette_of(cfg, splits)
    vocabulary = vocabulary_of(cfg, palette)
    train_set, val_set = make_datasets(cfg, rank, world, vocabulary, splits)

    # 1. Data loaders. Synthetic data is already one shard per rank; a dataset gets a DistributedSampler.
    pin = device.type == "cuda"
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.loader_workers, pin_memory=pin, persistent_workers=cfg.loader_workers > 0)
    train_loader = DataLoader(train_set, shuffle=splits is not None, drop_last=True, **common)
    train_loader = ray.train.torch.prepare_data_loader(train_loader, add_dist_sampler=splits is not None, move_to_device=False)
    val_loader = DataLoader(val_set, batch_size=64)

    # 2. Model, optimiser, schedule: identical initialisation on every rank.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocabulary, palette).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * len(train_loader), pct_start=0.1)

    # 3. Resume from the latest checkpoint Ray hands back (after a worker failure or --resume).
    start_epoch = 0
    if resumed := ray.train.get_checkpoint():
        with resumed.as_directory() as directory:
            model.load_state_dict(checkpoint.load(directory).model.state_dict())
            state = checkpoint.load_train_state(directory)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        if is_rank0:
            print(f"[polycolor] resuming {cfg.name} at epoch {start_epoch} from {resumed.path} with {world} worker(s)", flush=True)

    model = ray.train.torch.prepare_model(model)
    if cfg.compile:
        model = torch.compile(model)
    run = start_wandb(cfg, resume=start_epoch > 0) if cfg.wandb and is_rank0 else None

    for epoch in range(start_epoch, cfg.epochs):
        # Every random draw of an epoch derives from (seed, epoch, rank): a resumed epoch replays exactly.
        torch.manual_seed(hash((cfg.seed, epoch, rank)) % 2**63)
        if isinstance(train_set, SyntheticDataset):
            train_set.set_epoch(epoch)
        elif world > 1:
            train_loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, cfg.loss, device, cfg.bf16)
        sums = evaluate(model, val_loader, device, cfg.bf16)
        loss = torch.tensor([stats["train_loss"], stats["images_per_s"]], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(loss)
        metrics = metrics_from_sums(sums) | {
            "epoch": epoch, "train_loss": loss[0].item() / world, "images_per_s": loss[1].item(),
            "images_per_s_per_worker": loss[1].item() / world, "lr": scheduler.get_last_lr()[0],
        }  # fmt: skip
        diverged = not math.isfinite(metrics["train_loss"])
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if is_rank0 and not diverged:
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch}
                checkpoint.write_into(Path(directory), model, palette, metrics, state)
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics | {"diverged": diverged}, checkpoint=saved)
        if is_rank0:
            print(f"[polycolor] epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.4f}  "
                  f"pixel_exact {metrics['pixel_exact']:.5f}  iou {metrics['iou']:.4f}  psnr {metrics['psnr']:.1f}  "
                  f"{metrics['images_per_s']:.0f} img/s", flush=True)  # fmt: skip
            if run is not None:
                log_wandb(run, model, val_set, device, metrics)
        if after_epoch is not None:
            after_epoch(epoch)
        if diverged:
            break
    if run is not None:
        run.finish()


def start_wandb(cfg: TrainConfig, resume: bool):
    """A wandb run on rank 0 with a stable id; offline unless WANDB_API_KEY is set, so it never blocks."""
    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(
        project="polycolor", name=cfg.name, id=cfg.name.replace("/", "-"), resume="allow", mode=mode,
        dir=cfg.wandb_dir or None, config={k: v for k, v in cfg.to_dict().items() if k != "splits"},
        settings=wandb.Settings(silent=True, init_timeout=60),
    )  # fmt: skip


def log_wandb(run, model, val_set, device, metrics: dict) -> None:
    import wandb

    outline, rgb, target, token = (torch.stack(t) for t in zip(*(val_set[i] for i in range(min(4, len(val_set))))))
    with torch.no_grad():
        pred = checkpoint.unwrap(model)(outline.to(device), rgb.to(device), token.to(device), hard=True).cpu()
    rows = torch.cat([outline.expand(-1, 3, -1, -1).neg().add(1), target, pred], dim=3)  # (B, 3, H, 3W)
    run.log(metrics | {"samples": [wandb.Image(r.permute(1, 2, 0).numpy()) for r in rows]}, step=metrics["epoch"])


# ---------------------------------------------------------------------------------------------------
# The driver: build a TorchTrainer, run it, export the best checkpoint.


def build_trainer(cfg: TrainConfig, location: str, max_failures: int = 0, keep: int = 2, callbacks: Sequence = (),
                  loop: Callable[[dict], None] = train_loop_per_worker, startup_minutes: float = 5.0, trainer_cls=None):  # fmt: skip
    """A TorchTrainer (or ``trainer_cls``) for ``cfg``. Workers that cannot be placed within ``startup_minutes``
    fail the run (Ray retries without end by default, which turns a cluster whose CPUs are held into a hang)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

    os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = str(startup_minutes * 60)  # Train's controller inherits it
    resources = {"CPU": max(1, cfg.threads)} | ({"GPU": 1} if cfg.use_gpu else {})
    return (trainer_cls or TorchTrainer)(
        loop,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name, storage_path=location, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"),
        ),
    )  # fmt: skip


def best_of(result) -> tuple[object, dict]:
    """(Checkpoint, metrics) of the best checkpoint by pixel_exact, then lowest l1."""
    if not result.best_checkpoints:
        raise RuntimeError("the run reported no checkpoint")
    return max(result.best_checkpoints, key=lambda cm: (cm[1][SCORE], -cm[1]["l1"]))


def read_dataset(data: str) -> tuple[Split, Split]:
    """The checked training and validation splits of a dataset directory or URI, read once by the driver and
    handed to every worker through the object store (no shared disk needed); ValueError says what is wrong."""
    try:
        with storage.local_copy(data) as root:
            if not root.is_dir():
                raise ValueError(f"--data {data}: directory does not exist")
            if not (root / "training").is_dir() or not (root / "validation").is_dir():
                raise ValueError(f"--data {data}: expected both training/ and validation/ splits")
            _, problems = check(root)
            if problems:
                raise ValueError(f"--data {data} fails its check:\n  " + "\n  ".join(problems))
            return read_split(root / "training"), read_split(root / "validation")
    except storage.StorageError as err:
        raise ValueError(f"--data {err}") from None


def init_ray(num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS's cluster, or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # "local": a new Ray, never the cluster a `ray start` on this machine left in /tmp/ray (maybe dead)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m polycolor.train", description="Train the conditional UNet on Ray Train.")
    p.add_argument("--data", default=d.data, help="'synthetic' (default: generated on every worker) or a dataset directory")
    p.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (DDP ranks)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="gpu", action="store_true", default=None, help="one GPU per worker")
    device.add_argument("--cpu", dest="gpu", action="store_false", help="CPU only (default: GPU when the cluster has one)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--loss", choices=LOSSES, default=d.loss, help="bce on the mask (default), or l1/mse on the image")
    p.add_argument("--conditioning", default=d.conditioning, help=f"one of {CONDITIONING_MODES}")
    p.add_argument("--text-encoder", default=d.text_encoder, help="--conditioning text: a Hugging Face encoder name or path (default: the packaged MiniLM)")
    p.add_argument("--head", default=d.head, help=f"one of {HEADS}: mask paints the colour exactly, rgb predicts it")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per worker")
    p.add_argument("--width", type=int, default=d.base_width, help="channels of the first level (multiple of 8)")
    p.add_argument("--levels", type=int, default=d.levels, help="encoder/decoder levels")
    p.add_argument("--train-pairs", type=int, default=d.train_pairs, help="training pairs per epoch")
    p.add_argument("--val-pairs", type=int, default=d.val_pairs, help="synthetic validation pairs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="CPUs (torch threads) per worker (default: all CPUs / workers)")
    p.add_argument("--loader-workers", type=int, default=None, help="DataLoader processes per worker (default: 4 on GPU, 0 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="disable bf16 autocast on GPU")
    p.add_argument("--max-failures", type=int, default=0, help="restarts from the last checkpoint after a worker failure")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept, best by validation pixel_exact")
    p.add_argument("--storage", help="local path or URI (s3://, gs://, file://) for checkpoints and best/ "
                   "(default ./runs; ~/ray_results inside a submitted Ray job)")
    p.add_argument("--name", help="run name (default polycolor-TIMESTAMP); with --resume, the run to continue")
    p.add_argument("--resume", action="store_true", help="continue the run STORAGE/NAME from its last checkpoint")
    p.add_argument("--out", help="where to export best/: a directory or URI (default STORAGE/NAME)")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline unless WANDB_API_KEY is set)")
    p.add_argument("--smoke-test", action="store_true", help="tiny model and data, two epochs: checks the setup in seconds")
    args = p.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    args.explicit = {
        {"width": "base_width"}.get(a.dest, a.dest) for a in p._actions
        if any(arg == o or arg.startswith(o + "=") for o in a.option_strings for arg in given)
    }  # fmt: skip
    return args


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A validated TrainConfig, before any Ray is started; ValueError on a bad flag or dataset."""
    values = dict(
        data=args.data, workers=args.workers, epochs=args.epochs, lr=args.lr, loss=args.loss, conditioning=args.conditioning,
        text_encoder=args.text_encoder, head=args.head, batch_size=args.batch_size, base_width=args.width, levels=args.levels, train_pairs=args.train_pairs,
        val_pairs=args.val_pairs, seed=args.seed, compile=args.compile, bf16=args.bf16, wandb=args.wandb,
        name=args.name or f"polycolor-{datetime.now():%Y%m%d-%H%M%S}",
    )  # fmt: skip
    if args.smoke_test:  # the tiny preset, except where a flag was given explicitly
        values |= {k: v for k, v in SMOKE.items() if k not in args.explicit}
    cfg = TrainConfig(**values)
    if args.max_failures < 0 or args.keep < 1:
        raise ValueError("--max-failures must be >= 0 and --keep >= 1")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    location = storage.resolve(args.storage or storage.default())
    try:
        cfg = config_from_args(args)
        splits = read_dataset(cfg.data) if cfg.data != "synthetic" else None
        storage.check_writable(location)
    except ValueError as err:  # StorageError is one
        print(f"error: {err}", file=sys.stderr)
        return 2
    exists = storage.run_exists(location, cfg.name)
    if args.resume and not exists:
        print(f"error: --resume: no run {cfg.name!r} under {location}", file=sys.stderr)
        return 2
    if exists and not args.resume:
        print(f"error: a run {cfg.name!r} already exists under {location}; pass --resume to continue it or pick another --name", file=sys.stderr)
        return 2

    import ray

    init_ray()
    resources = ray.cluster_resources()
    cfg.use_gpu = resources.get("GPU", 0) > 0 if args.gpu is None else args.gpu
    cfg.threads = args.threads or (1 if cfg.use_gpu else max(1, int(resources.get("CPU", 1)) // cfg.workers))
    cfg.loader_workers = args.loader_workers if args.loader_workers is not None else (4 if cfg.use_gpu else 0)
    if not storage.is_uri(location):
        cfg.wandb_dir = str(Path(location) / cfg.name)
    if splits is not None:
        cfg.splits = ray.put(splits)
    print(f"[polycolor] run {cfg.name}: {cfg.workers} worker(s) on {'GPU' if cfg.use_gpu else 'CPU'}, storage {location}", flush=True)

    start = time.perf_counter()
    result = build_trainer(cfg, location, args.max_failures, args.keep).fit()
    best, metrics = best_of(result)
    if orphans := storage.prune_orphans(result, location, cfg.name):
        print(f"[polycolor] removed {len(orphans)} unregistered checkpoint(s) left by an interrupted driver")
    out = storage.join(args.out or storage.join(location, cfg.name), "best")
    with best.as_directory() as directory:
        checkpoint.export(directory, out)
    shown = {k: round(v, 6) for k, v in metrics.items() if isinstance(v, float)}
    print(f"[polycolor] done in {time.perf_counter() - start:.0f}s; best epoch {metrics['epoch'] + 1} -> {out}")
    print(f"[polycolor] best metrics: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
