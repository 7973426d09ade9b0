"""Ray Train: a real TorchTrainer on the session's local Ray, tiny configs, faults injected for real."""

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from PIL import Image
from ray.train.v2.api.callback import UserCallback

from polycolor import checkpoint
from polycolor.config import TrainConfig, preset
from polycolor.predict import Colorizer
from polycolor.runs import newest_complete, resume_point
from polycolor.train import best_of, build_trainer, train_loop_per_worker

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
ray.cloudpickle.register_pickle_by_value(
    sys.modules[__name__]
)  # the hooks below run in Ray's workers, which cannot import this file


def smoke(name: str, **overrides) -> TrainConfig:
    return preset("smoke").replace(name=name, threads=1, **overrides)


def registered_epoch(run: Path) -> int | None:
    """The epoch of the latest checkpoint Ray Train's list (its snapshot) registered for ``run``, if any."""
    try:
        return json.loads((run / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"][
            "metrics"
        ]["epoch"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or being rewritten
        return None


def wait_registered(run: Path, epoch: int, seconds: float = 60) -> None:
    """Wait until Ray has registered ``run``'s checkpoint of ``epoch``: a kill after that must never lose it."""
    deadline = time.time() + seconds
    while (latest := registered_epoch(run)) is None or latest < epoch:
        if time.time() > deadline:
            raise TimeoutError(f"epoch {epoch} of {run} was not registered within {seconds} s")
        time.sleep(0.1)


def epoch_logger(log: Path, crash_at: int | None = None, kill: Path | None = None, always: bool = False):
    """after_epoch hook: append the epoch to ``log``; fail the first attempt at ``crash_at`` (``always``: every
    epoch). ``kill``: a run's directory; the failure is then a SIGKILL of the worker, once Ray registered the epoch."""

    def after_epoch(epoch: int) -> None:
        import ray.train

        if ray.train.get_context().get_world_rank() != 0:
            return
        with open(log, "a") as f:
            f.write(f"{epoch}\n")
        marker = log.with_suffix(".crashed")
        if always or (epoch == crash_at and not marker.exists()):
            marker.touch()
            with open(log.with_suffix(".attempts"), "a") as f:
                f.write("x")
            if kill:
                wait_registered(kill, epoch)
                log.with_suffix(".pid").write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("boom-original: injected failure")

    return after_epoch


def checkpoint_dirs(run: Path) -> list[Path]:
    return sorted(p for p in run.glob("checkpoint_*") if p.is_dir())


def epochs(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()]


def test_bad_flags_fail_before_ray_starts(tmp_path, monkeypatch, capsys):
    from polycolor import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "init_ray", lambda *a: pytest.fail("Ray was started"))
    for flags, message in [
        (["--lr", "-1"], "lr = -1.0 is out of range"),
        (["--conditioning", "clip"], "conditioning 'clip' is unknown"),
        (["--data", str(tmp_path / "missing")], "directory does not exist"),
        (["--epochs", "0"], "epochs = 0 is out of range"),
    ]:
        assert train.main(flags) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("error: ") and message in line, (flags, line)


def test_a_two_worker_run_saves_its_config_and_logs(ray_session, tmp_path):
    """A two-worker run completes, saves its config and logs to wandb."""
    cfg = smoke("two", workers=2, wandb=True)
    result = build_trainer(cfg, str(tmp_path)).fit()
    best, metrics = best_of(result)
    assert metrics["epoch"] == cfg.optim.epochs - 1 and metrics["pixel_exact"] > 0.5  # better than an all-white answer
    assert {"inside_r", "true_r"} <= set(metrics)  # the average colour inside the polygon, every epoch
    with best.as_directory() as directory:
        exported = checkpoint.export(directory, tmp_path / "best")
    colorizer = Colorizer.from_checkpoint(tmp_path / "best", device="cpu")
    assert colorizer.colorize(Image.new("RGB", (128, 128), "white"), "red").size == (128, 128)
    assert exported.metrics["epoch"] == metrics["epoch"]
    saved = json.loads((tmp_path / "best" / "config.json").read_text())["train"]
    assert TrainConfig.from_dict(saved) == cfg
    runs = list((tmp_path / "two" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs and runs[0].stat().st_size > 0


def test_a_worker_raising_once_resumes_exactly(ray_session, tmp_path):
    """T1, T5: a worker raising once resumes at the last checkpoint's epoch + 1, and ends with the weights of an
    uninterrupted run, its first two epochs at half size as the recipe's are."""
    log = tmp_path / "flaky.log"
    cfg = smoke("flaky", epochs=4, half_size=0.5)
    loop = partial(train_loop_per_worker, after_epoch=epoch_logger(log, crash_at=1))
    result = build_trainer(cfg.replace(max_failures=1), str(tmp_path), loop=loop).fit()
    seen = epochs(log)
    assert seen[:2] == [0, 1] and seen[-1] == 3
    assert seen[2] in (1, 2), f"resumed from epoch {seen[2]}, not from the last checkpoint"  # never 0
    assert len(seen) <= 5  # at most one epoch recomputed
    flaky = best_of(result)[1]

    clean_log = tmp_path / "clean.log"
    clean = build_trainer(
        smoke("clean", epochs=4, half_size=0.5),
        str(tmp_path),
        loop=partial(train_loop_per_worker, after_epoch=epoch_logger(clean_log)),
    ).fit()
    assert epochs(clean_log) == [0, 1, 2, 3]
    steady = best_of(clean)[1]
    assert abs(flaky["l1"] - steady["l1"]) <= 0.01 * steady["l1"] + 1e-9
    assert flaky["lr"] == pytest.approx(steady["lr"])  # the LR schedule resumed where it was
    with clean.checkpoint.as_directory() as a, result.checkpoint.as_directory() as b:
        wa, wb = checkpoint.load(a).model.state_dict(), checkpoint.load(b).model.state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_a_sigkilled_worker_resumes_at_the_next_epoch(ray_session, tmp_path):
    """T2: a worker process SIGKILLed after its first checkpoint: the run resumes at that checkpoint's epoch + 1,
    recomputes nothing, completes without a hang, and no worker process is left."""
    import psutil
    from ray.util.state import list_actors

    log = tmp_path / "killed.log"
    loop = partial(train_loop_per_worker, after_epoch=epoch_logger(log, crash_at=0, kill=tmp_path / "killed"))
    result = build_trainer(smoke("killed", epochs=3, max_failures=1), str(tmp_path), loop=loop).fit()
    assert epochs(log) == [0, 1, 2] and log.with_suffix(".attempts").read_text() == "x"
    assert result.checkpoint is not None and registered_epoch(tmp_path / "killed") == 2
    killed = int(log.with_suffix(".pid").read_text())
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    alive = list_actors(
        address=ray_session.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    assert not alive, alive


# Where a kill may land in the upload of a checkpoint's files (config.json, model.safetensors, train_state.pt,
# in that order): (files copied whole, fraction of the next one copied).
KILL_POINTS = [(0, 0.0), (0, 0.5), (1, 0.5), (2, 0.5), (3, 0.0)]


def loop_killed_mid_upload(config: dict, plan: Path, log: Path, run: Path) -> None:
    """``train_loop_per_worker`` with Ray's upload of each attempt's second checkpoint cut at the next point of
    ``plan`` (a JSON list of KILL_POINTS), once Ray has registered the previous one, by a SIGKILL of the worker.
    ``log`` gets "upload E" for each checkpoint uploaded whole and "killed E" for each cut."""
    import shutil

    import ray.train.v2._internal.execution.storage as ray_storage

    copy, uploads = ray_storage._pyarrow_fs_copy_files, []

    def upload(source, destination, destination_filesystem=None, **kwargs):
        points = json.loads(plan.read_text())
        if destination_filesystem is None or not Path(destination).name.startswith("checkpoint_"):
            return copy(source, destination, destination_filesystem=destination_filesystem, **kwargs)
        epoch = json.loads((Path(source) / "config.json").read_text())["metrics"]["epoch"]
        uploads.append(epoch)
        if len(uploads) == 1 or not points:
            copy(source, destination, destination_filesystem=destination_filesystem, **kwargs)
            with open(log, "a") as f:
                f.write(f"upload {epoch}\n")
            return None
        (whole, part), *rest = points
        plan.write_text(json.dumps(rest))
        wait_registered(run, epoch - 1)
        names = sorted(os.listdir(source))
        for name in names[:whole]:
            shutil.copy(Path(source) / name, Path(destination) / name)
        if whole < len(names):
            data = (Path(source) / names[whole]).read_bytes()
            (Path(destination) / names[whole]).write_bytes(data[: int(len(data) * part)])
        with open(log, "a") as f:
            f.write(f"killed {epoch}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    ray_storage._pyarrow_fs_copy_files = upload
    train_loop_per_worker(config)


@pytest.mark.slow
def test_a_worker_killed_mid_upload_resumes_from_the_newest(ray_session, tmp_path):
    """C3, T2: a worker SIGKILLed at each point of writing a checkpoint (no file yet, each file cut halfway,
    every file written but not yet registered), one kill per attempt: each attempt resumes from the newest
    checkpoint Ray registered, never an older one, and the run ends with every checkpoint in its list whole."""
    plan, log, run = tmp_path / "plan.json", tmp_path / "uploads.log", tmp_path / "cut"
    plan.write_text(json.dumps(KILL_POINTS))
    loop = partial(loop_killed_mid_upload, plan=plan, log=log, run=run)
    epochs_run = len(KILL_POINTS) + 1
    result = build_trainer(
        smoke("cut", epochs=epochs_run, max_failures=len(KILL_POINTS), keep=epochs_run), str(tmp_path), loop=loop
    ).fit()
    expected = ["upload 0"] + [line for e in range(1, epochs_run) for line in (f"killed {e}", f"upload {e}")]
    assert log.read_text().splitlines() == expected  # after each cut, the next attempt starts at the cut epoch
    listed = json.loads((run / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    assert sorted(r["metrics"]["epoch"] for r in listed) == list(range(epochs_run))
    assert all(checkpoint.load(run / r["checkpoint_dir_name"]) for r in listed)
    assert len(checkpoint_dirs(run)) == epochs_run + len(KILL_POINTS)  # the cut uploads stay unregistered beside them
    assert result.checkpoint is not None


def test_failing_every_attempt_stops_after_max_failures_plus_one(ray_session, tmp_path):
    """T3: a worker failing every attempt stops the run after max_failures + 1 attempts, naming the error."""
    from ray.train import TrainingFailedError

    log = tmp_path / "doomed.log"
    loop = partial(train_loop_per_worker, after_epoch=epoch_logger(log, crash_at=0, always=True))
    with pytest.raises(TrainingFailedError) as err:
        build_trainer(smoke("doomed", epochs=6, max_failures=2), str(tmp_path), loop=loop).fit()
    assert log.with_suffix(".attempts").read_text() == "xxx"
    assert "boom-original" in str(err.value) or "boom-original" in repr(err.value.__cause__)


def test_a_killed_driver_resumes_as_trained(ray_session, tmp_path):
    """T4: a SIGKILLed driver resumes from the newest checkpoint Ray registered (or, its list cut by the kill, the
    newest that loads whole), at that epoch + 1, and ends keeping exactly the newest checkpoints."""
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "polycolor.train",
        "--smoke-test",
        "--epochs",
        "8",
        "--threads",
        "1",
        "--storage",
        str(tmp_path),
        "--name",
        "t4",
        "--keep",
        "2",
    ]
    driver = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    registered = tmp_path / "t4" / "checkpoint_manager_snapshot.json"  # Ray's record of the checkpoints it registered
    while not (registered.exists() and len(checkpoint_dirs(tmp_path / "t4")) >= 2) and time.time() < deadline:
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert checkpoint_dirs(tmp_path / "t4"), "no checkpoint appeared before the deadline"
    newest = resume_point(str(tmp_path), "t4")[0] or newest_complete(str(tmp_path), "t4")
    expected = checkpoint.load(newest).metrics["epoch"] + 1

    again = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert "already exists" in again.stderr  # a reused name never resumes by accident
    changed = subprocess.run(
        [*command, "--resume", "--width", "16", "--lr", "0.01", "--workers", "1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert changed.returncode == 2 and "Started a local Ray" not in changed.stdout + changed.stderr
    assert "--width 8 (given 16), --lr 0.003 (given 0.01)" in changed.stderr, changed.stderr  # --workers may change
    resumed = subprocess.run(
        [sys.executable, "-m", "polycolor.train", "--storage", str(tmp_path), "--name", "t4", "--resume"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "resuming t4 at epoch " in output, output[-4000:]
    start = int(output.split("resuming t4 at epoch ")[1].split()[0])
    assert start == expected and Path(newest).name in output.split("resuming t4 at epoch ")[1].splitlines()[0]
    assert "epoch 8/8" in output
    kept = checkpoint_dirs(tmp_path / "t4")
    loaded = [checkpoint.load(path) for path in kept]
    assert len(kept) == 2
    best = checkpoint.load(tmp_path / "t4" / "best")
    assert best.metrics["pixel_exact"] == max(item.metrics["pixel_exact"] for item in loaded)


def test_a_cut_checkpoint_list_resumes_from_the_newest(ray_session, tmp_path):
    """C3, T4: Ray rewrites its checkpoint list in place, so a kill mid-write leaves it cut off; with the newest
    checkpoint half-written too, the run resumes from the newest complete one: not from scratch, not an error."""
    build_trainer(smoke("cut", epochs=2), str(tmp_path)).fit()
    run = tmp_path / "cut"
    _, second = checkpoint_dirs(run)
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # the kill interrupted its upload
    snapshot = run / "checkpoint_manager_snapshot.json"
    snapshot.write_text(snapshot.read_text()[:100])  # and Ray's list, rewritten in place

    log = tmp_path / "epochs.log"
    loop = partial(train_loop_per_worker, after_epoch=epoch_logger(log))
    result = build_trainer(smoke("cut", epochs=2), str(tmp_path), loop=loop).fit()
    assert epochs(log) == [1]  # epoch 0 came from the first checkpoint, the only complete one
    assert (
        json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"] == 1
        and result.checkpoint is not None
    )


class ReportLog(UserCallback):
    """Appends the epoch of every report Ray Train hands its callbacks (as Tune's TuneReportCallback is) to ``log``."""

    def __init__(self, log: Path):
        self.log = log

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.log, "a") as f:
            f.write(f"{metrics[0]['epoch']}\n")


def test_a_finished_run_started_again_trains_nothing(ray_session, tmp_path):
    """U1, U2: a search killed after a trial's run finished, but before Tune recorded that, starts the trial
    again. Its run must train no epoch and still report its final metrics: Tune fails a trial that reports none."""
    first = build_trainer(smoke("done", epochs=2), str(tmp_path)).fit()
    trained, reported = tmp_path / "trained.log", tmp_path / "reported.log"
    trained.touch()
    loop = partial(train_loop_per_worker, after_epoch=epoch_logger(trained))
    again = build_trainer(smoke("done", epochs=2), str(tmp_path), callbacks=[ReportLog(reported)], loop=loop).fit()
    assert epochs(trained) == [] and epochs(reported) == [1]
    assert again.metrics["pixel_exact"] == first.metrics["pixel_exact"], again.metrics
