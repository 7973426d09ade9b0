"""Training settings, each declared once: a frozen dataclass per concern, command-line flags generated from
them, named presets. The whole config is saved in every checkpoint's config.json.

    cfg = preset("published").replace(epochs=10)        # the published design, shorter
    add_flags(parser, *SECTIONS.values())                # --lr, --epochs, ... with help and defaults

Presets: ``recipe`` (the default: concat + mask head, BCE, AdamW one-cycle, its first epochs at half size),
``published`` (the design as first published: concat + rgb head, L1, Adam at a constant 1e-4, batch 16, 50
epochs), ``smoke`` (tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from polycolor import text
from polycolor.conditioning import MODES
from polycolor.model import HEADS, ModelConfig

LOSSES = ("bce", "l1", "mse")


def setting(default: Any, help: str, check=None, expect: str = "", **flag) -> Any:
    """Return a field with its flag's ``help``; ``check(value)`` must hold (``expect`` says what it wants). ``flag``
    may give ``choices``, ``type`` (where the default's is not it) and ``off`` (a flag setting a bool False)."""
    return field(default=default, metadata={"help": help, "check": check, "expect": expect, **flag})


class Settings:
    """Validates every field of a settings dataclass on construction: a named ValueError, never a late crash."""

    def __post_init__(self):
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if "choices" in meta and value not in meta["choices"]:
                raise ValueError(f"{f.name} {value!r} is unknown; expected one of {meta['choices']}")
            if meta["check"] is not None and not meta["check"](value):
                raise ValueError(f"{f.name} = {value!r} is out of range; expected {meta['expect']}")


def positive(value) -> bool:
    return value >= 1


@dataclass(frozen=True)
class ModelSettings(Settings):
    conditioning: str = setting("concat", "how the colour reaches the network", choices=tuple(MODES))
    head: str = setting("mask", "mask paints the colour exactly, rgb predicts it", choices=HEADS)
    width: int = setting(8, "channels of the first level", lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8")
    levels: int = setting(3, "encoder/decoder levels", positive, ">= 1")
    text_encoder: str = setting(
        text.DEFAULT_ENCODER, "--conditioning text: the frozen encoder, a Hugging Face name or path"
    )


@dataclass(frozen=True)
class DataSettings(Settings):
    data: str = setting("synthetic", "'synthetic' (generated on every worker), or a dataset directory or URI")
    train_pairs: int = setting(2000, "training pairs per epoch, all workers together", positive, ">= 1")
    val_pairs: int = setting(256, "synthetic validation pairs", positive, ">= 1")
    scenes: float = setting(
        0.6,
        "share of synthetic pairs that are drawings as people make them (polycolor.drawings: several shapes, "
        "nested, anti-aliased, ink, JPEG, gaps)",
        lambda v: 0 <= v <= 1,
        "between 0 and 1",
    )
    half_size: float = setting(
        0.5,
        "synthetic: the share of the epochs, the first ones (rounded up), trained on pairs at half the side (64 px), "
        "each in about a third of the time",
        lambda v: 0 <= v < 1,
        ">= 0 and < 1",
    )
    seed: int = setting(0, "seed of the data, the initialisation and the search")


@dataclass(frozen=True)
class OptimSettings(Settings):
    epochs: int = setting(19, "epochs", positive, ">= 1")
    batch_size: int = setting(16, "pairs per step on each worker", positive, ">= 1")
    optimizer: str = setting("adamw", "the optimiser", choices=("adamw", "adam"))
    lr: float = setting(
        3e-3, "learning rate (the one-cycle schedule's peak)", lambda v: v > 0 and math.isfinite(v), "> 0"
    )
    schedule: str = setting("onecycle", "learning-rate schedule", choices=("onecycle", "constant"))
    loss: str = setting("bce", "bce on the mask, or l1/mse on the image", choices=LOSSES)
    bf16: bool = setting(True, "bf16 autocast on GPU", off="--no-bf16")


@dataclass(frozen=True)
class RunSettings(Settings):
    name: str = setting("", "run name (default polycolor-TIMESTAMP); with --resume, the run to continue")
    workers: int = setting(1, "Ray Train workers (DDP ranks)", positive, ">= 1")
    gpu: bool | None = setting(None, "one GPU per worker (default: when the cluster has one)", type=bool, off="--cpu")
    threads: int = setting(
        0, "CPUs (torch threads) per worker; 0: the cluster's CPUs / workers (1 on GPU)", lambda v: v >= 0, ">= 0"
    )
    loader_workers: int | None = setting(
        None, "DataLoader processes per worker (default: 4 on GPU, 0 on CPU)", type=int
    )
    compile: bool = setting(False, "torch.compile the model")
    wandb: bool = setting(False, "log to Weights & Biases (offline unless WANDB_API_KEY is set)")
    max_failures: int = setting(0, "restarts from the last checkpoint after a worker failure", lambda v: v >= 0, ">= 0")
    keep: int = setting(2, "checkpoints kept, best by validation pixel_exact", positive, ">= 1")
    epoch_lines: bool = setting(True, "log a line per epoch from the first worker", off="--no-epoch-lines")
    idle_cpus: bool = setting(False, "each epoch, also use the CPUs idle on the worker's node (a search does)")


SECTIONS = {"model": ModelSettings, "data": DataSettings, "optim": OptimSettings, "run": RunSettings}
TRAINING = ("model", "data", "optim")  # how a run trains: fixed for its life; ``run`` says where, and may change
FIELDS = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}  # setting -> its section
assert len(FIELDS) == sum(len(fields(cls)) for cls in SECTIONS.values()), "a setting's name must be unique"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is: Ray hands it to each worker as ``to_dict()``; ``from_dict`` types it back."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self):
        if self.data.train_pairs < self.run.workers:
            raise ValueError(
                f"train_pairs = {self.data.train_pairs} is out of range; expected >= workers ({self.run.workers})"
            )
        self.model_config(vocabulary=("_",), text_encoder=self.model.text_encoder)  # validates the widths
        try:
            MODES[self.model.conditioning].require()
        except ImportError as err:
            raise ValueError(str(err)) from None

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        unknown = set(values) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; expected {list(SECTIONS)}")
        if "data" in values:  # saved before half_size existed: trained at full size throughout
            values = values | {"data": {"half_size": 0.0} | values["data"]}
        try:
            return cls(**{name: SECTIONS[name](**settings) for name, settings in values.items()})
        except TypeError as err:  # an unknown or missing setting
            raise ValueError(f"config does not match polycolor's settings: {err}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def half_size_epochs(self) -> int:
        """The epochs trained at half size on synthetic data: the first ``half_size`` of them, never the last."""
        return min(math.ceil(self.data.half_size * self.optim.epochs), self.optim.epochs - 1)

    def flat(self) -> dict:
        """Return every setting by its (unique) name."""
        return {k: v for section in self.to_dict().values() for k, v in section.items()}

    def replace(self, **values) -> TrainConfig:
        """Return a copy with the named settings changed; ValueError for a name that is no setting."""
        if unknown := set(values) - set(FIELDS):
            raise ValueError(f"unknown setting(s) {sorted(unknown)}")
        changed = {
            s: dataclasses.replace(getattr(self, s), **{k: v for k, v in values.items() if FIELDS[k] == s})
            for s in SECTIONS
        }
        return TrainConfig(**changed)

    def differences(self, other: TrainConfig, sections=TRAINING) -> dict[str, tuple]:
        """Return {setting: (this value, other's)} where the two differ in ``sections``."""
        mine, theirs = self.flat(), other.flat()
        return {k: (mine[k], theirs[k]) for k in mine if FIELDS[k] in sections and mine[k] != theirs[k]}

    def named(self) -> TrainConfig:
        """Return this config with a run name: the given one, or polycolor-TIMESTAMP."""
        return self if self.run.name else self.replace(name=f"polycolor-{datetime.now():%Y%m%d-%H%M%S}")

    def model_config(self, vocabulary=(), **mode_fields) -> ModelConfig:
        """Return the network's config: these settings, the mode's ``vocabulary`` and its fields
        (``Conditioning.model_fields``)."""
        m = self.model
        return ModelConfig(
            conditioning=m.conditioning,
            head=m.head,
            base_width=m.width,
            multipliers=tuple(2**i for i in range(m.levels)),
            vocabulary=tuple(vocabulary),
            **mode_fields,
        )


PRESETS: dict[str, dict] = {
    "recipe": {},
    "published": dict(
        head="rgb",
        loss="l1",
        optimizer="adam",
        lr=1e-4,
        schedule="constant",
        batch_size=16,
        epochs=50,
        scenes=0.0,
        half_size=0.0,
    ),
    "smoke": dict(epochs=2, width=8, levels=2, train_pairs=64, val_pairs=32, batch_size=8, scenes=0.0, half_size=0.0),
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is unknown; expected one of {tuple(PRESETS)}")
    return TrainConfig().replace(**PRESETS[name])


def add_flags(
    parser: argparse.ArgumentParser, *classes: type, only=None, defaults: dict | None = None, flags: dict | None = None
) -> None:
    """Return a flag per field of each dataclass (or of those in ``only``): ``--field-name`` (or ``flags[name]``) with
    the field's help and default (``defaults`` overrides the one shown). A flag not given stays out of the
    parsed namespace, so ``vars(args)`` holds exactly what the user set."""
    for cls in classes:
        for f in fields(cls):
            if only is not None and f.name not in only:
                continue
            meta = f.metadata
            names = [(flags or {}).get(f.name, "--" + f.name.replace("_", "-"))]
            shown = (defaults or {}).get(f.name, f.default)
            common = dict(dest=f.name, default=argparse.SUPPRESS)
            kind = meta.get("type", type(f.default))
            if kind is bool:
                parser.add_argument(*names, action="store_const", const=True, help=f"{meta['help']}", **common)
                if "off" in meta:
                    parser.add_argument(
                        meta["off"], action="store_const", const=False, help=f"the opposite of {names[0]}", **common
                    )
            else:
                metavar = "{" + ",".join(meta["choices"]) + "}" if "choices" in meta else None
                default = f" (default: {shown})" if shown not in ("", None) else ""
                parser.add_argument(*names, type=kind, metavar=metavar, help=meta["help"] + default, **common)
