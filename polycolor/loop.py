"""The plain-PyTorch core of training: optimiser and schedule, the loss, one epoch, one evaluation. No Ray.

Batches are (outline (B, 1, H, W), target (B, 3, H, W), colour strings); the model's conditioning mode
turns the strings into its condition tensor (``model.condition.prepare``) with the run's ``palette``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from polycolor import checkpoint
from polycolor.colors import RGB
from polycolor.config import OptimSettings
from polycolor.metrics import METRICS, per_image, polygon, summarize


def make_optimizer(model: torch.nn.Module, optim: OptimSettings, steps: int):
    """Return (optimiser, per-step LR schedule): Adam or AdamW (no weight decay) at ``optim.lr``, one-cycle to that peak
    over ``steps`` or constant."""
    kind = torch.optim.AdamW if optim.optimizer == "adamw" else torch.optim.Adam
    optimizer = kind(model.parameters(), lr=optim.lr, weight_decay=0.0)
    if optim.schedule == "onecycle":
        return optimizer, torch.optim.lr_scheduler.OneCycleLR(
            optimizer, optim.lr, total_steps=max(1, steps), pct_start=0.1
        )
    return optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else nullcontext()


def to_device(batch, model, palette: Mapping[str, RGB], device: torch.device, channels_last: bool = False):
    """Return (outline, target, condition) on ``device``."""
    outline, target, colours = batch
    cond = checkpoint.unwrap(model).condition.prepare(colours, palette)
    outline = outline.to(device, non_blocking=True)
    if channels_last:
        outline = outline.contiguous(memory_format=torch.channels_last)
    return outline, target.to(device, non_blocking=True), cond.to(device, non_blocking=True)


def compute_loss(model: torch.nn.Module, kind: str, outline, target, cond) -> torch.Tensor:
    """Return ``bce`` on the mask logits (on the channel logits for the ``rgb`` head); ``l1``/``mse`` on the image."""
    net = checkpoint.unwrap(model)
    logits = model(outline, cond, logits=True)  # through the DDP wrapper, so gradients sync
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), polygon(target) if net.cfg.head == "mask" else target)
    image = net.render(logits, cond)
    return F.l1_loss(image, target) if kind == "l1" else F.mse_loss(image, target)


def train_one_epoch(
    model, loader, optimizer, scheduler, loss: str, palette, device: torch.device, bf16: bool = True
) -> dict:
    """Train one pass over ``loader``; return this process's {"train_loss", "images_per_s", "data_wait_share"} (the
    share of the epoch spent waiting for the next batch)."""
    model.train()
    total, images, waited, start = 0.0, 0, 0.0, time.perf_counter()
    batches = iter(loader)
    while True:
        asked = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - asked
        if batch is None:
            break
        outline, target, cond = to_device(batch, model, palette, device, channels_last=device.type == "cuda")
        with autocast(device, bf16):
            value = compute_loss(model, loss, outline, target, cond)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        scheduler.step()
        total += float(value.detach()) * len(outline)
        images += len(outline)
    seconds = time.perf_counter() - start
    return {"train_loss": total / max(images, 1), "images_per_s": images / seconds, "data_wait_share": waited / seconds}


@torch.no_grad()
def evaluate(model, loader, palette, device: torch.device, bf16: bool = True) -> torch.Tensor:
    """Return per-image metric sums and the image count, as one (len(METRICS) + 1,) tensor (ready to all-reduce)."""
    model.eval()
    net = checkpoint.unwrap(model)
    sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=device)
    for batch in loader:
        outline, target, cond = to_device(batch, net, palette, device)
        with autocast(device, bf16):
            pred = net(outline, cond, hard=True)
        values = per_image(pred, target)
        sums[:-1] += torch.stack([values[k].sum() for k in METRICS]).double()
        sums[-1] += len(outline)
    return sums


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    values = sums.tolist()
    return summarize(dict(zip(METRICS, values[:-1])), int(values[-1]))
