"""tune.search: real searches (Ray Tune + Optuna + ASHA over TorchTrainer trials) on the session's Ray."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from polycolor import checkpoint
from polycolor.predict import Colorizer

from conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))  # the Ray CLI this interpreter installed, not the first on PATH
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def search_env(ray_session) -> dict:
    return os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}


def search(ray_session, *flags, timeout=500) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tune.search", "--smoke-test", *flags]
    return subprocess.run(
        command, env=search_env(ray_session), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_a_smoke_search_exports_its_best_trial(ray_session, synth_dir, tmp_path):
    """A smoke search on a dataset exports its best trial's checkpoint, which loads."""
    done = search(ray_session, "--data", str(synth_dir), "--storage", str(tmp_path), "--name", "smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data 24 training / 8 validation pairs" in done.stdout  # the dataset reached the trials, not synthetic data
    results = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert len(results["trials"]) == 3 and (tmp_path / "smoke" / "results.csv").is_file()
    assert (tmp_path / "smoke" / "curves.png").stat().st_size > 0
    scores = [t["best_pixel_exact"] for t in results["trials"] if t["status"] in ("finished", "stopped early")]
    assert results["best"]["best_pixel_exact"] == max(scores)
    exported = checkpoint.load(tmp_path / "smoke" / "best")
    assert exported.metrics["pixel_exact"] == pytest.approx(results["best"]["best_pixel_exact"])
    assert Colorizer.from_checkpoint(tmp_path / "smoke" / "best", device="cpu").image_size == 128
    assert "best trial" in done.stdout and "status" in done.stdout  # the table was printed


def test_a_diverging_trial_is_marked_and_never_best(ray_session, tmp_path, monkeypatch):
    """U4: a trial whose loss goes NaN is stopped and never chosen as best."""
    from tune import search as module

    recipe = module.first_points()[0]
    monkeypatch.setattr(module, "first_points", lambda: [recipe | {"train/lr": 1e6}, recipe])
    assert module.main(["--smoke-test", "--storage", str(tmp_path), "--name", "nan"]) == 0
    results = json.loads((tmp_path / "nan" / "results.json").read_text())
    absurd = [t for t in results["trials"] if t["lr"] == 1e6]
    assert absurd and absurd[0]["status"] == "diverged"
    assert results["best"]["lr"] != 1e6 and len(results["trials"]) == 3
    assert sum(t["status"] in ("finished", "stopped early") for t in results["trials"]) == 2


def test_an_unplaceable_trial_fails_in_time_saying_why(ray_session, tmp_path):
    # 64 CPUs per worker never fit the session's 4: before the bound, Ray Train retried this without end.
    """A trial whose workers cannot be placed fails within its bound and says why."""
    done = search(
        ray_session,
        "--num-samples",
        "1",
        "--cpus-per-worker",
        "64",
        "--startup-minutes",
        "0.2",
        "--storage",
        str(tmp_path),
        "--name",
        "unplaceable",
        timeout=240,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # no trial produced a checkpoint
    [trial] = json.loads((tmp_path / "unplaceable" / "results.json").read_text())["trials"]
    assert trial["status"] == "error"
    assert (
        "1 worker(s) of {'CPU': 64} could not be placed within 0.2 min: the cluster has only 4 CPU in all"
        in trial["error"]
    )
    assert f"trial {trial['trial']} failed: TimeoutError" in done.stdout


def test_a_trial_past_its_minutes_fails_and_the_search_goes_on(ray_session, tmp_path):
    """A trial past --max-trial-minutes fails and the search goes on."""
    done = search(
        ray_session, "--num-samples", "2", "--max-trial-minutes", "0.05", "--storage", str(tmp_path), "--name", "slow"
    )
    trials = json.loads((tmp_path / "slow" / "results.json").read_text())["trials"]
    assert len(trials) == 2 and all(t["status"] == "error" for t in trials), trials
    assert all("ran past --max-trial-minutes 0.05" in t["error"] for t in trials)
    assert done.returncode == 1


class LeakWatch(threading.Thread):
    """Reads the GCS's placement-group table (not the dashboard) every half second and keeps, for
    each worker group whose creating actor (a trial's Train controller) has died, how long it stayed held."""

    def __init__(self):
        super().__init__(daemon=True)
        self.leaked: dict[str, list[float]] = {}  # group id -> [first seen, last seen]
        self.done = threading.Event()

    def run(self):
        from polycolor.ray_compat import placement_groups

        while not self.done.wait(0.5):
            now = time.monotonic()
            for group in placement_groups():
                if group.state == "CREATED" and group.created_by_actor and group.creator_dead:
                    self.leaked.setdefault(group.id, [now, now])[1] = now

    def longest_s(self) -> float:
        return max((last - first for first, last in self.leaked.values()), default=0.0)


@pytest.mark.slow
def test_a_frozen_dashboard_does_not_hang_the_search(ray_session, tmp_path):
    """Ray Train's own cleaner frees a stopped trial's worker group only once the dashboard's state API
    confirms that its controller died. Freezing the dashboard (SIGSTOP) makes that answer never come; busy
    loops at nice 19 keep both cores busy. Before the search freed them itself, ASHA's stopped trials kept
    their CPUs and the later trials retried their start-up without end."""
    import psutil

    gcs = ray_session.get_runtime_context().gcs_address
    [dashboard] = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(a.endswith("dashboard/dashboard.py") for a in p.info["cmdline"] or [])
        and f"--gcs-address={gcs}" in p.info["cmdline"]
    ]
    spin = "import time\nend = time.time() + 540\nwhile time.time() < end: pass"
    loops = [subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 2)]
    watch = LeakWatch()
    watch.start()
    dashboard.suspend()
    try:
        done = search(ray_session, "--num-samples", "8", "--storage", str(tmp_path), "--name", "busy", timeout=480)
    finally:
        dashboard.resume()
        watch.done.set()
        for loop in loops:
            loop.kill()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = json.loads((tmp_path / "busy" / "results.json").read_text())["trials"]
    assert len(trials) == 8 and {t["status"] for t in trials} <= {"finished", "stopped early"}, (
        trials
    )  # all final, none failed
    assert sum(t["status"] == "stopped early" for t in trials) >= 2  # ASHA did stop trials: the case that leaked
    assert watch.longest_s() < 20, f"a dead trial's workers stayed reserved {watch.longest_s():.0f} s"
    assert "released" in done.stdout  # the search itself freed them, not Ray's cleaner


@pytest.mark.slow
def test_a_search_tunes_on_the_real_dataset(ray_session, ayna, tmp_path):
    done = search(ray_session, "--data", str(ayna), "--num-samples", "2", "--storage", str(tmp_path), "--name", "ayna")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "ayna" / "results.json").read_text())
    assert all(t["status"] in ("finished", "stopped early") for t in results["trials"])
    assert "data 56 training / 5 validation pairs" in done.stdout
    assert Colorizer.from_checkpoint(tmp_path / "ayna" / "best", device="cpu").colorize(
        ayna / "validation" / "inputs" / "star.png", "red"
    )


def run_checkpoints(root: Path, search: str) -> dict[str, set[str]]:
    """trial -> the checkpoint directories of its Train run (each trial's run is ``<search>-<trial>`` beside the
    search)."""
    return {
        p.name.split("-", 1)[1]: {c.name for c in p.glob("checkpoint_*") if c.is_dir()}
        for p in root.glob(f"{search}-*")
    }


def registered(root: Path, search: str) -> dict[str, dict[int, str] | None]:
    """trial -> {epoch: checkpoint} that its Train run registered (what a resumed run starts from), or None
    where a kill cut Ray's list off mid-write (the resume then starts from the newest complete checkpoint)."""
    runs = {}
    for snapshot in root.glob(f"{search}-*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except ValueError:
            results = None
        runs[snapshot.parent.name.split("-", 1)[1]] = results and {
            r["metrics"]["epoch"]: r["checkpoint_dir_name"] for r in results
        }
    return runs


@pytest.mark.slow
def test_an_interrupted_search_resumes_to_exactly_its_trials(ray_session, tmp_path):
    """U1, U2 (finished trials), U3: SIGINT, then SIGKILL of the driver twice, each as soon as a new checkpoint
    appears (the window between writing it and registering it), each time resumed: the search completes with
    exactly the requested trials, no run's progress goes back, no epoch a run had registered is trained
    again (so finished runs are not rerun), and the restored Optuna study holds every trial with the value the
    search reported."""
    command = [
        sys.executable,
        "-m",
        "tune.search",
        "--smoke-test",
        "--num-samples",
        "4",
        "--storage",
        str(tmp_path),
        "--name",
        "r",
    ]
    env, snapshots = search_env(ray_session), []
    for interrupt in (signal.SIGINT, signal.SIGKILL, signal.SIGKILL):
        written = sum(map(len, run_checkpoints(tmp_path, "r").values()))
        driver = subprocess.Popen(
            [*command, *(["--resume"] if snapshots else [])],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while (
            driver.poll() is None
            and time.time() < deadline
            and sum(map(len, run_checkpoints(tmp_path, "r").values())) <= written
        ):
            time.sleep(0.2)
        assert driver.poll() is None, (
            f"the search ended before interrupt {len(snapshots) + 1} (exit {driver.returncode})"
        )
        driver.send_signal(interrupt)
        driver.wait(timeout=120)
        snapshots.append(registered(tmp_path, "r"))

    resumed = subprocess.run([*command, "--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = registered(tmp_path, "r")
    for trial in after:  # from one readable list of its run's checkpoints to the next:
        seen = [snapshot[trial] for snapshot in [*snapshots, after] if snapshot.get(trial)]
        for earlier, later in zip(seen, seen[1:]):
            assert max(later) >= max(earlier), (trial, seen)  # progress never went back
            again = [e for e, name in later.items() if e <= max(earlier) and name not in earlier.values()]
            assert not again, (trial, seen)  # and no epoch already registered was trained again
    trials = json.loads((tmp_path / "r" / "results.json").read_text())["trials"]
    assert len(trials) == 4 and len(after) == 4  # exactly the requested trials, each with its own run
    assert all(t["status"] in ("finished", "stopped early") for t in trials), trials

    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(metric="pixel_exact", mode="max")
    searcher.restore_from_dir(str(tmp_path / "r"))
    completed = [
        t for t in searcher._ot_study.trials if t.state == TrialState.COMPLETE
    ]  # Ray exposes the study only so
    assert sorted(t.value for t in completed) == sorted(t["pixel_exact"] for t in trials)
    assert sorted(t.params["train/lr"] for t in completed) == sorted(t["lr"] for t in trials)  # Tune's flat names


@pytest.mark.slow
def test_an_errored_trial_resumes_from_its_newest_left(ray_session, tmp_path):
    """U2 (errored trials), U5: a trial whose worker is SIGKILLed with no retries left errors; its newest
    checkpoint is then deleted. `--resume` (which passes resume_errored) continues it from the newest checkpoint
    left, to the end: it trains again only the epoch whose checkpoint was lost, none before it."""
    import shutil

    import psutil
    import ray
    from ray.util.state import list_actors

    command = [
        sys.executable,
        "-m",
        "tune.search",
        "--smoke-test",
        "--num-samples",
        "1",
        "--max-failures",
        "0",
        "--train-pairs",
        "256",
        "--max-epochs",
        "3",
        "--storage",
        str(tmp_path),
        "--name",
        "e",
    ]
    env = search_env(ray_session)
    driver = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (
        driver.poll() is None
        and time.time() < deadline
        and len(next(iter(registered(tmp_path, "e").values()), None) or ()) < 2
    ):
        time.sleep(0.2)
    ((trial, before),) = registered(tmp_path, "e").items()
    assert sorted(before) == [0, 1], before  # epochs 0 and 1 registered, epoch 2 under way
    (worker,) = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    psutil.Process(worker.pid).kill()
    driver.wait(timeout=300)
    (errored,) = json.loads((tmp_path / "e" / "results.json").read_text())["trials"]
    assert errored["status"] == "error", errored
    run = tmp_path / f"e-{trial}"
    shutil.rmtree(run / before[1])

    resumed = subprocess.run([*command, "--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (trial_row,) = json.loads((tmp_path / "e" / "results.json").read_text())["trials"]
    assert trial_row["status"] == "finished" and trial_row["epochs"] == 3, trial_row
    written: dict[int, set[str]] = {}  # epoch -> the checkpoint directories holding it
    for directory in run.glob("checkpoint_*"):
        try:
            written.setdefault(json.loads((directory / "config.json").read_text())["metrics"]["epoch"], set()).add(
                directory.name
            )
        except (OSError, ValueError):  # the snapshot file, or an upload the kill cut short
            continue
    assert written[0] == {before[0]} and sorted(written) == [0, 1, 2], written  # epoch 0 kept, not trained again
    assert before[1] not in written[1] and sorted(registered(tmp_path, "e")[trial]) == [
        1,
        2,
    ]  # from epoch 0's: 1 and 2 anew


@pytest.mark.slow
@pytest.mark.ray
def test_job_submission_with_token_auth_against_a_local_head(tmp_path):
    """N2: jobs reach a head only with Ray's token; the head's dashboard binds what it is told."""
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    home = tmp_path / "home"  # the head's home: with no --storage, the job's results go to its ~/ray_results
    env = os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": "job-test-token",
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-agent-listen-port={agent}",  # not the default 52365, which the session's Ray already holds
            "--num-cpus=3",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (auth may refuse): it is up
            except OSError:
                time.sleep(1)
        job = (
            "python -c 'import polycolor; print(\"imported from\", polycolor.__file__)' && "
            "python -m tune.search --smoke-test --num-samples 1 --name job"
        )
        command = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--", "bash", "-c", job]
        deadline = time.time() + 120
        while True:  # the dashboard answers before the head's job agent has registered: Ray says "try again later"
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
            if "No available agent" not in submit.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "runtime_resources" in submit.stdout  # the uploaded working dir, not an install, provided polycolor
        token = (
            subprocess.run([RAY, "get-auth-token"], env=env, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        request = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        jobs = json.loads(urllib.request.urlopen(request, timeout=10).read())
        assert any(j["status"] == "SUCCEEDED" and "tune.search" in j["entrypoint"] for j in jobs)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
        assert refused.value.code in (401, 403)
        best = home / "ray_results" / "job" / "best"  # not the job's working directory, which Ray deletes
        assert (best / "model.safetensors").is_file()
        assert f"checkpoint exported to {best}" in submit.stdout  # the job's last lines say where
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
