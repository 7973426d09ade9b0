"""The only place polycolor touches Ray's internals: each is something Ray does not export but polycolor needs.

Every entry is pinned by a test in ``tests/test_ray_compat.py``; when a Ray upgrade moves one, that test (and
any use) fails with ``RayInternalMoved`` naming the internal and the Ray version, instead of something odd
happening later. Ray itself is imported only when an entry is used.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass


class RayInternalMoved(RuntimeError):
    """A Ray internal that polycolor relies on is gone or changed in the installed Ray."""


def internal(module: str, name: str):
    """Return ``module.name`` from Ray's internals; RayInternalMoved naming both when it is not there."""
    import ray

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise RayInternalMoved(
            f"ray {ray.__version__} has no {module}.{name}; polycolor.ray_compat needs updating"
        ) from None


def snapshot_filename() -> str:
    """Return the name of the file in which Ray Train keeps a run's list of checkpoints (rewritten in place)."""
    return internal("ray.train.v2._internal.constants", "CHECKPOINT_MANAGER_SNAPSHOT_FILENAME")


def idle_cpus_here() -> float:
    """Return the CPUs that no task or actor holds on the node this runs on (Ray tells it only per cluster)."""
    import ray

    per_node = internal("ray._private.state", "available_resources_per_node")()
    return per_node.get(ray.get_runtime_context().get_node_id(), {}).get("CPU", 0.0)


def set_worker_startup_timeout(seconds: float) -> None:
    """Bound how long Ray Train waits for a run's workers to be placed (it retries without end by default); the
    run's controller, started after this, reads it from the environment."""
    os.environ[internal("ray.train.v2._internal.constants", "WORKER_GROUP_START_TIMEOUT_S_ENV_VAR")] = str(seconds)


def is_startup_timeout(error: BaseException) -> bool:
    """Return whether ``error`` is Ray Train's failure to place a run's workers within that bound."""
    return isinstance(error, internal("ray.train.v2._internal.exceptions", "WorkerGroupStartupTimeoutError"))


PER_REPORT_LOGGERS = ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage")


def quiet_train_reports() -> None:
    """Keep a Ray Train worker from logging each report's whole metrics dict and each checkpoint at INFO, once an
    epoch (through each module's own ``logger``); its warnings and errors still show."""
    for module in PER_REPORT_LOGGERS:
        logger = internal(module, "logger")
        if not isinstance(logger, logging.Logger):
            raise RayInternalMoved(f"{module}.logger is no longer a logger; polycolor.ray_compat needs updating")
        logger.setLevel(logging.WARNING)


def without_placement_group_cleaner(trainer_cls: type) -> type:
    """Return a subclass of ``trainer_cls`` (a TorchTrainer) that does not start Ray's per-run placement-group
    cleaner, a detached actor that frees the run's workers only after the dashboard confirms its controller died."""
    cleaner = internal("ray.train.v2._internal.callbacks.placement_group_callback", "PlacementGroupCleanerCallback")
    if not callable(getattr(trainer_cls, "_create_default_callbacks", None)):
        raise RayInternalMoved(
            f"{trainer_cls.__name__} has no _create_default_callbacks; polycolor.ray_compat needs updating"
        )

    class WithoutCleaner(trainer_cls):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, cleaner)]

    WithoutCleaner.__name__ = WithoutCleaner.__qualname__ = f"{trainer_cls.__name__}WithoutCleaner"
    return WithoutCleaner


@dataclass(frozen=True)
class GroupRecord:
    """A placement group as the GCS records it, with the creator fields Ray's public helpers leave out."""

    id: str  # hex
    state: str  # PENDING, CREATED, REMOVED, RESCHEDULING
    detached: bool
    bundles: tuple[dict[str, float], ...]
    created_by_actor: bool  # else by a driver
    creator_dead: bool  # it was made by an actor, and that actor has died
    job: str  # hex id of the job that created it


def placement_groups() -> list[GroupRecord]:
    """Return every placement group of the connected cluster, read from the GCS's own table (no dashboard)."""
    table = internal("ray.core.generated.gcs_pb2", "PlacementGroupTableData")
    connect = getattr(internal("ray._private.state", "state"), "_connect_and_get_accessor", None)
    if connect is None:
        raise RayInternalMoved(
            "ray._private.state.state has no _connect_and_get_accessor; polycolor.ray_compat needs updating"
        )
    records = []
    for raw in connect().get_placement_group_table():
        group = table.FromString(raw)
        by_actor = any(group.creator_actor_id.rstrip(b"\xff"))  # a driver's groups name no actor
        records.append(
            GroupRecord(
                id=group.placement_group_id.hex(),
                state=table.PlacementGroupState.Name(group.state),
                detached=group.is_detached,
                bundles=tuple(dict(b.unit_resources) for b in group.bundles),
                created_by_actor=by_actor,
                creator_dead=by_actor and group.creator_actor_dead,
                job=group.creator_job_id.hex(),
            )
        )
    return records


def remove_placement_group(group_id: str) -> None:
    """Remove the placement group whose hex id is ``group_id`` (Ray's public call takes a handle it made)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
