"""What a training run and a search share before any trial starts: their storage and preset flags, the
dataset read once, the checks on where they write and that a run to continue was trained as asked, a Ray."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow.fs as pafs

from polycolor import checkpoint, ray_compat, storage
from polycolor.config import PRESETS, TrainConfig
from polycolor.data import SPLITS, Split, check_split, load_split


def add_run_flags(parser: argparse.ArgumentParser, noun: str) -> None:
    """Add --preset, --smoke-test, --storage and --resume for a ``noun`` ("run" or "search")."""
    parser.add_argument(
        "--preset", choices=tuple(PRESETS), help="the settings to start from, which flags then change (default: recipe)"
    )
    parser.add_argument("--smoke-test", action="store_true", help="--preset smoke: a tiny model and data, two epochs")
    parser.add_argument(
        "--storage",
        help=f"local path or URI (s3://, gs://, file://) for the {noun}'s checkpoints, results and best/ "
        "(default ./runs; ~/ray_results inside a submitted Ray job)",
    )
    parser.add_argument("--resume", action="store_true", help=f"continue the {noun} STORAGE/NAME")


def preset_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Return the preset the flags name (recipe by default); a usage error when --smoke-test and another preset
    are both given."""
    if args.smoke_test and args.preset not in (None, "smoke"):
        parser.error(f"--smoke-test is --preset smoke; it cannot be given with --preset {args.preset}")
    return "smoke" if args.smoke_test else args.preset or "recipe"


def check_location(location: str, name: str, resume: bool, noun: str) -> None:
    """Raise ValueError unless ``location`` can be written and holds a ``noun`` called ``name`` exactly when
    resuming."""
    storage.check_writable(location)
    if storage.exists(storage.join(location, name)) != resume:
        raise ValueError(
            f"--resume: no {noun} {name!r} under {storage.redact(location)}"
            if resume
            else f"a {noun} {name!r} already exists under {storage.redact(location)}; "
            "pass --resume to continue it or pick another --name"
        )


def check_trusted(location: str, name: str) -> None:
    """Raise ValueError when a local ``name`` under ``location`` holds a file or folder other users may write: Tune's
    restore unpickles what is there (a remote location's access is its owner's policy; it cannot be checked here)."""
    if storage.is_uri(location) and not location.startswith("file://"):
        return
    root = Path(location.removeprefix("file://")) / name
    for folder, _, files in os.walk(root):
        for path in [Path(folder), *(Path(folder) / f for f in files)]:
            info = path.lstat()  # writable by anyone, or by a group other than this user's own (a umask of 002 is fine)
            if info.st_mode & stat.S_IWOTH or (info.st_mode & stat.S_IWGRP and info.st_gid != os.getgid()):
                raise ValueError(
                    f"--resume: {path} is writable by other users, and restoring a search unpickles its files; "
                    f"make it yours alone (chmod -R go-w {root}) or resume from storage you trust"
                )


def read_dataset(data: str) -> tuple[Split, Split] | None:
    """Return the checked training and validation splits of a dataset directory or URI (None for "synthetic"), read
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
            if problems := [p for split in SPLITS for p in check_split(root / split)]:
                raise ValueError(f"--data {data} fails its check:\n  " + "\n  ".join(problems))
            return load_split(root / "training"), load_split(root / "validation")
    except storage.StorageError as err:
        raise ValueError(f"--data {err}") from None


def saved_config(location: str, name: str) -> TrainConfig | None:
    """Return the TrainConfig the run ``name`` under ``location`` saved with the checkpoint it will resume from (see
    ``resume_point``); None before any. ValueError when that checkpoint has lost its training state."""
    found = resume_point(location, name)[0] or newest_complete(location, name)
    if found is None:
        return None
    if not storage.exists(storage.join(found, "train_state.pt")):
        raise ValueError(
            f"--resume: {storage.join(found, 'train_state.pt')} is missing, so training cannot continue from "
            "this checkpoint; restore the file, or start a new run under another --name"
        )
    saved = json.loads(storage.read_bytes(storage.join(found, "config.json"))).get("train")
    return TrainConfig.from_dict(saved) if saved else None


def resume_point(location: str, name: str) -> tuple[str | None, str | None]:
    """Return (checkpoint, None): the one Ray Train resumes run ``name`` from, the latest its checkpoint list (the
    snapshot) registered, or None before any; or (None, why) when Ray cannot use its list: a kill cut it off
    while Ray rewrote it in place, or the latest checkpoint it names is gone (deleted, or no longer loads)."""
    snapshot = snapshot_path(location, name)
    if not storage.exists(snapshot):
        return None, None
    try:
        latest = json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result")
    except ValueError:
        return None, "its checkpoint list was cut off by a kill"
    if not latest:
        return None, None
    found = storage.join(location, name, latest["checkpoint_dir_name"])
    try:
        checkpoint.load(found)
    except ValueError as err:  # CheckpointError
        return None, f"its latest checkpoint is gone ({err})"
    return found, None


def newest_complete(location: str, name: str) -> str | None:
    """Return the newest of run ``name``'s checkpoints that loads whole, with its training state."""
    for found in (storage.join(location, name, c) for c in reversed(storage.checkpoints(location, name))):
        try:
            with storage.local_copy(
                found, only=(checkpoint.CONFIG, checkpoint.WEIGHTS, checkpoint.TRAIN_STATE)
            ) as local:
                checkpoint.load_directory(local, shown=found)
                checkpoint.load_train_state(local, shown=found)
            return found
        except ValueError:  # half-written or deleted in part (CheckpointError, StorageError)
            continue
    return None


def snapshot_path(location: str, name: str) -> str:
    """Return where Ray Train keeps run ``name``'s list of checkpoints (its "snapshot")."""
    return storage.join(location, name, ray_compat.snapshot_filename())


def recover(location: str, name: str) -> str | None:
    """Return the checkpoint to resume run ``name`` from when Ray Train cannot use its list (see ``resume_point``),
    or None when it can.

    Nothing is deleted (C5): the list is moved aside (``.cut-*`` beside it), and when checkpoints exist but none
    loads whole, the run refuses to start over from epoch 0 rather than train over its history.
    """
    _, why = resume_point(location, name)
    if why is None:
        return None
    found = newest_complete(location, name)
    if found is None and (kept := storage.checkpoints(location, name)):
        raise ValueError(
            f"run {name}: {why}, and none of its {len(kept)} checkpoint(s) loads whole with its training state; "
            "refusing to start it over from epoch 0; "
            f"repair or remove them under {storage.redact(storage.join(location, name))}"
        )
    snapshot = snapshot_path(location, name)
    fs, path = storage.filesystem(snapshot)
    fs.move(path, f"{path}.cut-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    shown = storage.redact(found) if found else "scratch, as it has no checkpoint"
    print(f"[polycolor] run {name}: {why}; its checkpoint list is kept aside; resuming from {shown}", flush=True)
    return found


def named_checkpoints(location: str, name: str) -> set[str]:
    """Return the checkpoint directories that any of run ``name``'s lists (its snapshot, and those moved aside
    by ``recover``) ever named, read even from a list a kill cut off."""
    folder, snapshot = storage.join(location, name), ray_compat.snapshot_filename()
    named: set[str] = set()
    for file in [
        f for f, kind in storage.listing(folder).items() if kind == pafs.FileType.File and f.startswith(snapshot)
    ]:
        text = storage.read_bytes(storage.join(folder, file)).decode("utf-8", "replace")
        named |= set(re.findall(r'"checkpoint_dir_name"\s*:\s*"([^"]+)"', text))
    return named


def prune_unregistered(registered: Iterable[str], location: str, name: str) -> list[str]:
    """Remove run ``name``'s checkpoint directories that are not ``registered`` (paths or names) and that no list
    ever named: uploads a killed driver or worker cut short. Return them. History is never pruned (C5)."""
    kept = {Path(path).name for path in registered} | named_checkpoints(location, name)
    fs, root = storage.filesystem(storage.join(location, name))
    orphans = [f"{root}/{base}" for base in storage.checkpoints(location, name) if base not in kept]
    for path in orphans:
        fs.delete_dir(path)
    return orphans


def resume_config(location: str, name: str, given: dict, base: TrainConfig) -> TrainConfig:
    """Return the config to continue run ``name`` with: as saved, with the ``given`` settings (``run`` ones may change).
    ValueError naming every training setting that differs from the saved one (``base``'s, when none is saved)."""
    saved = saved_config(location, name)
    if saved is None:
        return base.replace(**given)
    wanted = saved.replace(**given)
    if differ := saved.differences(wanted):
        shown = ", ".join(f"--{k.replace('_', '-')} {old!r} (given {new!r})" for k, (old, new) in differ.items())
        raise ValueError(
            f"--resume: run {name!r} was trained with {shown}; leave those flags out to continue it "
            "as saved, or start a new run under another --name"
        )
    return wanted


def init_ray(num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS's cluster, or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # "local": a new Ray, never the cluster a `ray start` on this machine left in /tmp/ray (maybe dead)
        ray.init(
            address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1"
        )
