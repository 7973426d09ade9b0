"""Optuna + ASHA vs random search vs a small grid, equal trial budgets, on synthetic data.

    python bench/tune_efficiency.py [--trials 8] [--max-epochs 4] [--train-pairs 400]

For each strategy: the best validation pixel_exact reached and the trial-epochs spent (the compute), and
the epochs Optuna+ASHA needed to reach random search's best. Goal: random's best quality with at most half
its trial-epochs. Writes bench/results/tune_efficiency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from polycolor.config import TrainConfig
from polycolor.metrics import SCORE
from polycolor.runs import init_ray
from tune.search import SearchSettings, TrialPlan, first_points, make_tuner, search_space, trial_concurrency

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, storage: str, base: TrainConfig, trials: int, concurrency: int, **kwargs) -> dict:
    start = time.perf_counter()
    grid = make_tuner(TrialPlan(base, name, storage, SearchSettings()), trials, concurrency, **kwargs).fit()
    frames = [(r.metrics_dataframe, r.metrics or {}) for r in grid]
    epochs = sum(len(f) for f, _ in frames if f is not None)
    best = max((float(f[SCORE].max()) for f, _ in frames if f is not None and SCORE in f), default=0.0)
    # when (in cumulative trial-epochs, in completion order) the best-so-far crossed each level
    curve, spent, running = [], 0, 0.0
    for f, _ in sorted(((f, m) for f, m in frames if f is not None), key=lambda fm: fm[0]["timestamp"].max()):
        spent += len(f)
        running = max(running, float(f[SCORE].max()))
        curve.append((spent, running))
    return {"best": best, "trial_epochs": epochs, "wall_s": time.perf_counter() - start, "curve": curve}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--train-pairs", type=int, default=400)
    args = parser.parse_args()
    init_ray(num_cpus=(os.cpu_count() or 1) + 1)
    import ray

    concurrency = trial_concurrency(ray.cluster_resources(), 1, {"CPU": 1})
    base = TrainConfig().replace(  # full size throughout, as the search trains
        epochs=args.max_epochs,
        train_pairs=args.train_pairs,
        val_pairs=64,
        half_size=0.0,
        threads=1,
        loader_workers=0,
        gpu=False,
    )
    # 8 grid points (4 learning rates x 2 conditionings), the other choices at the recipe's values
    grid_space = {
        "train": search_space()["train"]
        | {
            "lr": tune.grid_search([1e-4, 4.6e-4, 2.2e-3, 1e-2]),
            "conditioning": tune.grid_search(["concat", "film"]),
            "loss": "bce",
            "batch_size": 16,
            "width": 8,
        }
    }
    with tempfile.TemporaryDirectory() as storage:
        results = {
            "optuna+asha": run(
                "optuna-asha",
                storage,
                base,
                args.trials,
                concurrency,
                searcher=OptunaSearch(points_to_evaluate=first_points(), seed=0),
                scheduler=ASHAScheduler(
                    time_attr="training_iteration", max_t=args.max_epochs, grace_period=1, reduction_factor=2
                ),
            ),
            "random": run("random", storage, base, args.trials, concurrency),
            "grid": run("grid", storage, base, 1, concurrency, space=grid_space),
        }
    target = results["random"]["best"]
    reached = next((spent for spent, best in results["optuna+asha"]["curve"] if best >= target), None)
    print(f"\n{'strategy':<14}{'best ' + SCORE:>18}{'trial-epochs':>14}{'wall s':>9}")
    for label, r in results.items():
        print(f"{label:<14}{r['best']:>18.6f}{r['trial_epochs']:>14}{r['wall_s']:>9.0f}")
    ratio = reached / results["random"]["trial_epochs"] if reached else None
    print(
        f"\noptuna+asha reached random's best ({target:.6f}) after {reached} trial-epochs: "
        f"{'%.2f' % ratio if ratio else 'never'} of random's {results['random']['trial_epochs']} (goal <= 0.5)"
    )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_efficiency.json").write_text(
        json.dumps(
            {"args": vars(args), "results": results, "optuna_epochs_to_random_best": reached, "ratio": ratio}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
