"""polycolor.storage: runs, searches and checkpoints in object storage, on a real S3 server on loopback."""

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest
from PIL import Image

from polycolor import checkpoint, storage, synth
from polycolor.checkpoint import CheckpointError
from polycolor.data import REAL_PALETTE, open_image
from polycolor.predict import Colorizer

from conftest import free_port, png_bytes, tiny_model

STAR = Image.fromarray(
    np.where(synth.draw_outline(synth.shape_points("star", np.random.default_rng(0)) * 40 + 64, 2, 128), 0, 255).astype(
        np.uint8
    )
)


def test_join_puts_names_before_the_uris_query():
    assert (
        storage.join("s3://b/p?endpoint_override=h:1&scheme=http", "run", "best")
        == "s3://b/p/run/best?endpoint_override=h:1&scheme=http"
    )
    assert storage.join("/tmp/x/", "best") == "/tmp/x/best"


def test_a_folder_with_odd_characters_is_a_folder(tmp_path):
    """A local folder named with a space, a '#' or a '?' is read as a folder, not a URI."""
    folder = tmp_path / "my outlines #2?v=1"  # a URI parser would choke on the space and cut at the '#' and '?'
    folder.mkdir()
    STAR.save(folder / "star.png")
    assert storage.listing(str(folder)) == {"star.png": pyarrow.fs.FileType.File}
    assert storage.join(str(folder), "star.png") == str(folder / "star.png")
    assert open_image(folder, "star.png").size == (128, 128)


def test_a_checkpoint_in_a_bucket_colours_as_the_local(bucket, tiny_checkpoint, tmp_path):
    """A checkpoint exported to a bucket loads and colours exactly as the local one."""
    uri = bucket.uri("export/best")
    checkpoint.export(tiny_checkpoint, uri)
    assert bucket.keys("export/best") == {"model.safetensors", "config.json"}
    copies = set(Path(tempfile.gettempdir()).glob("polycolor-*"))
    local, remote = Colorizer.from_checkpoint(tiny_checkpoint, "cpu"), Colorizer.from_checkpoint(uri, "cpu")
    assert set(Path(tempfile.gettempdir()).glob("polycolor-*")) == copies  # the local copy is gone once loaded
    assert np.array_equal(np.asarray(local.colorize(STAR, "teal")), np.asarray(remote.colorize(STAR, "teal")))
    STAR.save(tmp_path / "star.png")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "polycolor.predict",
            "--checkpoint",
            uri,
            "--image",
            str(tmp_path / "star.png"),
            "--color",
            "teal",
            "--out",
            str(tmp_path / "teal.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "teal.png")), np.asarray(local.colorize(STAR, "teal")))


def test_a_half_written_checkpoint_in_a_bucket_is_never_loaded(bucket, tiny_checkpoint, tmp_path):
    uri = bucket.uri("half/best")
    checkpoint.export(tiny_checkpoint, uri)
    newer = checkpoint.write(tmp_path / "newer", tiny_model(seed=1), REAL_PALETTE)
    storage.upload([newer / checkpoint.WEIGHTS], uri)  # the writer died before config.json, which goes last
    with pytest.raises(CheckpointError, match=r"half/best/model\.safetensors\?\S+: sha256 does not match"):
        checkpoint.load(uri)


def test_unwritable_storage_is_refused_before_ray(bucket, tmp_path, monkeypatch, capsys):
    """Storage that cannot be written is refused before Ray starts."""
    from polycolor import train
    from tune import search

    bad = f"s3://no-such-bucket/x?endpoint_override=127.0.0.1:{bucket.port}&scheme=http"
    monkeypatch.chdir(tmp_path)
    for module in (train, search):
        monkeypatch.setattr(module, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
        assert module.main(["--smoke-test", "--storage", bad]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {bad}: cannot write there") and "Bucket 'no-such-bucket' not found" in line
    assert list(tmp_path.iterdir()) == []  # nothing written locally


def test_credentials_in_a_location_are_never_printed(bucket, tmp_path, monkeypatch, capsys):
    """C6: a location's user and password, and credentials in its query, are redacted wherever they are printed:
    in errors of training, search, prediction and Serve's start-up."""
    from polycolor import predict, serve, train
    from polycolor.storage import redact
    from tune import search

    assert redact("s3://AKIA:S3CR3T@bucket/x?region=eu") == "s3://***@bucket/x?region=eu"
    assert (
        redact("s3://b/x?access_key=AKIA&secret_key=S3CR3T&session_token=T0K&scheme=http")
        == "s3://b/x?access_key=***&secret_key=***&session_token=***&scheme=http"
    )
    secret = (
        f"s3://AKIA:S3CR3T@no-such-bucket/x?secret_key=S3CR3T&endpoint_override=127.0.0.1:{bucket.port}&scheme=http"
    )
    monkeypatch.chdir(tmp_path)
    for module in (train, search, serve):
        monkeypatch.setattr(module, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    runs = [
        (train, ["--smoke-test", "--storage", secret]),
        (search, ["--smoke-test", "--storage", secret]),
        (predict, ["--checkpoint", secret, "--image", "x.png", "--color", "red", "--out", "y.png"]),
        (serve, ["--checkpoint", secret]),
    ]
    for module, argv in runs:
        assert module.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "S3CR3T" not in err and "AKIA" not in err and "***" in err, (
            module.__name__,
            err,
        )


def run(ray_session, cwd: Path, *command: str, timeout: int = 500) -> subprocess.CompletedProcess:
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", *command], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_everything_through_a_bucket(ray_session, bucket, tmp_path):
    """Training, searching, resuming, predicting and serving, all through a bucket."""
    root = bucket.uri("e2e")
    work = tmp_path / "work"  # every command runs here: nothing may land under a local runs/
    work.mkdir()

    # A two-worker training run: checkpoints and best/ in the bucket.
    trained = run(
        ray_session, work, "polycolor.train", "--smoke-test", "--workers", "2", "--storage", root, "--name", "two"
    )
    assert {"two/best/model.safetensors", "two/best/config.json"} <= bucket.keys("e2e")
    assert storage.join(root, "two", "best") in trained.stdout

    # A search, interrupted by SIGKILL once a trial has reported, then resumed from the bucket.
    command = [sys.executable, "-m", "tune.search", "--smoke-test", "--storage", root, "--name", "s"]
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(k.endswith("result.json") for k in bucket.keys("e2e/s")):
        time.sleep(1)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    assert any(k.endswith("result.json") for k in bucket.keys("e2e/s")), "no trial reported before the kill"
    resumed = run(ray_session, work, "tune.search", "--smoke-test", "--storage", root, "--name", "s", "--resume")
    keys = bucket.keys("e2e/s")
    assert {"results.json", "results.csv", "curves.png", "best/model.safetensors", "best/config.json"} <= keys
    results = json.loads(storage.read_bytes(storage.join(root, "s", "results.json")))
    assert len(results["trials"]) == 3 and results["best"]["best_pixel_exact"] > 0
    assert f"checkpoint exported to {storage.join(root, 's', 'best')}" in resumed.stdout

    # predict and Serve, both from the bucket's best/.
    best = storage.join(root, "s", "best")
    STAR.save(work / "star.png")
    run(
        ray_session,
        work,
        "polycolor.predict",
        "--checkpoint",
        best,
        "--image",
        "star.png",
        "--color",
        "red",
        "--out",
        "red.png",
    )
    expected = np.asarray(Colorizer.from_checkpoint(best, "cpu").colorize(STAR, "red"))
    assert np.array_equal(np.asarray(Image.open(work / "red.png")), expected)

    import httpx
    from ray import serve

    from polycolor.serve import ServeConfig, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(asdict(ServeConfig(checkpoint=best))), name="bucket", route_prefix="/bucket")
        answer = httpx.post(
            f"http://127.0.0.1:{port}/bucket/colorize",
            files={"image": png_bytes(STAR)},
            data={"color": "red"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB")), expected)
    finally:
        serve.shutdown()
    assert sorted(p.name for p in work.iterdir()) == ["red.png", "star.png"]  # no runs/, nothing else local
