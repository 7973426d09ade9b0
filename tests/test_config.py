"""Settings declared once: flags generated from the dataclasses, presets, the saved config and --resume's check."""

import argparse
import json
import shutil

import pytest

from polycolor import checkpoint
from polycolor.config import FIELDS, PRESETS, SECTIONS, TrainConfig, add_flags, preset
from polycolor.data import REAL_PALETTE
from polycolor.runs import recover, resume_config, saved_config

from conftest import tiny_model


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p, *SECTIONS.values())
    return p


def test_every_setting_has_one_flag_with_help_and_only_given_flags_are_parsed():
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
        (dict(learning_rate=0.1), "unknown setting(s) ['learning_rate']"),
    ],
)
def test_bad_settings_are_refused_by_name(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        TrainConfig().replace(**values)


def test_the_config_round_trips_through_a_dict_and_refuses_a_typo():
    cfg = preset("published").replace(workers=2, name="x")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    broken = cfg.to_dict()
    broken["optim"]["learning_rate"] = broken["optim"].pop("lr")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict(broken)


def test_resume_keeps_the_saved_config_refuses_changed_training_settings_and_allows_new_run_settings(tmp_path):
    trained = preset("smoke").replace(name="r", epochs=5, lr=1e-3)
    checkpoint.write(tmp_path / "r" / "checkpoint_2026-01-01_00-00-00.000000", tiny_model(), REAL_PALETTE, {}, {"epoch": 0}, trained.to_dict())
    assert saved_config(str(tmp_path), "r") == trained
    assert resume_config(str(tmp_path), "r", {}, TrainConfig()) == trained  # no flags: as it was trained
    assert resume_config(str(tmp_path), "r", {"workers": 2, "epochs": 5}, TrainConfig()).run.workers == 2
    with pytest.raises(ValueError, match=r"--epochs 5 \(given 8\), --lr 0.001 \(given 0.003\)"):
        resume_config(str(tmp_path), "r", {"epochs": 8, "lr": 3e-3}, TrainConfig())
    assert saved_config(str(tmp_path), "none") is None


def registered(run, checkpoint_dir: str) -> None:
    """Write Ray Train's checkpoint-manager snapshot naming ``checkpoint_dir`` as the run's latest, as Ray does."""
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": checkpoint_dir}}))


def test_resuming_from_a_checkpoint_without_its_training_state_is_refused_naming_the_file(tmp_path):
    saved = checkpoint.write(tmp_path / "r" / "checkpoint_2026-01-01_00-00-00.000000", tiny_model(), REAL_PALETTE, train=TrainConfig().to_dict())
    registered(tmp_path / "r", saved.name)
    with pytest.raises(ValueError, match=f"--resume: {saved / 'train_state.pt'} is missing, so training cannot continue"):
        resume_config(str(tmp_path), "r", {}, TrainConfig())
    with pytest.raises(checkpoint.CheckpointError, match="train_state.pt: missing, so training cannot continue"):
        checkpoint.load_train_state(saved)  # what a worker meets when Ray hands it such a checkpoint


def test_resume_reads_the_checkpoint_ray_registered_not_a_newer_half_written_one(tmp_path):
    trained = preset("smoke").replace(name="r", epochs=5)
    run = tmp_path / "r"
    checkpoint.write(run / "checkpoint_2026-01-01_00-00-00.000000", tiny_model(), REAL_PALETTE, {}, {"epoch": 0}, trained.to_dict())
    checkpoint.write(run / "checkpoint_2026-01-01_00-00-09.000000", tiny_model(), REAL_PALETTE, train=TrainConfig().to_dict())  # no state
    registered(run, "checkpoint_2026-01-01_00-00-00.000000")  # the newer one was being uploaded when its driver died
    assert resume_config(str(tmp_path), "r", {}, TrainConfig()) == trained


def three_epochs(run) -> list:
    """A run with checkpoints of epochs 0, 1 and 2 (each trained with its own --epochs, to tell them apart),
    the last one registered as Ray registers it."""
    saved = [checkpoint.write(run / f"checkpoint_2026-01-01_00-00-0{e}.000000", tiny_model(), REAL_PALETTE, {"epoch": e}, {"epoch": e},
                              preset("smoke").replace(name="r", epochs=10 + e).to_dict()) for e in range(3)]  # fmt: skip
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "checkpoint_results": [{"checkpoint_dir_name": c.name, "metrics": {"epoch": e}} for e, c in enumerate(saved)],
        "latest_checkpoint_result": {"checkpoint_dir_name": saved[-1].name, "metrics": {"epoch": 2}},
    }))  # fmt: skip
    return saved


def test_a_run_whose_newest_checkpoint_was_deleted_resumes_from_the_newest_remaining_one(tmp_path, capsys):
    """U5: Ray's list still names the deleted checkpoint; the run resumes from the newest one left, as it was saved."""
    saved = three_epochs(tmp_path / "r")
    shutil.rmtree(saved[2])
    assert saved_config(str(tmp_path), "r").optim.epochs == 11  # --resume compares the flags with the one it resumes from
    assert recover(str(tmp_path), "r") == str(saved[1])
    assert "its latest checkpoint is gone" in capsys.readouterr().out
    assert not (tmp_path / "r" / "checkpoint_manager_snapshot.json").exists()  # so Ray starts its list again from there
    assert recover(str(tmp_path), "r") is None and saved_config(str(tmp_path), "r").optim.epochs == 11  # a second resume: the same


def test_a_checkpoint_list_cut_at_any_byte_by_a_kill_resumes_from_the_newest_complete_checkpoint(tmp_path):
    """C3, T4: Ray rewrites its list in place; a kill at any byte of that rewrite leaves the newest complete
    checkpoint to resume from: the newest, or the one before when the kill also cut the newest's weights short."""
    saved = three_epochs(tmp_path / "r")
    snapshot = tmp_path / "r" / "checkpoint_manager_snapshot.json"
    whole = snapshot.read_bytes()
    assert recover(str(tmp_path), "r") is None  # a sound list: Ray's own resume
    weights = saved[2] / "model.safetensors"
    for cut in range(len(whole)):
        if cut == len(whole) // 2:
            weights.write_bytes(weights.read_bytes()[:1000])
        snapshot.write_bytes(whole[:cut])
        assert recover(str(tmp_path), "r") == str(saved[2] if cut < len(whole) // 2 else saved[1]), cut
        assert not snapshot.exists()


def test_a_search_is_not_restored_from_files_other_users_may_write(tmp_path, monkeypatch, capsys):
    from tune import search

    state = tmp_path / "s" / "searcher-state.pkl"
    state.parent.mkdir()
    state.write_bytes(b"anything")
    monkeypatch.setattr(search, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    state.chmod(0o666)
    assert search.main(["--smoke-test", "--storage", str(tmp_path), "--name", "s", "--resume"]) == 2
    assert f"--resume: {state} is writable by other users" in capsys.readouterr().err
