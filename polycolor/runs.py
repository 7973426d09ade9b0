"""What a training run and a search share before any trial starts: the dataset read once, the check that a
run to continue was trained as asked, and a Ray to run on."""

from __future__ import annotations

import json
import os

from polycolor import storage
from polycolor.config import TrainConfig
from polycolor.data import Split, check, read_split


def read_dataset(data: str) -> tuple[Split, Split]:
    """The checked training and validation splits of a dataset directory or URI, read once by the driver and
    handed to every worker through the object store (no shared disk needed); ValueError says what is wrong."""
    try:
        with storage.local_copy(data) as root:
            if not root.is_dir():
                raise ValueError(f"--data {data}: directory does not exist")
            if not (root / "training").is_dir() or not (root / "validation").is_dir():
                raise ValueError(f"--data {data}: expected both training/ and validation/ splits")
            _, problems = check(root)
            if problems:
                raise ValueError(f"--data {data} fails its check:\n  " + "\n  ".join(problems))
            return read_split(root / "training"), read_split(root / "validation")
    except storage.StorageError as err:
        raise ValueError(f"--data {err}") from None


def saved_config(location: str, name: str) -> TrainConfig | None:
    """The TrainConfig the run ``name`` under ``location`` saved with its latest checkpoint; None before its first."""
    for found in reversed(storage.checkpoints(location, name)):
        try:
            saved = json.loads(storage.read_bytes(storage.join(found, "config.json"))).get("train")
        except (OSError, ValueError):  # a checkpoint still being written: an earlier one says the same
            continue
        return TrainConfig.from_dict(saved) if saved else None
    return None


def resume_config(location: str, name: str, given: dict, base: TrainConfig) -> TrainConfig:
    """The config to continue run ``name`` with: as saved, with the ``given`` settings (``run`` ones may change).
    ValueError naming every training setting that differs from the saved one (``base``'s, when none is saved)."""
    saved = saved_config(location, name)
    if saved is None:
        return base.replace(**given)
    wanted = saved.replace(**given)
    if differ := saved.differences(wanted):
        shown = ", ".join(f"--{k.replace('_', '-')} {old!r} (given {new!r})" for k, (old, new) in differ.items())
        raise ValueError(f"--resume: run {name!r} was trained with {shown}; leave those flags out to continue it "
                         "as saved, or start a new run under another --name")  # fmt: skip
    return wanted


def init_ray(num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS's cluster, or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # "local": a new Ray, never the cluster a `ray start` on this machine left in /tmp/ray (maybe dead)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1")
