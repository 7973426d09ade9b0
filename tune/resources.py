"""What a trial holds on the cluster, and giving it back the moment the trial ends.

Each trial's TorchTrainer starts a controller actor (owned by the trial's actor) that reserves the trial's
workers in a placement group. When a trial ends (stopped by ASHA, and even finished: Tune ends the trial's
actor right after its last result) the controller dies with the trial's actor; but Ray removes a non-detached placement group only once both the actor that
created it and its job have died, and the job here is the search, still running. Ray Train's own
`PlacementGroupCleaner` (a detached actor per run) frees the group only after the dashboard's state API
confirms the controller's death; on a busy machine that answer comes late or never, the cleaner lingers,
and the next trials wait for CPUs that nobody uses. So the search frees them itself, and its trials run
without Ray's cleaner (``SearchTrainer``): `ReleaseEndedTrials` reads the GCS's own
tables (no dashboard involved) after every trial that ends, and `holders()` names what holds the
resources when a trial's workers cannot be placed.
"""

from __future__ import annotations

import time

import ray
from ray.core.generated import gcs_pb2
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, remove_placement_group

_ACTOR = gcs_pb2.ActorTableData
_GROUP = gcs_pb2.PlacementGroupTableData


def _tables() -> tuple[list, list]:
    """(actors, placement groups) as the GCS stores them; the public helpers drop the creator fields."""
    accessor = ray._private.state.state._connect_and_get_accessor()
    actors = [_ACTOR.FromString(raw) for raw in accessor.get_actor_table(None, None)]
    groups = [_GROUP.FromString(raw) for raw in accessor.get_placement_group_table()]
    return actors, groups


def release_orphans() -> list[str]:
    """Remove every live placement group whose creating actor is dead; return their ids. Safe at any time:
    such a group serves nobody (its workers were the creator's actors and died with it)."""
    actors, groups = _tables()
    dead = {a.actor_id for a in actors if a.state == _ACTOR.DEAD}
    released = []
    for group in groups:
        if group.state != _GROUP.REMOVED and not group.is_detached and group.creator_actor_id in dead:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
            released.append(group.placement_group_id.hex())
    return released


class SearchTrainer(TorchTrainer):
    """A TorchTrainer without Ray's per-run detached cleaner actor: in a search, ``ReleaseEndedTrials`` frees
    a dead controller's workers without asking the dashboard, so the cleaner would only linger and poll."""

    def _create_default_callbacks(self):
        return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]


def holders(need: dict[str, float]) -> str:
    """Why ``need`` (one worker's resources) cannot be placed: the cluster is too small for it, or the
    placement groups that hold its CPUs and GPUs, each with who made it."""
    total, free = ray.cluster_resources(), ray.available_resources()
    if short := [f"{need[k]:g} {k}" for k in need if need[k] > total.get(k, 0)]:
        return f"the cluster has only {', '.join(f'{total.get(k, 0):g} {k}' for k in need)} in all, one worker asks for {', '.join(short)}"
    actors, groups = _tables()
    alive = {a.actor_id for a in actors if a.state != _ACTOR.DEAD}
    held = []
    for group in groups:
        if group.state == _GROUP.CREATED:
            bundle = {k: v for b in group.bundles for k, v in b.unit_resources.items() if k in ("CPU", "GPU")}
            by = "a driver" if not any(group.creator_actor_id.rstrip(b"\xff")) else "a live actor" if group.creator_actor_id in alive else "a dead actor (leaked)"
            held.append(f"{bundle} by {by}")
    used = ", ".join(f"{total[k] - free.get(k, 0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU") if total.get(k))
    return f"{used} held; placement groups: " + ("; ".join(held) or "none")


class ReleaseEndedTrials(Callback):
    """After a trial ends, for any reason, release what its Train run held, within seconds.

    A stopped trial's controller dies a moment after Tune ends the trial's actor, so the release is
    repeated every `every_s` until `linger_s` after the last trial ended."""

    def __init__(self, every_s: float = 1.0, linger_s: float = 30.0):
        self.every_s, self.linger_s = every_s, linger_s
        self._until = self._next = 0.0

    def _trial_ended(self) -> None:
        self._until = time.monotonic() + self.linger_s
        self._next = 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._trial_ended()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._trial_ended()

    def _release(self) -> None:
        if groups := release_orphans():
            print(f"[search] released {len(groups)} placement group(s) still held by ended trials", flush=True)

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now < self._until and now >= self._next:
            self._next = now + self.every_s
            self._release()

    def on_experiment_end(self, trials, **info):
        self._release()
