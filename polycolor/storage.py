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
from urllib.parse import urlsplit, urlunsplit

import pyarrow
import pyarrow.fs as pafs


class StorageError(ValueError):
    """A storage location that cannot be used; the message names it and says why."""


def default() -> str:
    """Return ``runs`` in the current directory; inside a submitted Ray job, whose current directory is Ray's
    temporary copy of ``--working-dir`` (deleted after the job), ``~/ray_results`` on the head as Ray does."""
    return "~/ray_results" if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else "runs"


def is_uri(location: str) -> bool:
    return "://" in location


SECRETS = ("access_key", "secret_key", "session_token")  # pyarrow's S3 URI options that carry credentials


def redact(location: str) -> str:
    """Return ``location`` fit to print: a URI's user and password, and credentials in its query, as ``***``."""
    if not is_uri(location):
        return location
    parts = urlsplit(location)
    netloc = f"***@{parts.netloc.rsplit('@', 1)[1]}" if "@" in parts.netloc else parts.netloc
    query = "&".join(
        f"{k}=***" if k.lower() in SECRETS else f"{k}={v}" if v or "=" in pair else k
        for pair in parts.query.split("&")
        if pair
        for k, _, v in [pair.partition("=")]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def resolve(location: str) -> str:
    """Return a URI as given; a local path made absolute (Ray Train workers run in other directories)."""
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def join(location: str, *names: str) -> str:
    base, query = location.split("?", 1) if is_uri(location) and "?" in location else (location, "")
    joined = "/".join([base.rstrip("/"), *names])
    return f"{joined}?{query}" if query else joined


def parent(location: str) -> str:
    """Return the folder holding ``location``, its query kept."""
    base, query = location.split("?", 1) if is_uri(location) and "?" in location else (location, "")
    folder = base.rstrip("/").rsplit("/", 1)[0] if "/" in base else "."
    return f"{folder}?{query}" if query else folder


def redact_text(text: str, location: str) -> str:
    """Return ``text`` (an error pyarrow raised about ``location``) with the location's secrets replaced."""
    parts = urlsplit(location) if is_uri(location) else None
    secrets = [
        p.partition("=")[2] for p in (parts.query.split("&") if parts else []) if p.partition("=")[0].lower() in SECRETS
    ]
    secrets += [parts.password, parts.username] if parts and parts.password else []
    for secret in filter(None, secrets):
        text = text.replace(secret, "***")
    return text


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it); StorageError naming the location when pyarrow cannot make one."""
    if not is_uri(location):  # a local path as it is: a URI would not take a space or a '#' in it
        return pafs.LocalFileSystem(), resolve(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except (
        pyarrow.ArrowException,
        OSError,
        ValueError,
    ) as err:  # pyarrow raises ArrowInvalid (a ValueError) for bad URIs
        raise StorageError(
            f"{redact(location)}: not a usable storage location ({redact_text(str(err), location)})"
        ) from None


def opened(location: str) -> tuple[pafs.FileSystem, str]:
    """Return ``filesystem``, made once per location in a process: a stage reading many files there makes one client."""
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
        raise StorageError(f"{redact(location)}: cannot write there ({redact_text(cause, location)})") from None


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
def local_copy(location: str, only: tuple[str, ...] = ()):
    """Yield a local directory with the files at ``location``: the location itself when it is local, otherwise a
    temporary copy, deleted on exit. With ``only``, just those files of the folder are copied (those that exist),
    never what else lies there: a checkpoint is a few files, a run folder may hold hundreds of them."""
    if not is_uri(location) or location.startswith("file://"):
        yield Path(location.removeprefix("file://"))
        return
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise StorageError(f"{redact(location)}: nothing there")
    with tempfile.TemporaryDirectory(prefix="polycolor-") as tmp:
        if only:
            for info in fs.get_file_info([f"{path.rstrip('/')}/{name}" for name in only]):
                if info.type == pafs.FileType.File:
                    pafs.copy_files(
                        info.path,
                        f"{tmp}/{info.base_name}",
                        source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem(),
                    )
        else:
            pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)


def listing(location: str, recursive: bool = False) -> dict[str, pafs.FileType]:
    """Return {path relative to ``location``: its type} of what lies under it; empty when nothing is there."""
    fs, path = filesystem(location)
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return {e.path[len(path.rstrip("/")) + 1 :]: e.type for e in entries}


def checkpoints(location: str, name: str) -> list[str]:
    """Return the names of the run's checkpoint_* directories, oldest first (Ray names them by time)."""
    return sorted(
        n
        for n, kind in listing(join(location, name)).items()
        if kind == pafs.FileType.Directory and n.startswith("checkpoint_")
    )
