"""Hyperparameter search: Ray Tune + Optuna (seeded TPE) + ASHA over polycolor.train's TorchTrainer runs.

    python -m tune.search                          # local Ray, synthetic data, a laptop-sized budget
    python -m tune.search --smoke-test             # a tiny search in a few minutes
    python -m tune.search --name s1 --resume       # continue an interrupted search
    ray job submit --working-dir . -- python -m tune.search --smoke-test

Each trial is a function that builds a TorchTrainer and reports through TuneReportCallback. At the end:
a table of every trial, the best config, the best checkpoint exported to STORAGE/NAME/best/,
results.json, results.csv and curves.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from polycolor import checkpoint, storage
from polycolor.conditioning import MODES
from polycolor.config import FIELDS, LOSSES, PRESETS, SECTIONS, Settings, TrainConfig, add_flags, preset, setting
from polycolor.metrics import SCORE
from polycolor.runs import add_run_flags, check_location, check_trusted, init_ray, read_dataset
from polycolor.train import build_trainer, worker_resources


@dataclass(frozen=True)
class SearchSettings(Settings):
    num_samples: int = setting(8, "trials in total (3 with --smoke-test unless given)", lambda v: v >= 1, ">= 1")
    gpus_per_trial: float | None = setting(None, "GPUs per trial, one per worker (default: when the cluster has GPUs)", type=float)
    startup_minutes: float = setting(5.0, "a trial whose workers cannot be placed within this long fails, naming what holds the cluster",
                                     lambda v: v > 0, "> 0")  # fmt: skip
    max_trial_minutes: float = setting(60.0, "a trial still running after this long fails and the search goes on; 0: no limit", lambda v: v >= 0, ">= 0")


# Training settings a search fixes unless told (a laptop-sized budget), their flags' names here, what it searches.
SEARCH_DEFAULTS = dict(epochs=4, train_pairs=1500, threads=1, max_failures=1)
FLAGS = {"epochs": "--max-epochs", "workers": "--workers-per-trial", "threads": "--cpus-per-worker"}
SEARCHED = ("lr", "loss", "conditioning", "batch_size", "width")


def search_space() -> dict:
    from ray import tune

    installed = [name for name, mode in MODES.items() if mode.available()]
    return {"lr": tune.loguniform(1e-4, 1e-2), "loss": tune.choice(list(LOSSES)), "conditioning": tune.choice(installed),
            "batch_size": tune.choice([8, 16, 32]), "width": tune.choice([8, 16])}  # fmt: skip


def first_points() -> list[dict]:
    """The recipe's searched settings, tried before the sampler's own picks: a search never does worse than it."""
    recipe = preset("recipe").flat()
    return [{k: recipe[k] for k in SEARCHED}]


def trainable(config: dict, splits=None) -> None:
    """One trial: a TorchTrainer run named after the trial, so a restored trial resumes its own run. A
    dataset's ``splits`` come through the object store (``tune.with_parameters``), as they go on to the workers.

    Bounded twice: workers that cannot be placed within ``startup_minutes`` fail the trial with what holds
    the cluster, and a trial still running after ``max_trial_minutes`` (0: no limit) fails with that."""
    import ray
    from ray import tune
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.tune.integration.ray_train import TuneReportCallback

    from tune.resources import SearchTrainer, holders

    trial_id = tune.get_context().get_trial_id()
    searched = {k: config[k] for k in SEARCHED}
    cfg = TrainConfig.from_dict(config["base"]).replace(**searched, name=f"{config['search_name']}-{trial_id}")
    trainer = build_trainer(cfg, config["storage"], callbacks=[TuneReportCallback()], startup_minutes=config["startup_minutes"],
                            trainer_cls=SearchTrainer, splits=ray.put(splits) if splits is not None else None)  # fmt: skip
    try:
        fit_within(trainer, config["max_trial_minutes"])
    except ControllerError as err:
        if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        need = trainer.scaling_config.resources_per_worker
        why = f"{cfg.run.workers} worker(s) of {need} could not be placed within {config['startup_minutes']:g} min"
        raise TimeoutError(f"trial {trial_id}: {why}: {holders(need)}") from None


def fit_within(trainer, minutes: float):
    """``trainer.fit()``, or TimeoutError once it has run ``minutes`` (0: no limit). The abandoned run ends with
    the trial's actor, and the search releases what it held."""
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the trial's thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="fit", daemon=True)
    thread.start()
    thread.join(minutes * 60 if minutes > 0 else None)
    if thread.is_alive():
        raise TimeoutError(f"trial ran past --max-trial-minutes {minutes:g}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def trial_rows(grid, max_epochs: int, location: str) -> list[dict]:
    """One row per trial: its config, final and best metrics, and how it ended. A checkpoint path is one
    inside ``location``'s filesystem (for s3://bucket/x it reads bucket/x/...)."""
    import pyarrow.fs

    fs, _ = storage.filesystem(location)
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        metrics = result.metrics or {}
        epochs = int(frame["epoch"].max()) + 1 if frame is not None and "epoch" in frame else 0
        diverged = bool(metrics.get("diverged")) or not math.isfinite(metrics.get("train_loss", 0.0))
        status = "error" if result.error else "diverged" if diverged else "stopped early" if epochs < max_epochs else "finished"
        best_path, best_score = None, -1.0
        if frame is not None and "checkpoint_path" in frame and not diverged:
            ranked = frame.dropna(subset=["checkpoint_path"]).sort_values([SCORE, "l1"], ascending=[False, True])
            for _, row in ranked.iterrows():
                if fs.get_file_info(row["checkpoint_path"]).type != pyarrow.fs.FileType.NotFound:
                    best_path, best_score = row["checkpoint_path"], float(row[SCORE])
                    break
        rows.append({
            "trial": result.path.rsplit("/", 1)[-1].split("_")[1] if result.path else "?",
            **{k: result.config.get(k) for k in SEARCHED},
            "epochs": epochs, "status": status, "best_" + SCORE: best_score,
            **{k: metrics.get(k) for k in (SCORE, "iou", "color_error", "l1", "psnr", "train_loss")},
            "checkpoint": best_path, "error": error_line(result.error) if result.error else None,
        })  # fmt: skip
    return rows


def error_line(error: BaseException) -> str:
    """The trial's own exception in one line, not Ray's wrapping of it (a task header and a traceback)."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}".splitlines()[0]


def write_outputs(rows: list[dict], grid, location: str, name: str) -> dict | None:
    """Print the table; write results.json, results.csv, curves.png and best/ to LOCATION/NAME (a directory or
    a URI); return the best row."""
    import tempfile

    from ray.train import Checkpoint

    header = f"{'trial':<12}{'lr':>9} {'loss':>5} {'cond':>10} {'bs':>3} {'w':>3} {'ep':>3} {'best exact':>11} {'status':>14}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['trial']:<12}{r['lr']:>9.2e} {r['loss']:>5} {r['conditioning']:>10} {r['batch_size']:>3} {r['width']:>3} "
              f"{r['epochs']:>3} {r['best_' + SCORE]:>11.6f} {r['status']:>14}")  # fmt: skip
    for r in rows:
        if r["error"]:
            print(f"trial {r['trial']} failed: {r['error']}")
    candidates = [r for r in rows if r["status"] in ("finished", "stopped early") and r["checkpoint"]]
    best = max(candidates, key=lambda r: r["best_" + SCORE], default=None)
    out = storage.join(location, name)
    with tempfile.TemporaryDirectory() as tmp:
        write_files(Path(tmp), rows, best, grid)
        storage.upload(sorted(Path(tmp).iterdir()), out)
    if best is None:
        print("no trial produced a usable checkpoint")
        return None
    fs, _ = storage.filesystem(location)
    with Checkpoint(best["checkpoint"], filesystem=fs).as_directory() as directory:
        checkpoint.export(directory, storage.join(out, "best"))
    print(f"\nbest trial {best['trial']}: " + ", ".join(f"{k}={best[k]}" for k in SEARCHED))
    print(f"best {SCORE} {best['best_' + SCORE]:.6f}; checkpoint exported to {storage.join(out, 'best')}")
    return best


def write_files(out: Path, rows: list[dict], best: dict | None, grid) -> None:
    """results.json, results.csv and curves.png into the local directory ``out``."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "results.json").write_text(json.dumps({"best": best, "trials": rows}, indent=2, default=str))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    figure, axis = plt.subplots(figsize=(7, 4))
    for result, row in zip(grid, rows):
        frame = result.metrics_dataframe
        if frame is not None and SCORE in frame:
            axis.plot(frame["epoch"] + 1, frame[SCORE], marker="o", label=f"{row['trial']} {row['conditioning']} {row['loss']}")
    axis.set(xlabel="epoch", ylabel=f"validation {SCORE}", title="polycolor search")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "curves.png", dpi=100)
    plt.close(figure)


def trial_concurrency(cluster: dict, workers: int, worker: dict) -> int:
    """Trials that fit at once: each holds its driver's 0.25 CPU plus its workers' ``worker`` resources."""
    concurrency = max(1, int(cluster.get("CPU", 1) // (0.25 + workers * worker["CPU"])))
    if "GPU" in worker:
        concurrency = min(concurrency, max(1, int(cluster.get("GPU", 0) // workers)))
    return concurrency


DRIVER_RESOURCE = "trial_driver"  # a head-node resource in cluster/aws.yaml and gcp.yaml: drivers stay off spot nodes


def driver_resources(cluster: dict) -> dict:
    """A trial driver's share of a CPU (its workers reserve their own), on a node that offers ``DRIVER_RESOURCE``
    when the ``cluster``'s resources include it."""
    return {"CPU": 0.25} | ({DRIVER_RESOURCE: 1} if cluster.get(DRIVER_RESOURCE) else {})


def trial_function(splits=None, cluster: dict | None = None):
    """``trainable`` with a dataset's splits and its driver's resources."""
    from ray import tune

    placement = tune.PlacementGroupFactory([driver_resources(cluster or {})])
    return tune.with_resources(tune.with_parameters(trainable, splits=splits), placement)


def param_space(name: str, location: str, base: dict, limits: SearchSettings, space: dict | None = None) -> dict:
    """The search space (or ``space``) plus what every trial needs: the fixed ``base`` config, where to write,
    and its ``limits`` (startup_minutes, max_trial_minutes)."""
    bounds = {"startup_minutes": limits.startup_minutes, "max_trial_minutes": limits.max_trial_minutes}
    return (space or search_space()) | {"base": base, "storage": location, "search_name": name} | bounds


def make_tuner(name: str, location: str, base: dict, num_samples: int, concurrency: int, searcher=None, scheduler=None,
               callbacks: Sequence = (), limits: SearchSettings = SearchSettings(), space: dict | None = None, splits=None):  # fmt: skip
    """A Tuner over ``trainable``: the search space (or ``space``), the fixed ``base`` config, a searcher and scheduler.
    Whatever an ended trial held is released by the search itself (``ReleaseEndedTrials``)."""
    import ray
    from ray import tune

    from tune.resources import ReleaseEndedTrials

    return tune.Tuner(
        trial_function(splits, ray.cluster_resources()),
        param_space=param_space(name, location, base, limits, space),
        tune_config=tune.TuneConfig(metric=SCORE, mode="max", search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=concurrency, trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(name=name, storage_path=location, callbacks=[ReleaseEndedTrials(), *callbacks],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tune.search", description="Search polycolor's hyperparameters with Ray Tune and Optuna.")
    add_flags(p, *SECTIONS.values(), only=("data", "train_pairs", "epochs", "workers", "threads", "max_failures", "name", "seed", "wandb"),
              defaults=SEARCH_DEFAULTS, flags=FLAGS)  # fmt: skip
    add_flags(p, SearchSettings)
    add_run_flags(p, "search")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    name = given.pop("name", None) or f"polycolor-search-{time.strftime('%Y%m%d-%H%M%S')}"
    wandb = given.pop("wandb", False)  # one wandb run per trial, logged by the search, not by the trial's workers
    location = storage.resolve(args.storage or storage.default())
    try:
        limits = SearchSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SearchSettings) if hasattr(args, f.name)})
        if limits.gpus_per_trial is not None:
            given["gpu"] = limits.gpus_per_trial > 0
        base = TrainConfig().replace(**SEARCH_DEFAULTS).replace(**PRESETS[args.preset or "recipe"]).replace(**given, wandb=False)
        splits = read_dataset(base.data.data)
        check_location(location, name, args.resume, "search")
        if args.resume:
            check_trusted(location, name)
    except ValueError as err:  # StorageError is one
        print(f"error: {err}", file=sys.stderr)
        return 2
    num_samples = limits.num_samples if hasattr(args, "num_samples") or args.preset != "smoke" else 3

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    # Trial drivers are mostly idle: one spare logical CPU lets them run beside their workers.
    init_ray(num_cpus=(os.cpu_count() or 1) + 1)
    resources = ray.cluster_resources()
    worker = worker_resources(base.run, resources)
    concurrency = trial_concurrency(resources, base.run.workers, worker)
    data = f"{len(splits[0])} training / {len(splits[1])} validation pairs from {base.data.data}" if splits else "synthetic"
    print(f"[search] {name}: {num_samples} trials, up to {concurrency} at once, {'GPU' if 'GPU' in worker else 'CPU'}, data {data}, storage {location}", flush=True)

    callbacks = []
    if wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        callbacks.append(WandbLoggerCallback(project="polycolor", group=name, excludes=["base"]))
    if args.resume:
        space = param_space(name, location, base.to_dict(), limits)
        tuner = tune.Tuner.restore(storage.join(location, name), trial_function(splits, resources), resume_errored=True, param_space=space)
    else:
        searcher = OptunaSearch(points_to_evaluate=first_points(), seed=base.data.seed)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=base.optim.epochs, grace_period=1, reduction_factor=2)
        tuner = make_tuner(name, location, base.to_dict(), num_samples, concurrency, searcher, scheduler, callbacks, limits, splits=splits)
    grid = tuner.fit()
    best = write_outputs(trial_rows(grid, base.optim.epochs, location), grid, location, name)
    return 0 if best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
