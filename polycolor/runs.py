"""What a training run and a search share before any trial starts: their storage and preset flags, the
dataset read once, the checks on where they write and that a run to continue was trained as asked, a Ray."""

from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path

from polycolor import checkpoint, storage
from polycolor.config import PRESETS, TrainConfig
from polycolor.data import Split, check, read_split


def add_run_flags(parser: argparse.ArgumentParser, noun: str) -> None:
    """--preset, --smoke-test, --storage and --resume, for a ``noun`` ("run" or "search")."""
    parser.add_argument("--preset", choices=tuple(PRESETS), help="the settings to start from, which flags then change (default: recipe)")
    parser.add_argument("--smoke-test", dest="preset", action="store_const", const="smoke", help="--preset smoke: a tiny model and data, two epochs")
    parser.add_argument("--storage", help=f"local path or URI (s3://, gs://, file://) for the {noun}'s checkpoints, results and best/ "
                        "(default ./runs; ~/ray_results inside a submitted Ray job)")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help=f"continue the {noun} STORAGE/NAME")


def check_location(location: str, name: str, resume: bool, noun: str) -> None:
    """ValueError unless ``location`` can be written and holds a ``noun`` called ``name`` exactly when resuming."""
    storage.check_writable(location)
    if storage.exists(storage.join(location, name)) != resume:
        raise ValueError(f"--resume: no {noun} {name!r} under {location}" if resume else
                         f"a {noun} {name!r} already exists under {location}; pass --resume to continue it or pick another --name")  # fmt: skip


def check_trusted(location: str, name: str) -> None:
    """ValueError when a local ``name`` under ``location`` holds a file or folder other users may write: Tune's
    restore unpickles what is there (a remote location's access is its owner's policy; it cannot be checked here)."""
    if storage.is_uri(location) and not location.startswith("file://"):
        return
    root = Path(location.removeprefix("file://")) / name
    for folder, _, files in os.walk(root):
        for path in [Path(folder), *(Path(folder) / f for f in files)]:
            info = path.lstat()  # writable by anyone, or by a group other than this user's own (a umask of 002 is fine)
            if info.st_mode & stat.S_IWOTH or (info.st_mode & stat.S_IWGRP and info.st_gid != os.getgid()):
                raise ValueError(f"--resume: {path} is writable by other users, and restoring a search unpickles its files; "
                                 f"make it yours alone (chmod -R go-w {root}) or resume from storage you trust")  # fmt: skip


def read_dataset(data: str) -> tuple[Split, Split] | None:
    """The checked training and validation splits of a dataset directory or URI (None for "synthetic"), read
    once by the driver and handed to every worker through the object store (no shared disk needed);
    ValueError says what is wrong."""
    if data == "synthetic":
        return None
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
    """The TrainConfig the run ``name`` under ``location`` saved with the checkpoint Ray will resume it from
    (the latest its checkpoint manager registered), else with the newest one written; None before any.
    ValueError when the one Ray will resume from has lost its training state."""
    registered = registered_checkpoint(location, name)
    for found in [registered] if registered else [storage.join(location, name, c) for c in reversed(storage.checkpoints(location, name))]:
        try:
            saved = json.loads(storage.read_bytes(storage.join(found, "config.json"))).get("train")
        except (OSError, ValueError):  # unregistered, still being written when its driver died: an earlier one says the same
            continue
        if found == registered and not storage.exists(storage.join(found, "train_state.pt")):
            raise ValueError(f"--resume: {storage.join(found, 'train_state.pt')} is missing, so training cannot continue from "
                             "this checkpoint; restore the file, or start a new run under another --name")  # fmt: skip
        return TrainConfig.from_dict(saved) if saved else None
    return None


def registered_checkpoint(location: str, name: str) -> str | None:
    """The checkpoint Ray Train resumes run ``name`` from: the latest in its checkpoint manager's snapshot
    (None without one, or with one a kill cut off: see ``recover_cut_off``)."""
    snapshot = snapshot_path(location, name)
    if not storage.exists(snapshot):
        return None
    try:
        latest = json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result")
    except ValueError:
        return None
    return storage.join(location, name, latest["checkpoint_dir_name"]) if latest else None


def snapshot_path(location: str, name: str) -> str:
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    return storage.join(location, name, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)


def recover_cut_off(location: str, name: str) -> str | None:
    """Ray Train rewrites its checkpoint list (the snapshot) in place, so a kill mid-write leaves it empty or cut
    off, and Ray then fails to read it at every resume. When run ``name``'s is so, delete it and return the
    newest checkpoint that loads whole, to resume from; None when the snapshot is sound (or absent)."""
    snapshot = snapshot_path(location, name)
    if not storage.exists(snapshot):
        return None
    try:
        json.loads(storage.read_bytes(snapshot))
        return None
    except ValueError:  # empty or cut off
        pass
    fs, path = storage.filesystem(snapshot)
    fs.delete_file(path)
    for found in (storage.join(location, name, c) for c in reversed(storage.checkpoints(location, name))):
        try:
            checkpoint.load(found)
        except ValueError:  # half-written (CheckpointError) or unreadable (StorageError)
            continue
        if storage.exists(storage.join(found, "train_state.pt")):
            print(f"[polycolor] run {name}: its checkpoint list was cut off by a kill; resuming from {found}", flush=True)
            return found
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
