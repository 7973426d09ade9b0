"""Scaling on paper: measured per-step figures of the model, and the data-parallel efficiency they predict.

    python bench/scaling.py [--width 8] [--levels 3] [--batch-sizes 16 128] [--out bench/results/scaling.json]

Measured here: parameters and gradient bytes per step (what DDP all-reduces), forward+backward FLOPs
per image, kernel-launching operators per forward+backward (profiled on CPU, allocation and view operators
left out; plus an assumed 12 for AdamW's multi-tensor step), CPU training
images/s of one worker, and synthetic pairs/s one CPU core generates. Assumed (flags, printed): the GPU's
achieved FLOP rate, the cost of one kernel launch, link bandwidths and latencies. From these, for 1-8
GPUs on one node (NVLink) and across nodes (100 and 25 Gb/s Ethernet): step time = max(compute, launches)
+ the exposed ring all-reduce (the whole model is one 25 MB DDP bucket, so it cannot overlap the
backward), efficiency = single-GPU step / N-GPU step, and whether data generation keeps up with
``--loader-workers`` processes per GPU. See bench/SCALING.md for the reading.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from polycolor.config import TrainConfig
from polycolor.data import REAL_PALETTE
from polycolor.metrics import polygon
from polycolor.model import ConditionalUNet
from polycolor.synth import SyntheticDataset

LINKS = {  # name: (bandwidth bytes/s per GPU in a ring, latency s per hop)
    "one node, NVLink": (300e9, 10e-6),
    "nodes, 100 Gb/s": (12.5e9, 30e-6),
    "nodes, 25 Gb/s": (3.1e9, 50e-6),
}


# Operators that launch no GPU kernel (allocation, views, metadata) or exist only on CPU (oneDNN layout copies).
NO_KERNEL = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::as_strided",
    "aten::as_strided_",
    "aten::resize_",
    "aten::detach",
    "aten::detach_",
    "aten::alias",
    "aten::lift_fresh",
    "aten::view",
    "aten::to",
    "aten::copy_",
    "aten::_local_scalar_dense",
}
ADAMW_KERNELS = 12  # assumed: AdamW's multi-tensor (foreach) step, its CUDA default, for all parameters at once


def forward_backward(model, batch):
    outline, target, cond = batch
    loss = F.binary_cross_entropy_with_logits(model(outline, cond, logits=True), polygon(target))
    loss.backward()


def step_once(model, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    forward_backward(model, batch)
    optimizer.step()


def measure(cfg: TrainConfig, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = ConditionalUNet(cfg.model_config())
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    data = SyntheticDataset(batch_size * 8, seed=(0, 0, 0))
    batches = []
    for start in range(0, len(data), batch_size):
        outline, target, names = zip(*(data[i] for i in range(start, start + batch_size)))
        batches.append((torch.stack(outline), torch.stack(target), model.condition.prepare(names, REAL_PALETTE)))
    with FlopCounterMode(display=False) as flops:
        step_once(model, optimizer, batches[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward_backward(model, batches[1])
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    parents = {id(e.cpu_parent) for e in ops if e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")}
    leaves = [e.name for e in ops if id(e) not in parents and e.name not in NO_KERNEL]
    launches = len(leaves) + ADAMW_KERNELS  # each leaf operator is about one kernel on a GPU
    step_once(model, optimizer, batches[2])  # warm
    start = time.perf_counter()
    for batch in batches[3:]:
        step_once(model, optimizer, batch)
    cpu_images_per_s = batch_size * len(batches[3:]) / (time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    return {
        "batch_size": batch_size,
        "parameters": params,
        "gradient_bytes": 4 * params,
        "flops_per_image": flops.get_total_flops() / batch_size,
        "launches_per_step": launches,
        "cpu_images_per_s": cpu_images_per_s,
    }


def generation_rate(n: int = 400) -> float:
    data = SyntheticDataset(n, seed=(0, 0, 0))
    start = time.perf_counter()
    for i in range(n):
        data[i]
    return n / (time.perf_counter() - start)


def predict(m: dict, gpu_flops: float, launch_s: float, loader_workers: int, pairs_per_core: float) -> list[dict]:
    compute = m["flops_per_image"] * m["batch_size"] / gpu_flops
    launches = m["launches_per_step"] * launch_s
    step = max(compute, launches)
    data_cap = loader_workers * pairs_per_core  # pairs/s one GPU's loader processes make
    rows = []
    for link, (bandwidth, latency) in LINKS.items():
        for n in (1, 2, 4, 8):
            comm = 0.0 if n == 1 else 2 * (n - 1) / n * m["gradient_bytes"] / bandwidth + 2 * (n - 1) * latency
            per_gpu = m["batch_size"] / (step + comm)
            rows.append(
                {
                    "link": link,
                    "gpus": n,
                    "step_ms": 1e3 * (step + comm),
                    "allreduce_ms": 1e3 * comm,
                    "bound": "launches" if launches > compute else "flops",
                    "efficiency": step / (step + comm),
                    "images_per_s": n * min(per_gpu, data_cap),
                    "data_bound": per_gpu > data_cap,
                }
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128])
    parser.add_argument(
        "--gpu-tflops", type=float, default=40.0, help="achieved bf16 TFLOP/s on these small convolutions (assumed)"
    )
    parser.add_argument(
        "--launch-us",
        type=float,
        default=6.0,
        help="cost of one kernel launch, microseconds (assumed; CUDA graphs cut it)",
    )
    parser.add_argument(
        "--loader-workers", type=int, default=4, help="DataLoader processes per GPU (the GPU recipe's default)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaling.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one worker's CPU share, as in a 1-CPU-per-worker Ray Train run

    cfg = TrainConfig().replace(width=args.width, levels=args.levels)
    rate = generation_rate()
    print(
        f"synthetic data: {rate:.0f} pairs/s per CPU core; {args.loader_workers} loader workers -> "
        f"{args.loader_workers * rate:.0f} pairs/s per GPU"
    )
    print(
        f"assumed: {args.gpu_tflops:.0f} TFLOP/s achieved, {args.launch_us:.0f} us per kernel launch; links: "
        + ", ".join(f"{k} {bw / 1e9:.1f} GB/s {lat * 1e6:.0f} us" for k, (bw, lat) in LINKS.items())
    )
    results = []
    for batch_size in args.batch_sizes:
        m = measure(cfg, batch_size)
        rows = predict(m, args.gpu_tflops * 1e12, args.launch_us * 1e-6, args.loader_workers, rate)
        results.append({"measured": m, "predicted": rows})
        print(
            f"\nwidth {args.width}, {args.levels} levels, batch {batch_size}/GPU: {m['parameters']:,} parameters, "
            f"{m['gradient_bytes'] / 1e6:.2f} MB of gradients per step, {m['flops_per_image'] / 1e9:.2f} GFLOP per "
            "image (fwd+bwd), "
            f"{m['launches_per_step']} op launches per step; CPU (1 thread): {m['cpu_images_per_s']:.1f} img/s"
        )
        print(
            f"{'link':<18}{'GPUs':>5}{'step ms':>9}{'allreduce ms':>14}{'bound':>10}"
            f"{'efficiency':>12}{'img/s':>9}{'data-bound':>12}"
        )
        for r in rows:
            print(
                f"{r['link']:<18}{r['gpus']:>5}{r['step_ms']:>9.2f}{r['allreduce_ms']:>14.3f}{r['bound']:>10}"
                f"{r['efficiency']:>12.3f}{r['images_per_s']:>9.0f}{str(r['data_bound']):>12}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"pairs_per_core_per_s": rate, "assumptions": vars(args) | {"out": str(args.out)}, "results": results},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
