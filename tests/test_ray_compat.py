"""polycolor.ray_compat: each Ray internal polycolor uses is still where it was, and still does what we need."""

import os
import subprocess
import sys
import time

import pytest

from polycolor import ray_compat


def test_a_moved_internal_is_named_with_rays_version():
    import ray

    with pytest.raises(
        ray_compat.RayInternalMoved, match=f"ray {ray.__version__} has no ray.train.nothing.here; polycolor.ray_compat"
    ):
        ray_compat.internal("ray.train.nothing", "here")


def test_the_checkpoint_list_file_is_named():
    """Train keeps a run's checkpoint list in this file (runs.recover reads and moves it)."""
    assert ray_compat.snapshot_filename().endswith(".json")


def test_the_worker_startup_bound_reaches_the_environment(monkeypatch):
    """Train's controller reads the bound from this variable of its environment."""
    name = ray_compat.internal("ray.train.v2._internal.constants", "WORKER_GROUP_START_TIMEOUT_S_ENV_VAR")
    monkeypatch.delenv(name, raising=False)
    ray_compat.set_worker_startup_timeout(12.5)
    assert os.environ[name] == "12.5"


def test_the_startup_timeout_error_is_recognised():
    error = ray_compat.internal("ray.train.v2._internal.exceptions", "WorkerGroupStartupTimeoutError")
    assert ray_compat.is_startup_timeout(error.__new__(error)) and not ray_compat.is_startup_timeout(TimeoutError())


def test_a_trainer_without_the_cleaner_drops_only_it():
    from ray.train.torch import TorchTrainer

    trainer_cls = ray_compat.without_placement_group_cleaner(TorchTrainer)
    assert issubclass(trainer_cls, TorchTrainer) and trainer_cls.__name__ == "TorchTrainerWithoutCleaner"


def test_placement_groups_read_from_the_gcs_name_their_creator(ray_session):
    """The GCS's table gives each group's state, bundles, job and whether its creating actor died."""
    from ray.util.placement_group import placement_group, remove_placement_group

    @ray_session.remote(num_cpus=0)
    class Creator:
        def reserve(self):
            group = placement_group([{"CPU": 1}])
            ray_session.get(group.ready())
            return group.id.hex()

    creator = Creator.remote()
    made = ray_session.get(creator.reserve.remote())
    mine = placement_group([{"CPU": 1}])
    ray_session.get(mine.ready())
    try:
        ray_session.kill(creator)
        time.sleep(1)
        groups = {g.id: g for g in ray_compat.placement_groups()}
        job = ray_session.get_runtime_context().get_job_id()
        assert groups[made].state == "CREATED" and groups[made].created_by_actor and groups[made].creator_dead
        assert groups[made].bundles == ({"CPU": 1.0},) and groups[made].job == job
        assert not groups[mine.id.hex()].created_by_actor and not groups[mine.id.hex()].creator_dead  # a driver's
        ray_compat.remove_placement_group(made)
        assert {g.id: g for g in ray_compat.placement_groups()}[made].state == "REMOVED"
    finally:
        remove_placement_group(mine)


def test_the_package_imports_ray_only_where_ray_runs():
    """Importing the library's Ray-free modules (and this one) does not import Ray."""
    modules = [
        "colors",
        "storage",
        "images",
        "data",
        "synth",
        "drawings",
        "conditioning",
        "model",
        "config",
        "checkpoint",
        "metrics",
        "loop",
        "predict",
        "evaluate",
        "api",
        "client",
        "ray_compat",
    ]
    code = "import sys; " + "; ".join(f"import polycolor.{m}" for m in modules) + "; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_the_per_report_loggers_are_quieted():
    """Train's workers log each report's whole metrics dict and each checkpoint through these loggers at INFO."""
    import logging

    ray_compat.quiet_train_reports()
    assert all(ray_compat.internal(m, "logger").level == logging.WARNING for m in ray_compat.PER_REPORT_LOGGERS)


def test_idle_cpus_here_falls_as_an_actor_holds_one(ray_session):
    """The CPUs idle on this node drop by one while an actor holds one, and come back when it goes (as soon as
    the node reports it)."""

    @ray_session.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    def settles_at(value: float) -> bool:
        deadline = time.monotonic() + 10
        while ray_compat.idle_cpus_here() != value and time.monotonic() < deadline:
            time.sleep(0.2)
        return ray_compat.idle_cpus_here() == value

    before = ray_compat.idle_cpus_here()
    holder = Holder.remote()
    assert ray_session.get(holder.ready.remote()) and settles_at(before - 1)
    ray_session.kill(holder)
    assert settles_at(before)
