"""Where runs, searches and checkpoints live: a local path, or any URI pyarrow reads (s3://, gs://, file://).

S3-compatible stores are reached through the standard AWS_ENDPOINT_URL or the URI's own
``?endpoint_override=host:port&scheme=http``. A location is kept as the string the user gave; ``join`` puts
names before its query, and every read and write goes through the filesystem pyarrow makes of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pyarrow
import pyarrow.fs as pafs


class StorageError(ValueError):
    """A storage location that cannot be used; the message names it and says why."""


def default() -> str:
    """``runs`` in the current directory; inside a submitted Ray job, whose current directory is Ray's
    temporary copy of ``--working-dir`` (deleted after the job), ``~/ray_results`` on the head as Ray does."""
    return "~/ray_results" if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else "runs"


def is_uri(location: str) -> bool:
    return "://" in location


def resolve(location: str) -> str:
    """A URI as given; a local path made absolute (Ray Train workers run in other directories)."""
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def join(location: str, *names: str) -> str:
    base, query = location.split("?", 1) if is_uri(location) and "?" in location else (location, "")
    joined = "/".join([base.rstrip("/"), *names])
    return f"{joined}?{query}" if query else joined


def parent(location: str) -> str:
    """The folder holding ``location``, its query kept."""
    base, query = location.split("?", 1) if is_uri(location) and "?" in location else (location, "")
    folder = base.rstrip("/").rsplit("/", 1)[0] if "/" in base else "."
    return f"{folder}?{query}" if query else folder


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); StorageError naming the location when pyarrow cannot make one."""
    if not is_uri(location):  # a local path as it is: a URI would not take a space or a '#' in it
        return pafs.LocalFileSystem(), resolve(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except (pyarrow.ArrowException, OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) for bad URIs
        raise StorageError(f"{location}: not a usable storage location ({err})") from None


def opened(location: str) -> tuple[pafs.FileSystem, str]:
    """``filesystem``, made once per location in a process: a stage reading many files there makes one client."""
    return _opened(resolve(location))


_opened = lru_cache(maxsize=8)(filesystem)


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def check_writable(location: str) -> None:
    """Write and delete a marker under ``location``, so that a wrong bucket, endpoint or credentials fail
    before any trial starts, with one line that names the location and the cause."""
    fs, path = filesystem(location)
    marker = f"{path.rstrip('/')}/.polycolor-check-{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(marker) as out:
            out.write(b"ok")
        fs.delete_file(marker)
    except (OSError, pyarrow.ArrowException) as err:
        cause = " ".join(str(err).split())
        raise StorageError(f"{location}: cannot write there ({cause})") from None


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def upload(files: list[Path], location: str) -> None:
    """Copy local ``files`` into the directory ``location``, in the order given."""
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    for file in files:
        with open(file, "rb") as source, fs.open_output_stream(f"{path}/{file.name}") as out:
            shutil.copyfileobj(source, out)


@contextmanager
def local_copy(location: str):
    """A local directory with the files at ``location``: the location itself when it is local, otherwise a
    temporary copy, deleted on exit."""
    if not is_uri(location) or location.startswith("file://"):
        yield Path(location.removeprefix("file://"))
        return
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise StorageError(f"{location}: nothing there")
    with tempfile.TemporaryDirectory(prefix="polycolor-") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)


def listing(location: str, recursive: bool = False) -> dict[str, pafs.FileType]:
    """{path relative to ``location``: its type} of what lies under it; empty when nothing is there."""
    fs, path = filesystem(location)
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return {e.path[len(path.rstrip("/")) + 1 :]: e.type for e in entries}


def checkpoints(location: str, name: str) -> list[str]:
    """The names of the run's checkpoint_* directories, oldest first (Ray names them by time)."""
    return sorted(n for n, kind in listing(join(location, name)).items() if kind == pafs.FileType.Directory and n.startswith("checkpoint_"))


def prune_orphans(result, location: str, name: str) -> list[str]:
    """Remove checkpoint_* directories that Ray never registered (left by a driver killed mid-upload)."""
    kept = {Path(c.path).name for c, _ in result.best_checkpoints or []}
    fs, root = filesystem(join(location, name))
    orphans = [f"{root}/{base}" for base in checkpoints(location, name) if base not in kept]
    for path in orphans:
        fs.delete_dir(path)
    return orphans
