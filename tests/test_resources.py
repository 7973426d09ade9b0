"""tune.resources: what a trial holds is named when a trial cannot start, and released when it ends, by its own job
only."""

import os
import subprocess
import sys
import time

import pytest
from ray.util.placement_group import placement_group_table

from polycolor.ray_compat import placement_groups
from tune.resources import holders, release_orphans

pytestmark = pytest.mark.timeout(300)


def test_a_dead_creators_group_is_named_and_released(ray_session):
    """A placement group whose creator died is named as leaked and released."""
    from ray.util.placement_group import placement_group

    @ray_session.remote(num_cpus=0)
    class Controller:  # stands in for Train's controller: an actor that reserves its workers' CPUs, then dies
        def reserve(self):
            group = placement_group([{"CPU": 2}])
            ray_session.get(group.ready())
            return group

    owner = Controller.remote()
    group = ray_session.get(owner.reserve.remote())
    live = placement_group([{"CPU": 1}])  # the test's own, whose creator (this driver) lives
    ray_session.get(live.ready())
    try:
        ray_session.kill(owner)
        time.sleep(1)
        assert placement_group_table(group)["state"] == "CREATED"  # Ray keeps it while the job lives
        why = holders({"CPU": 2})
        assert (
            "3 of 4 CPU held" in why
            and "{'CPU': 2.0} by a dead actor (leaked)" in why
            and "{'CPU': 1.0} by a driver" in why
        )
        assert release_orphans() == [group.id.hex()]
        assert placement_group_table(group)["state"] == "REMOVED" and placement_group_table(live)["state"] == "CREATED"
    finally:
        ray_session.util.remove_placement_group(live)


ANOTHER_JOB = """
import sys, time
import ray
from ray.util.placement_group import placement_group

ray.init(address=sys.argv[1])

@ray.remote(num_cpus=0)
class Controller:
    def reserve(self):
        group = placement_group([{"CPU": 1}])
        ray.get(group.ready())
        return group.id.hex()

owner = Controller.remote()
group = ray.get(owner.reserve.remote())
ray.kill(owner)
print(group, flush=True)
time.sleep(300)
"""


def test_the_release_leaves_another_jobs_groups_alone(ray_session):
    """U6: on a shared cluster the search releases only what its own job made: another job's group whose creator
    died (that job's business, perhaps about to be reused) stays, and is named as another job's."""
    address = ray_session.get_runtime_context().gcs_address
    other = subprocess.Popen(
        [sys.executable, "-c", ANOTHER_JOB, address], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        group = other.stdout.readline().strip()
        assert group, "the other job made no group"
        time.sleep(1)
        assert group not in release_orphans()
        assert {g.id: g.state for g in placement_groups()}[group] == "CREATED"
        assert "{'CPU': 1.0} by a dead actor (leaked) of another job" in holders({"CPU": 1})
    finally:
        other.kill()
        other.wait()
