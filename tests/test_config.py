"""Settings declared once: flags generated from the dataclasses, presets, the saved config and --resume's check."""

import argparse
import json

import pytest

from polycolor.config import FIELDS, PRESETS, SECTIONS, TrainConfig, add_flags, preset


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p, *SECTIONS.values())
    return p


def test_every_setting_has_one_flag():
    """Every setting has one flag, with help, and only the flags given are parsed."""
    p = parser()
    flags = {a.dest: a for a in p._actions if a.dest in FIELDS}
    assert set(flags) == set(FIELDS) and all(a.help for a in flags.values())
    assert "(default: 0.003)" in flags["lr"].help  # the recipe's value, from the dataclass
    given = vars(p.parse_args(["--lr", "0.01", "--cpu", "--no-bf16", "--width", "16"]))
    assert given == {"lr": 0.01, "gpu": False, "bf16": False, "width": 16}
    cfg = TrainConfig().replace(**given)
    assert (cfg.optim.lr, cfg.run.gpu, cfg.optim.bf16, cfg.model.width) == (0.01, False, False, 16)


def test_the_published_preset_is_the_published_design():
    cfg = preset("published")
    assert (cfg.model.conditioning, cfg.model.head, cfg.optim.loss) == ("concat", "rgb", "l1")
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.schedule, cfg.optim.epochs) == ("adam", 1e-4, "constant", 50)
    assert preset("recipe") == TrainConfig() and set(PRESETS) == {"recipe", "published", "smoke"}


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(lr=0.0), "lr = 0.0 is out of range; expected > 0"),
        (dict(optimizer="sgd"), "optimizer 'sgd' is unknown"),
        (dict(width=12), "width = 12 is out of range; expected a positive multiple of 8"),
        (dict(train_pairs=1, workers=2), "train_pairs = 1 is out of range; expected >= workers (2)"),
        (dict(half_size=1.0), "half_size = 1.0 is out of range; expected >= 0 and < 1"),
        (dict(learning_rate=0.1), "unknown setting(s) ['learning_rate']"),
    ],
)
def test_bad_settings_are_refused_by_name(values, message):
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        TrainConfig().replace(**values)


def test_the_config_round_trips_and_refuses_a_typo():
    """The config round-trips through a dict and refuses a typo."""
    cfg = preset("published").replace(workers=2, name="x")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    broken = cfg.to_dict()
    broken["optim"]["learning_rate"] = broken["optim"].pop("lr")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict(broken)


def test_half_size_is_a_share_of_the_epochs_and_never_the_last():
    """Shortening a run keeps its first epochs at half size in proportion, and the last epoch is always full size."""
    counts = {epochs: TrainConfig().replace(epochs=epochs, half_size=0.5).half_size_epochs for epochs in (19, 4, 1)}
    assert counts == {19: 10, 4: 2, 1: 0}
    assert TrainConfig().replace(half_size=0.0).half_size_epochs == 0
    older = TrainConfig().to_dict()  # a checkpoint saved before the setting existed resumes as it was trained
    del older["data"]["half_size"]
    assert TrainConfig.from_dict(older).half_size_epochs == 0
