"""The one checkpoint format, used by train, tune, predict and serve.

A directory::

    model.safetensors   the weights (never a pickle); its metadata holds the hash of config.json's model + palette
    config.json         format version, package version, ModelConfig, palette (name -> RGB), image size,
                        sha256 of model.safetensors, training metrics and the TrainConfig when known
    train_state.pt      optional, training only: optimiser, LR schedule, RNG state, epoch (tensors and
                        plain containers, loaded with torch.load(weights_only=True))

Written atomically: into a temporary sibling directory, fsynced, then swapped into place in one step. In object
storage (a URI, see ``storage``), where nothing renames, config.json is written last: until it is, the weights
do not match the config's hash and the checkpoint refuses to load, so a half-written one is never used.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow.fs as pafs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from polycolor import storage
from polycolor.colors import RGB
from polycolor.model import ConditionalUNet, ModelConfig

FORMAT_VERSION = 1
WEIGHTS, CONFIG, TRAIN_STATE = "model.safetensors", "config.json", "train_state.pt"
# The default recipe, trained on synthetic data only (`bench/train_quality.py --presets recipe --ship`), shipped
# with the package so a server or a prediction works before any training: ``--checkpoint`` takes it like any other.
PRETRAINED = Path(__file__).with_name("pretrained")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the reason."""


@dataclass
class Loaded:
    model: ConditionalUNet
    palette: dict[str, RGB]
    metrics: dict = field(default_factory=dict)
    path: str | None = None  # where it was loaded from: a directory or a URI


def package_version() -> str:
    try:
        return version("polycolor")
    except PackageNotFoundError:
        return "unknown"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_sha256(model_config: dict, palette: dict) -> str:
    return hashlib.sha256(json.dumps({"model": model_config, "palette": palette}, sort_keys=True).encode()).hexdigest()


def unwrap(model: torch.nn.Module) -> ConditionalUNet:
    """Return the ConditionalUNet inside DDP / torch.compile wrappers."""
    while not isinstance(model, ConditionalUNet):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary sibling of ``path`` to fill; on success it takes ``path``'s place so that a reader finds
    the old complete directory or the new one, never neither nor a mix, wherever the writer dies: the files and
    folders are fsynced first, and an existing ``path`` is swapped out in one atomic exchange. Temporaries that
    a killed writer left beside ``path`` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for file in [*tmp.iterdir(), tmp]:
            fsync(file)
        if path.exists():
            exchange(tmp, path)  # tmp now holds the old one, removed below
        else:
            os.replace(tmp, path)
        fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def exchange(a: Path, b: Path) -> None:
    """Swap two directories in one step (Linux's renameat2 with RENAME_EXCHANGE). Where that is missing, two
    renames: a writer killed between them leaves no ``b`` (the old one waits at ``a``'s name, cleaned up later)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and renameat2(-100, bytes(a), -100, bytes(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return
    old = b.parent / f".{b.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(b, old)
    os.replace(a, b)
    os.replace(old, a)


def write(
    path: str | Path,
    model: torch.nn.Module,
    palette: dict[str, RGB],
    metrics: dict | None = None,
    train_state: dict | None = None,
    train: dict | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically, replacing any previous one there."""
    with atomic_directory(path) as tmp:
        write_into(tmp, model, palette, metrics, train_state, train)
    return Path(path)


def export(source: str | Path, path: str | Path) -> Loaded:
    """Verify the checkpoint in the local directory ``source`` and copy its weights and config (no training
    state) to ``path``, a directory or a URI."""
    loaded = load(source)
    if storage.is_uri(str(path)):
        storage.upload([Path(source) / WEIGHTS, Path(source) / CONFIG], str(path))  # config last: see above
        return loaded
    with atomic_directory(path) as tmp:
        for name in (WEIGHTS, CONFIG):
            shutil.copyfile(Path(source) / name, tmp / name)
    return loaded


def write_into(
    directory: Path,
    model: torch.nn.Module,
    palette: dict[str, RGB],
    metrics: dict | None = None,
    train_state: dict | None = None,
    train: dict | None = None,
) -> None:
    """Write the checkpoint files into an existing (e.g. temporary) directory; ``train``: how it was trained."""
    directory, model = Path(directory), unwrap(model)
    model_config = model.cfg.to_dict()
    palette = {name: list(map(int, rgb)) for name, rgb in palette.items()}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, directory / WEIGHTS, metadata={"config_sha256": config_sha256(model_config, palette)})
    config = {
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "model": model_config,
        "palette": palette,
        "image_size": model.cfg.image_size,
        "weights_sha256": file_sha256(directory / WEIGHTS),
        "metrics": metrics or {},
        "train": train or {},
    }
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    if train_state is not None:
        torch.save(train_state, directory / TRAIN_STATE)


def read_config(path: str | Path, shown: str | None = None) -> dict:
    file, named = Path(path) / CONFIG, storage.join(shown or str(path), CONFIG)
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{named}: missing; a checkpoint directory holds {CONFIG} and {WEIGHTS}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{named}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{named}: expected a JSON object")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{named}: format_version {config.get('format_version')!r} is not supported; expected {FORMAT_VERSION}"
        )
    missing = {"model", "palette", "weights_sha256"} - set(config)
    if missing:
        raise CheckpointError(f"{named}: missing field(s) {sorted(missing)}")
    return config


def load(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Load and verify a checkpoint directory or URI; CheckpointError names the file and what is wrong."""
    location = str(path)
    try:
        refuse_a_folder_of_checkpoints(location)
        with storage.local_copy(location, only=(CONFIG, WEIGHTS)) as local:
            loaded = load_directory(local, device, shown=storage.redact(location))
    except storage.StorageError as err:
        raise CheckpointError(str(err)) from None
    loaded.path = location
    return loaded


def refuse_a_folder_of_checkpoints(location: str) -> None:
    """Raise CheckpointError when ``location`` is a run's or a search's folder holding checkpoints, not one
    checkpoint."""
    if storage.exists(storage.join(location, CONFIG)):
        return
    inner = sorted(
        n
        for n, kind in storage.listing(location).items()
        if kind == pafs.FileType.Directory and (n == "best" or n.startswith("checkpoint_"))
    )
    if inner:
        shown = storage.redact(location)
        raise CheckpointError(
            f"{shown}: a folder of {len(inner)} checkpoints, not a checkpoint; "
            f"pass one of them, e.g. {storage.join(shown, inner[-1])}"
        )


def load_directory(path: Path, device: str | torch.device = "cpu", shown: str | None = None) -> Loaded:
    """Load a local directory as ``load`` does; messages name ``shown`` (the location the user gave) in its place."""
    if not path.is_dir():
        raise CheckpointError(f"{shown or path}: not a checkpoint directory (expected {CONFIG} and {WEIGHTS} inside)")
    shown = shown or str(path)
    config = read_config(path, shown)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{storage.join(shown, WEIGHTS)}: missing")
    if file_sha256(weights) != config["weights_sha256"]:
        raise CheckpointError(
            f"{storage.join(shown, WEIGHTS)}: sha256 does not match {CONFIG}'s weights_sha256; "
            "the file is truncated or altered (or still being written)"
        )
    try:
        cfg = ModelConfig(**config["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{storage.join(shown, CONFIG)}: invalid model config ({err})") from None
    try:
        with safe_open(weights, "pt") as f:
            recorded = (f.metadata() or {}).get("config_sha256")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{storage.join(shown, WEIGHTS)}: not a readable safetensors file ({err})") from None
    if recorded != config_sha256(config["model"], config["palette"]):
        raise CheckpointError(
            f"{storage.join(shown, WEIGHTS)}: was saved with a different model config or palette "
            f"than {storage.join(shown, CONFIG)} records"
        )
    model = ConditionalUNet(cfg)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(
            f"{storage.join(shown, WEIGHTS)}: weights do not fit the model config ({str(err).splitlines()[0]})"
        ) from None
    palette = {name: tuple(rgb) for name, rgb in config["palette"].items()}
    return Loaded(model.to(device).eval(), palette, config.get("metrics", {}), shown)


def load_train_state(path: str | Path, shown: str | None = None) -> dict:
    """Return the optimiser / schedule / epoch state saved beside the weights; CheckpointError naming the file
    (``shown`` in place of ``path``) when it is missing or unsafe."""
    file = Path(path) / TRAIN_STATE
    if not file.is_file():
        raise CheckpointError(
            f"{storage.join(shown or str(path), TRAIN_STATE)}: missing, so training cannot continue from this "
            "checkpoint; restore the file, or start a new run (another --name) from scratch"
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or non-tensor pickles
        raise CheckpointError(f"{file}: cannot be loaded safely ({type(err).__name__}: {err})") from None
