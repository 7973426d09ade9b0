"""What a trial holds on the cluster, and giving it back the moment the trial ends.

Each trial's TorchTrainer starts a controller actor (owned by the trial's actor) that reserves the trial's
workers in a placement group. When a trial ends (stopped by ASHA, and even finished: Tune ends the trial's
actor right after its last result) the controller dies with the trial's actor; but Ray removes a non-detached
placement group only once both the actor that created it and its job have died, and the job here is the
search, still running. Ray Train's own placement-group cleaner (a detached actor per run) frees the group only
after the dashboard's state API confirms the controller's death; on a busy machine that answer comes late or
never, and the next trials wait for CPUs that nobody uses. So the search frees them itself, and its trials run
without Ray's cleaner (``SearchTrainer``): ``ReleaseEndedTrials`` reads the GCS's own table (no dashboard
involved) after every trial that ends, and ``holders()`` names what holds the resources when a trial's
workers cannot be placed. It only ever touches the groups its own job made (U6): on a shared cluster,
another job's groups are that job's business.
"""

from __future__ import annotations

import time

import ray
from ray.train.torch import TorchTrainer
from ray.tune import Callback

from polycolor import ray_compat

SearchTrainer = ray_compat.without_placement_group_cleaner(TorchTrainer)


def this_job() -> str:
    """Return the hex id of the job this process belongs to (the search's)."""
    return ray.get_runtime_context().get_job_id()


def release_orphans() -> list[str]:
    """Remove every live placement group of this job whose creating actor is dead; return their ids.

    Safe at any time: such a group serves nobody (its workers were the creator's actors and died with it).
    """
    job, released = this_job(), []
    for group in ray_compat.placement_groups():
        if (
            group.state != "REMOVED"
            and not group.detached
            and group.created_by_actor
            and group.creator_dead
            and group.job == job
        ):
            ray_compat.remove_placement_group(group.id)
            released.append(group.id)
    return released


def holders(need: dict[str, float]) -> str:
    """Return why ``need`` (one worker's resources) cannot be placed: the cluster is too small for it, or the
    placement groups that hold its CPUs and GPUs, each with who made it."""
    total, free = ray.cluster_resources(), ray.available_resources()
    if short := [f"{need[k]:g} {k}" for k in need if need[k] > total.get(k, 0)]:
        have = ", ".join(f"{total.get(k, 0):g} {k}" for k in need)
        return f"the cluster has only {have} in all, one worker asks for {', '.join(short)}"
    job, held = this_job(), []
    for group in ray_compat.placement_groups():
        if group.state == "CREATED":
            bundle = {k: v for b in group.bundles for k, v in b.items() if k in ("CPU", "GPU")}
            by = (
                "a driver"
                if not group.created_by_actor
                else "a dead actor (leaked)"
                if group.creator_dead
                else "a live actor"
            )
            held.append(f"{bundle} by {by}" + ("" if group.job == job else " of another job"))
    used = ", ".join(f"{total[k] - free.get(k, 0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU") if total.get(k))
    return f"{used} held; placement groups: " + ("; ".join(held) or "none")


class ReleaseEndedTrials(Callback):
    """After a trial ends, for any reason, release what its Train run held, within seconds.

    A stopped trial's controller dies a moment after Tune ends the trial's actor, so the release is repeated
    every ``every_s`` until ``linger_s`` after the last trial ended.
    """

    def __init__(self, every_s: float = 1.0, linger_s: float = 30.0):
        self.every_s, self.linger_s = every_s, linger_s
        self.until = self.next = 0.0

    def trial_ended(self) -> None:
        self.until = time.monotonic() + self.linger_s
        self.next = 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.trial_ended()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.trial_ended()

    def release(self) -> None:
        if groups := release_orphans():
            print(f"[search] released {len(groups)} placement group(s) still held by ended trials", flush=True)

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now < self.until and now >= self.next:
            self.next = now + self.every_s
            self.release()

    def on_experiment_end(self, trials, **info):
        self.release()
