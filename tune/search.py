"""Hyperparameter search: Ray Tune + Optuna (seeded TPE) + ASHA over polycolor.train's TorchTrainer runs.

    python -m tune.search                          # local Ray, synthetic data, a laptop-sized budget
    python -m tune.search --smoke-test             # a tiny search in a few minutes
    python -m tune.search --name s1 --resume       # continue an interrupted search
    ray job submit --working-dir . -- python -m tune.search --smoke-test

Tune's ``param_space`` holds only what is searched, under "train"; what every trial shares (the fixed training
config, where to write, the bounds) reaches the trials through ``tune.with_parameters``. Each trial is a
function that builds a TorchTrainer and reports through TuneReportCallback. At the end: a table of every
trial, the best config, the best checkpoint exported to STORAGE/NAME/best/, results.json, results.csv and
curves.png.
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

from polycolor import checkpoint, ray_compat, storage
from polycolor.conditioning import MODES
from polycolor.config import FIELDS, LOSSES, PRESETS, SECTIONS, Settings, TrainConfig, add_flags, preset, setting
from polycolor.metrics import SCORE, best
from polycolor.runs import add_run_flags, check_location, check_trusted, init_ray, preset_of, read_dataset
from polycolor.train import build_trainer, worker_resources


@dataclass(frozen=True)
class SearchSettings(Settings):
    num_samples: int = setting(8, "trials in total (3 with --smoke-test unless given)", lambda v: v >= 1, ">= 1")
    gpus_per_trial: float | None = setting(
        None, "GPUs per trial, one per worker (default: when the cluster has GPUs)", type=float
    )
    startup_minutes: float = setting(
        5.0,
        "a trial whose workers cannot be placed within this long fails, naming what holds the cluster",
        lambda v: v > 0,
        "> 0",
    )
    max_trial_minutes: float = setting(
        60.0,
        "a trial still running after this long fails and the search goes on; 0: no limit",
        lambda v: v >= 0,
        ">= 0",
    )


# Training settings a search fixes unless told (a laptop-sized budget), their flags' names here, what it searches.
SEARCH_DEFAULTS = dict(  # Progress prints each result; the last trials take the cores the others leave
    epochs=4, train_pairs=1500, half_size=0.0, threads=1, max_failures=1, epoch_lines=False, idle_cpus=True
)
FLAGS = {"epochs": "--max-epochs", "workers": "--workers-per-trial", "threads": "--cpus-per-worker"}
SEARCHED = ("lr", "loss", "conditioning", "batch_size", "width")


def search_space() -> dict:
    """Return Tune's ``param_space``: the searched settings, under "train"."""
    from ray import tune

    installed = [name for name, mode in MODES.items() if mode.available()]
    train = {
        "lr": tune.loguniform(1e-4, 1e-2),
        "loss": tune.choice(list(LOSSES)),
        "conditioning": tune.choice(installed),
        "batch_size": tune.choice([8, 16, 32]),
        "width": tune.choice([8, 16]),
    }
    return {"train": train}


def first_points() -> list[dict]:
    """Return the recipe's searched settings, tried before the sampler's own picks: a search never does worse.

    Optuna takes a point of a nested space by its flattened names ("train/lr").
    """
    recipe = preset("recipe").flat()
    return [{f"train/{k}": recipe[k] for k in SEARCHED}]


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a search shares: the fixed training config, the search's name and storage, its bounds."""

    base: TrainConfig
    name: str
    location: str
    limits: SearchSettings


def run_trial(config: dict, plan: TrialPlan, splits=None) -> None:
    """Run one trial: a TorchTrainer run named after the trial, so that a restored trial resumes its own run.

    ``config["train"]`` holds the trial's searched settings; a dataset's ``splits`` come through the object
    store, as they go on to the workers. Bounded twice: workers that cannot be placed within
    ``startup_minutes`` fail the trial with what holds the cluster, and a trial still running after
    ``max_trial_minutes`` (0: no limit) fails with that.
    """
    import ray
    from ray import tune
    from ray.train import ControllerError
    from ray.tune.integration.ray_train import TuneReportCallback

    from tune.resources import SearchTrainer, holders

    trial_id = tune.get_context().get_trial_id()
    cfg = plan.base.replace(**config["train"], name=f"{plan.name}-{trial_id}")
    limits = plan.limits
    trainer = build_trainer(
        cfg,
        plan.location,
        callbacks=[TuneReportCallback()],
        startup_minutes=limits.startup_minutes,
        trainer_cls=SearchTrainer,
        splits=ray.put(splits) if splits is not None else None,
    )
    try:
        fit_within(trainer, limits.max_trial_minutes)
    except ControllerError as err:
        if not ray_compat.is_startup_timeout(err.controller_failure):
            raise
        need = trainer.scaling_config.resources_per_worker
        why = f"{cfg.run.workers} worker(s) of {need} could not be placed within {limits.startup_minutes:g} min"
        raise TimeoutError(f"trial {trial_id}: {why}: {holders(need)}") from None


def fit_within(trainer, minutes: float):
    """Return ``trainer.fit()``, or raise TimeoutError once it has run ``minutes`` (0: no limit).

    The abandoned run ends with the trial's actor, and the search releases what it held.
    """
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
    """Return one row per trial: its searched settings, final and best metrics, best checkpoint, and how it ended.

    A checkpoint path is one inside ``location``'s filesystem (for s3://bucket/x it reads bucket/x/...).
    """
    import pyarrow.fs

    fs, _ = storage.filesystem(location)
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        metrics = result.metrics or {}
        epochs = int(frame["epoch"].max()) + 1 if frame is not None and "epoch" in frame else 0
        diverged = bool(metrics.get("diverged")) or not math.isfinite(metrics.get("train_loss", 0.0))
        status = (
            "error"
            if result.error
            else "diverged"
            if diverged
            else "stopped early"
            if epochs < max_epochs
            else "finished"
        )
        kept = []  # (checkpoint path, its metrics) of the checkpoints still on storage
        if frame is not None and "checkpoint_path" in frame and not diverged:
            for _, row in frame.dropna(subset=["checkpoint_path"]).iterrows():
                if fs.get_file_info(row["checkpoint_path"]).type != pyarrow.fs.FileType.NotFound:
                    kept.append((row["checkpoint_path"], {SCORE: float(row[SCORE]), "l1": float(row["l1"])}))
        chosen = best(kept)
        rows.append(
            {
                "trial": result.path.rsplit("/", 1)[-1].split("_")[1] if result.path else "?",
                **{k: result.config.get("train", {}).get(k) for k in SEARCHED},
                "epochs": epochs,
                "status": status,
                "best_" + SCORE: chosen[1][SCORE] if chosen else -1.0,
                "best_l1": chosen[1]["l1"] if chosen else math.inf,
                **{k: metrics.get(k) for k in (SCORE, "iou", "color_error", "l1", "psnr", "train_loss")},
                "checkpoint": chosen[0] if chosen else None,
                "error": error_line(result.error) if result.error else None,
            }
        )
    return rows


def error_line(error: BaseException) -> str:
    """Return the trial's own exception in one line, not Ray's wrapping of it (a task header and a traceback)."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}".splitlines()[0]


def write_outputs(rows: list[dict], grid, location: str, name: str) -> dict | None:
    """Print the table; write results.json, results.csv, curves.png and best/ to LOCATION/NAME (a directory or
    a URI); return the best row."""
    import tempfile

    from ray.train import Checkpoint

    header = f"{'trial':<12}{'lr':>9} {'loss':>5} {'cond':>10} {'bs':>3} {'w':>3} {'ep':>3} "
    header += f"{'best exact':>11} {'status':>14}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['trial']:<12}{r['lr']:>9.2e} {r['loss']:>5} {r['conditioning']:>10} "
            f"{r['batch_size']:>3} {r['width']:>3} "
            f"{r['epochs']:>3} {r['best_' + SCORE]:>11.6f} {r['status']:>14}"
        )
    for r in rows:
        if r["error"]:
            print(f"trial {r['trial']} failed: {r['error']}")
    usable = [
        (r, {SCORE: r["best_" + SCORE], "l1": r["best_l1"]})
        for r in rows
        if r["status"] in ("finished", "stopped early") and r["checkpoint"]
    ]
    chosen = best(usable)
    winner = chosen[0] if chosen else None
    out = storage.join(location, name)
    with tempfile.TemporaryDirectory() as tmp:
        write_files(Path(tmp), rows, winner, grid)
        storage.upload(sorted(Path(tmp).iterdir()), out)
    if winner is None:
        print("no trial produced a usable checkpoint")
        return None
    fs, _ = storage.filesystem(location)
    with Checkpoint(winner["checkpoint"], filesystem=fs).as_directory() as directory:
        checkpoint.export(directory, storage.join(out, "best"))
    print(f"\nbest trial {winner['trial']}: " + ", ".join(f"{k}={winner[k]}" for k in SEARCHED))
    print(
        f"best {SCORE} {winner['best_' + SCORE]:.6f}; "
        f"checkpoint exported to {storage.redact(storage.join(out, 'best'))}"
    )
    return winner


def write_files(out: Path, rows: list[dict], winner: dict | None, grid) -> None:
    """Write results.json, results.csv and curves.png into the local directory ``out``."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "results.json").write_text(json.dumps({"best": winner, "trials": rows}, indent=2, default=str))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    figure, axis = plt.subplots(figsize=(7, 4))
    for result, row in zip(grid, rows):
        frame = result.metrics_dataframe
        if frame is not None and SCORE in frame:
            axis.plot(
                frame["epoch"] + 1,
                frame[SCORE],
                marker="o",
                label=f"{row['trial']} {row['conditioning']} {row['loss']}",
            )
    axis.set(xlabel="epoch", ylabel=f"validation {SCORE}", title="polycolor search")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "curves.png", dpi=100)
    plt.close(figure)


def trial_concurrency(cluster: dict, workers: int, worker: dict) -> int:
    """Return how many trials fit at once: each holds its driver's 0.25 CPU plus its workers' ``worker`` resources."""
    concurrency = max(1, int(cluster.get("CPU", 1) // (0.25 + workers * worker["CPU"])))
    if "GPU" in worker:
        concurrency = min(concurrency, max(1, int(cluster.get("GPU", 0) // workers)))
    return concurrency


DRIVER_RESOURCE = "trial_driver"  # a head-node resource in cluster/aws.yaml and gcp.yaml: drivers stay off spot nodes


def driver_resources(cluster: dict) -> dict:
    """Return a trial driver's share of a CPU (its workers reserve their own), on a node that offers
    ``DRIVER_RESOURCE`` when the ``cluster``'s resources include it."""
    return {"CPU": 0.25} | ({DRIVER_RESOURCE: 1} if cluster.get(DRIVER_RESOURCE) else {})


def trial_function(plan: TrialPlan, splits=None, cluster: dict | None = None):
    """Return ``run_trial`` bound to the search's ``plan`` and a dataset's splits, with its driver's resources."""
    from ray import tune

    placement = tune.PlacementGroupFactory([driver_resources(cluster or {})])
    return tune.with_resources(tune.with_parameters(run_trial, plan=plan, splits=splits), placement)


def make_tuner(
    plan: TrialPlan,
    num_samples: int,
    concurrency: int,
    searcher=None,
    scheduler=None,
    callbacks: Sequence = (),
    space: dict | None = None,
    splits=None,
):
    """Return a Tuner over ``run_trial``: the search space (or ``space``), a searcher and a scheduler.

    Whatever an ended trial held is released by the search itself (``ReleaseEndedTrials``).
    """
    import ray
    from ray import tune

    from tune.progress import Progress
    from tune.resources import ReleaseEndedTrials

    return tune.Tuner(
        trial_function(plan, splits, ray.cluster_resources()),
        param_space=space or search_space(),
        tune_config=tune.TuneConfig(
            metric=SCORE,
            mode="max",
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=concurrency,
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.location,
            callbacks=[ReleaseEndedTrials(), Progress(plan.name), *callbacks],
            verbose=0,  # Progress prints a line per result; Tune's status tables would repeat them
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tune.search", description="Search polycolor's hyperparameters with Ray Tune and Optuna."
    )
    only = ("data", "train_pairs", "epochs", "workers", "threads", "max_failures", "name", "seed", "wandb")
    add_flags(p, *SECTIONS.values(), only=only, defaults=SEARCH_DEFAULTS, flags=FLAGS)
    add_flags(p, SearchSettings)
    add_run_flags(p, "search")
    args = p.parse_args(argv)
    args.preset = preset_of(p, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    name = given.pop("name", None) or f"polycolor-search-{time.strftime('%Y%m%d-%H%M%S')}"
    wandb = given.pop("wandb", False)  # one wandb run per trial, logged by the search, not by the trial's workers
    location = storage.resolve(args.storage or storage.default())
    try:
        limits = SearchSettings(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(SearchSettings) if hasattr(args, f.name)}
        )
        if limits.gpus_per_trial is not None:
            given["gpu"] = limits.gpus_per_trial > 0
        base = TrainConfig().replace(**SEARCH_DEFAULTS).replace(**PRESETS[args.preset]).replace(**given, wandb=False)
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
    data = (
        f"{len(splits[0])} training / {len(splits[1])} validation pairs from {base.data.data}"
        if splits
        else "synthetic"
    )
    device = "GPU" if "GPU" in worker else "CPU"
    print(
        f"[search] {name}: {num_samples} trials, up to {concurrency} at once, {device}, data {data}, "
        f"storage {storage.redact(location)}",
        flush=True,
    )

    plan = TrialPlan(base, name, location, limits)
    callbacks = []
    if wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        callbacks.append(WandbLoggerCallback(project="polycolor", group=name))
    if args.resume:
        tuner = tune.Tuner.restore(
            storage.join(location, name),
            trial_function(plan, splits, resources),
            resume_errored=True,
            param_space=search_space(),
        )
    else:
        searcher = OptunaSearch(points_to_evaluate=first_points(), seed=base.data.seed)
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=base.optim.epochs, grace_period=1, reduction_factor=2
        )
        tuner = make_tuner(plan, num_samples, concurrency, searcher, scheduler, callbacks, splits=splits)
    grid = tuner.fit()
    winner = write_outputs(trial_rows(grid, base.optim.epochs, location), grid, location, name)
    return 0 if winner is not None else 1


if __name__ == "__main__":
    sys.exit(main())
