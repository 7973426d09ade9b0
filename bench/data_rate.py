"""Training pairs/s: the batched torch generator against the per-image numpy/PIL path, one core each.

    python bench/data_rate.py [--pairs 1024] [--batch-size 16]

Both make the recipe's mix (``--scenes`` 0.6 drawings in ``drawings.TRAINING_MIX``) and plain single shapes
(``--scenes`` 0), on one thread, as a training worker asks for them: batch by batch. On a machine with a GPU it
also times the generator on the GPU at a GPU's batch sizes. Writes bench/results/data_rate.json; exits 1 when the
generator makes fewer than 5 times the per-image path's pairs/s on the recipe's mix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from polycolor.drawings import DrawingDataset
from polycolor.generator import Batches

ROOT = Path(__file__).resolve().parents[1]
GOAL = 5.0


def rate(batches, epochs: int = 2) -> float:
    """Return pairs/s over the last of ``epochs`` passes (the first warms up)."""
    for epoch in range(epochs):
        batches.set_epoch(epoch) if hasattr(batches, "set_epoch") else batches.dataset.set_epoch(epoch)
        started, pairs = time.perf_counter(), 0
        for outline, *_ in batches:
            pairs += len(outline)
        if outline.is_cuda:
            torch.cuda.synchronize()
    return pairs / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for scenes, mix in ((0.6, "recipe mix"), (0.0, "plain shapes")):
        old = rate(DataLoader(DrawingDataset(args.pairs // 4, seed=0, scenes=scenes), batch_size=args.batch_size))
        new = rate(Batches(args.pairs, args.batch_size, seed=0, scenes=scenes))
        rows.append({"data": mix, "device": "cpu, 1 thread", "per_image": old, "generator": new, "ratio": new / old})
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for batch_size in (256, 1024):
            new = rate(Batches(16 * batch_size, batch_size, seed=0, device="cuda"))
            rows.append({"data": "recipe mix", "device": f"{name}, batch {batch_size}", "generator": new})
    print(f"{'data':14} {'device':28} {'per image':>10} {'generator':>10} {'ratio':>6}")
    for row in rows:
        old = f"{row['per_image']:10.0f}" if "per_image" in row else f"{'':10}"
        ratio = f"{row['ratio']:6.2f}" if "ratio" in row else ""
        print(f"{row['data']:14} {row['device']:28} {old} {row['generator']:10.0f} {ratio}  pairs/s")
    met = rows[0]["ratio"] >= GOAL
    print(f"goal: the recipe's mix >= {GOAL:.0f}x per core: {'met' if met else 'NOT met'} ({rows[0]['ratio']:.2f}x)")
    out = ROOT / "bench" / "results" / "data_rate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "goal": GOAL, "met": met}, indent=2) + "\n")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
