"""polycolor.runs: what a run or search needs before Ray: its flags, the resume check, recovery that never destroys
history."""

import json
import shutil

import pytest

from polycolor import checkpoint
from polycolor.config import TrainConfig, preset
from polycolor.data import REAL_PALETTE
from polycolor.runs import prune_unregistered, recover, resume_config, saved_config

from conftest import tiny_model


def test_resume_keeps_the_saved_config(tmp_path):
    """Resume keeps the saved config, refuses changed training settings and allows new run settings."""
    trained = preset("smoke").replace(name="r", epochs=5, lr=1e-3)
    checkpoint.write(
        tmp_path / "r" / "checkpoint_2026-01-01_00-00-00.000000",
        tiny_model(),
        REAL_PALETTE,
        {},
        {"epoch": 0},
        trained.to_dict(),
    )
    assert saved_config(str(tmp_path), "r") == trained
    assert resume_config(str(tmp_path), "r", {}, TrainConfig()) == trained  # no flags: as it was trained
    assert resume_config(str(tmp_path), "r", {"workers": 2, "epochs": 5}, TrainConfig()).run.workers == 2
    with pytest.raises(ValueError, match=r"--epochs 5 \(given 8\), --lr 0.001 \(given 0.003\)"):
        resume_config(str(tmp_path), "r", {"epochs": 8, "lr": 3e-3}, TrainConfig())
    assert saved_config(str(tmp_path), "none") is None


def registered(run, checkpoint_dir: str) -> None:
    """Write Ray Train's checkpoint-manager snapshot naming ``checkpoint_dir`` as the run's latest, as Ray does."""
    (run / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": checkpoint_dir}})
    )


def test_resume_without_training_state_is_refused(tmp_path):
    """Resuming from a checkpoint without its training state is refused, naming the file."""
    saved = checkpoint.write(
        tmp_path / "r" / "checkpoint_2026-01-01_00-00-00.000000",
        tiny_model(),
        REAL_PALETTE,
        train=TrainConfig().to_dict(),
    )
    registered(tmp_path / "r", saved.name)
    with pytest.raises(
        ValueError, match=f"--resume: {saved / 'train_state.pt'} is missing, so training cannot continue"
    ):
        resume_config(str(tmp_path), "r", {}, TrainConfig())
    with pytest.raises(checkpoint.CheckpointError, match="train_state.pt: missing, so training cannot continue"):
        checkpoint.load_train_state(saved)  # what a worker meets when Ray hands it such a checkpoint


def test_resume_reads_the_registered_checkpoint(tmp_path):
    """Resume reads the checkpoint Ray registered, not a newer half-written one."""
    trained = preset("smoke").replace(name="r", epochs=5)
    run = tmp_path / "r"
    checkpoint.write(
        run / "checkpoint_2026-01-01_00-00-00.000000", tiny_model(), REAL_PALETTE, {}, {"epoch": 0}, trained.to_dict()
    )
    checkpoint.write(
        run / "checkpoint_2026-01-01_00-00-09.000000", tiny_model(), REAL_PALETTE, train=TrainConfig().to_dict()
    )  # no state
    registered(run, "checkpoint_2026-01-01_00-00-00.000000")  # the newer one was being uploaded when its driver died
    assert resume_config(str(tmp_path), "r", {}, TrainConfig()) == trained


def three_epochs(run) -> list:
    """A run with checkpoints of epochs 0, 1 and 2 (each trained with its own --epochs, to tell them apart),
    the last one registered as Ray registers it."""
    saved = [
        checkpoint.write(
            run / f"checkpoint_2026-01-01_00-00-0{e}.000000",
            tiny_model(),
            REAL_PALETTE,
            {"epoch": e},
            {"epoch": e},
            preset("smoke").replace(name="r", epochs=10 + e).to_dict(),
        )
        for e in range(3)
    ]
    (run / "checkpoint_manager_snapshot.json").write_text(
        json.dumps(
            {
                "checkpoint_results": [
                    {"checkpoint_dir_name": c.name, "metrics": {"epoch": e}} for e, c in enumerate(saved)
                ],
                "latest_checkpoint_result": {"checkpoint_dir_name": saved[-1].name, "metrics": {"epoch": 2}},
            }
        )
    )
    return saved


def test_a_deleted_newest_checkpoint_resumes_from_the_next(tmp_path, capsys):
    """U5: Ray's list still names the deleted checkpoint; the run resumes from the newest one left, as it was saved."""
    saved = three_epochs(tmp_path / "r")
    shutil.rmtree(saved[2])
    assert (
        saved_config(str(tmp_path), "r").optim.epochs == 11
    )  # --resume compares the flags with the one it resumes from
    snapshot = tmp_path / "r" / "checkpoint_manager_snapshot.json"
    listed = snapshot.read_bytes()
    assert recover(str(tmp_path), "r") == str(saved[1])
    assert "its latest checkpoint is gone" in capsys.readouterr().out
    assert not snapshot.exists()  # so Ray starts its list again from there...
    assert [p.read_bytes() for p in snapshot.parent.glob(snapshot.name + ".cut-*")] == [
        listed
    ]  # ...and the old list is kept aside (C5)
    assert (
        recover(str(tmp_path), "r") is None and saved_config(str(tmp_path), "r").optim.epochs == 11
    )  # a second resume: the same


def test_a_list_cut_at_any_byte_resumes_from_the_newest(tmp_path):
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


def test_a_run_whose_checkpoints_fail_is_not_started_over(tmp_path):
    """C5: when checkpoints exist but none loads whole, resuming refuses to start over from epoch 0 (which would
    then prune them all), naming the run; nothing is deleted or moved."""
    saved = three_epochs(tmp_path / "r")
    for directory in saved:
        (directory / "model.safetensors").write_bytes(b"cut")
    snapshot = tmp_path / "r" / "checkpoint_manager_snapshot.json"
    snapshot.write_text(snapshot.read_text()[:40])
    with pytest.raises(
        ValueError,
        match="none of its 3 checkpoint\\(s\\) loads whole with its training state; refusing to start it over",
    ):
        recover(str(tmp_path), "r")
    assert all(d.is_dir() for d in saved) and snapshot.exists() and not list(snapshot.parent.glob("*.cut-*"))


def test_pruning_removes_only_what_no_list_ever_named(tmp_path):
    """C5: after a cut list is moved aside, pruning keeps every checkpoint any list named, old or new, and removes
    only the uploads no list ever named (a killed writer's)."""
    saved = three_epochs(tmp_path / "r")
    snapshot = tmp_path / "r" / "checkpoint_manager_snapshot.json"
    whole = snapshot.read_text()
    snapshot.write_text(
        whole[: whole.index(saved[1].name) + len(saved[1].name) + 1]
    )  # cut by a kill after naming epoch 1
    assert recover(str(tmp_path), "r") == str(saved[2])
    stray = checkpoint.write(tmp_path / "r" / "checkpoint_2026-01-01_00-00-09.000000", tiny_model(), REAL_PALETTE)
    (tmp_path / "r" / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"checkpoint_results": [{"checkpoint_dir_name": saved[2].name}]})
    )
    assert prune_unregistered([], str(tmp_path), "r") == [str(stray)]
    assert all(d.is_dir() for d in saved)


def test_no_restore_from_files_others_may_write(tmp_path, monkeypatch, capsys):
    """A search is not restored from files other users may write (Tune unpickles them)."""
    from tune import search

    state = tmp_path / "s" / "searcher-state.pkl"
    state.parent.mkdir()
    state.write_bytes(b"anything")
    monkeypatch.setattr(search, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    state.chmod(0o666)
    assert search.main(["--smoke-test", "--storage", str(tmp_path), "--name", "s", "--resume"]) == 2
    assert f"--resume: {state} is writable by other users" in capsys.readouterr().err
