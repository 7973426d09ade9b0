import json
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from polycolor import checkpoint
from polycolor.checkpoint import CheckpointError
from polycolor.data import REAL_PALETTE

from conftest import tiny_model


def test_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model("film")
    path = checkpoint.write(tmp_path / "c", model, REAL_PALETTE, {"pixel_exact": 0.9})
    loaded = checkpoint.load(path)
    x, rgb = torch.rand(2, 1, 128, 128), torch.rand(2, 3)
    assert torch.equal(model.eval()(x, rgb), loaded.model(x, rgb))
    assert loaded.palette["green"] == (0, 255, 0) and loaded.metrics == {"pixel_exact": 0.9}
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


def test_rewrite_is_atomic_and_leaves_no_temporaries(tmp_path):
    """C3: rewriting a checkpoint replaces it whole and leaves no temporaries."""
    path = checkpoint.write(tmp_path / "c", tiny_model(seed=1), REAL_PALETTE)
    checkpoint.write(path, tiny_model(seed=2), REAL_PALETTE)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert torch.equal(checkpoint.load(path).model.out.weight, tiny_model(seed=2).out.weight)


def test_truncated_weights_fail_naming_the_file(tiny_checkpoint):
    """C2: truncated weights fail at load, naming the file."""
    weights = tiny_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 does not match"):
        checkpoint.load(tiny_checkpoint)


def test_tampered_weights_fail(tiny_checkpoint):
    """C4: weights that do not match their recorded hash are refused."""
    weights = tiny_checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or altered"):
        checkpoint.load(tiny_checkpoint)


def test_swapped_config_is_refused(tmp_path, tiny_checkpoint):
    """C4: a config that does not match the weights is refused with the reason."""
    other = checkpoint.write(tmp_path / "other", tiny_model("film"), REAL_PALETTE)
    config = json.loads((other / "config.json").read_text())
    config["weights_sha256"] = json.loads((tiny_checkpoint / "config.json").read_text())["weights_sha256"]
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="different model config or palette"):
        checkpoint.load(tiny_checkpoint)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: (c / "model.safetensors").unlink(), "model.safetensors: missing"),
        (lambda c: (c / "config.json").unlink(), "config.json: missing"),
        (lambda c: (c / "config.json").write_text("{not json"), "config.json: not valid JSON"),
        (
            lambda c: (c / "config.json").write_text(json.dumps({"format_version": 99})),
            "format_version 99 is not supported",
        ),
    ],
)
def test_broken_checkpoints_name_the_file(tiny_checkpoint, edit, message):
    edit(tiny_checkpoint)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(tiny_checkpoint)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        checkpoint.load(tmp_path / "nothing")


def test_a_folder_of_checkpoints_is_refused_unread(tmp_path, monkeypatch):
    """A run's folder passed as --checkpoint is refused, naming one to pass, before any file in it is read or
    copied (a bucket's would be copied whole to every replica)."""
    for name in ("checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-01_00-00-01.000000", "best"):
        checkpoint.write(tmp_path / "run" / name, tiny_model(), REAL_PALETTE)
    monkeypatch.setattr(checkpoint, "load_directory", lambda *a, **k: pytest.fail("a file was read"))
    with pytest.raises(
        CheckpointError,
        match=f"{tmp_path / 'run'}: a folder of 3 checkpoints, not a checkpoint; "
        "pass one of them, e.g. .*run/checkpoint_2026-01-01_00-00-01.000000",
    ):
        checkpoint.load(tmp_path / "run")


class Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_a_malicious_pickle_is_refused_without_running(tiny_checkpoint, tmp_path, monkeypatch):
    """C1: a crafted pickle in train_state.pt is refused without running."""
    monkeypatch.chdir(tmp_path)
    (tiny_checkpoint / "train_state.pt").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="train_state.pt: cannot be loaded safely"):
        checkpoint.load_train_state(tiny_checkpoint)
    assert not (tmp_path / "PWNED").exists()


def test_train_state_round_trip(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"optimizer": optimizer.state_dict(), "epoch": 3}
    path = checkpoint.write(tmp_path / "c", model, REAL_PALETTE, train_state=state)
    assert checkpoint.load_train_state(path)["epoch"] == 3
    exported = checkpoint.export(path, tmp_path / "best")
    assert not (tmp_path / "best" / "train_state.pt").exists() and exported.palette


KILLER = """
import os, shutil, signal, sys
from polycolor import checkpoint
kill_at, calls = int(sys.argv[3]), [0]
def dying(real):
    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call
for owner, name in ((os, "replace"), (os, "fsync"), (shutil, "copyfile"), (checkpoint, "exchange")):
    setattr(owner, name, dying(getattr(owner, name)))
checkpoint.export(sys.argv[1], sys.argv[2])
"""


def test_best_is_old_or_new_wherever_its_writer_is_killed(tmp_path):
    """C3: a writer killed at any step of replacing best/ leaves the previous one usable; the next write cleans up."""
    old = checkpoint.write(tmp_path / "old", tiny_model(seed=1), REAL_PALETTE)
    new = checkpoint.write(tmp_path / "new", tiny_model(seed=2), REAL_PALETTE)
    weights = {name: checkpoint.load(path).model.out.weight for name, path in (("old", old), ("new", new))}
    best, seen = tmp_path / "runs" / "best", []
    for kill_at in range(1, 30):  # each file operation of the write in turn, until the write gets through
        checkpoint.export(old, best)  # the previous best, complete; this also removes what the last kill left
        done = subprocess.run(
            [sys.executable, "-c", KILLER, str(new), str(best), str(kill_at)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        [which] = [name for name, w in weights.items() if torch.equal(checkpoint.load(best).model.out.weight, w)]
        seen.append(which)
        if done.returncode == 0:
            break
        assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.returncode == 0 and seen[-1] == "new" and seen.count("old") >= 5, seen
    assert [p.name for p in best.parent.iterdir()] == ["best"]  # no temporaries once a write completes
