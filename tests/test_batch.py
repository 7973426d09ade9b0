"""polycolor.batch: colouring many outlines on Ray Data (predict --data, evaluate --ray), on the session's Ray."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polycolor import evaluate, predict, synth
from polycolor.predict import Colorizer

from conftest import bomb_png

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """40 synthetic pairs in our layout, some outlines at other sizes (as people's files are)."""
    root = tmp_path_factory.mktemp("batch") / "validation"
    synth.write_split(synth.generate(40, seed=7), root)
    for row in json.loads((root / "data.json").read_text())[::5]:
        path = root / "inputs" / row["input_polygon"]
        Image.open(path).resize((200, 150), Image.Resampling.NEAREST).save(path)
    return root


def png(image: Image.Image) -> bytes:
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    return encoded.getvalue()


def test_writes_what_the_in_process_colorizer_writes(ray_session, tiny_checkpoint, split, tmp_path, capsys):
    """A small run writes, byte for byte, what the in-process Colorizer writes."""
    out = tmp_path / "out"
    argv = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--data",
        str(split),
        "--out",
        str(out),
        "--original-size",
        "--batch-size",
        "8",
    ]
    assert predict.main(argv) == 0
    assert "done 40, failed 0, skipped 0" in capsys.readouterr().out
    colorizer = Colorizer.from_checkpoint(tiny_checkpoint, "cpu")
    rows = json.loads((split / "data.json").read_text())
    for row in rows:
        expected = png(colorizer.colorize(split / "inputs" / row["input_polygon"], row["colour"], original_size=True))
        assert (out / row["output_image"]).read_bytes() == expected, row
    assert (out / "errors.jsonl").read_text() == ""
    assert sorted(p.name for p in out.iterdir()) == sorted([r["output_image"] for r in rows] + ["errors.jsonl"])


def test_broken_rows_are_recorded_and_good_rows_written(ray_session, tiny_checkpoint, split, tmp_path, capsys):
    """Broken rows (a missing image, a corrupt one, an unknown colour, a 65536x256 outline over the side limit:
    S7) are each recorded with their reason, and every good row is written: a bad row never fails the job."""
    broken = shutil.copytree(split, tmp_path / "broken")
    rows = json.loads((broken / "data.json").read_text())
    (broken / "inputs" / rows[3]["input_polygon"]).unlink()
    (broken / "inputs" / rows[11]["input_polygon"]).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows[20]["colour"] = "no such colour"
    (broken / "inputs" / rows[30]["input_polygon"]).write_bytes(bomb_png(65536, 256))
    (broken / "data.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(tiny_checkpoint), "--data", str(broken), "--out", str(out)]) == 1
    assert "done 36, failed 4, skipped 0" in capsys.readouterr().out
    errors = {e["output"]: e["error"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == sorted(rows[i]["output_image"] for i in (3, 11, 20, 30))
    assert errors[rows[3]["output_image"]].endswith("file does not exist")
    assert "is not a readable image" in errors[rows[11]["output_image"]]
    assert "unknown colour 'no such colour'" in errors[rows[20]["output_image"]]
    assert "is 65536x256; the limit is 4096 pixels on the longer side" in errors[rows[30]["output_image"]]
    written = {p.name for p in out.glob("*.png")}
    assert written == {r["output_image"] for i, r in enumerate(rows) if i not in (3, 11, 20, 30)}


@pytest.mark.timeout(120)
def test_a_fifo_among_the_outlines_is_a_failed_row_not_a_hang(ray_session, tiny_checkpoint, split, tmp_path, capsys):
    folder = tmp_path / "outlines"
    folder.mkdir()
    shutil.copy(next((split / "inputs").iterdir()), folder / "good.png")
    os.mkfifo(folder / "pipe.png")
    assert (
        predict.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data",
                str(folder),
                "--color",
                "red",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 1
    )
    assert "done 1, failed 1, skipped 0" in capsys.readouterr().out
    [error] = map(json.loads, (tmp_path / "out" / "errors.jsonl").read_text().splitlines())
    assert error["image"] == "pipe.png" and error["error"] == "pipe.png: not a regular file"


def test_a_killed_run_resumed_writes_every_output_exactly_once(ray_session, tiny_checkpoint, tmp_path):
    data = tmp_path / "outlines"
    data.mkdir()
    for i, outline in enumerate(synth.generate(1500, seed=3).outlines):
        Image.fromarray(np.where(outline, 0, 255).astype(np.uint8)).save(data / f"{i:04d}.png")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "polycolor.predict",
        "--checkpoint",
        str(tiny_checkpoint),
        "--data",
        str(data),
        "--color",
        "teal",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--concurrency",
        "1",
    ]
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    first = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while len(list(out.glob("*.png"))) < 100 and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    settled = None
    while settled != (settled := sorted(out.glob("*.png"))):  # the killed job's workers stop
        time.sleep(2)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in settled}
    assert 100 <= len(before) < 1500, "the run was not interrupted midway"
    (out / ".0000.png.tmp-dead0001").write_bytes(b"half")  # what a writer killed mid-file leaves

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"done {1500 - len(before)}, failed 0, skipped {len(before)}" in resumed.stdout
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert len(after) == 1500 and all(after[name] == stat for name, stat in before.items())  # none written twice
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_a_folder_and_a_list_are_sources_too(ray_session, tiny_checkpoint, split, tmp_path):
    """A folder with one colour and a list of rows are sources too."""
    rows = json.loads((split / "data.json").read_text())[:6]
    colorizer = Colorizer.from_checkpoint(tiny_checkpoint, "cpu")
    folder = tmp_path / "folder" / "nested"
    folder.mkdir(parents=True)
    for row in rows:
        shutil.copy(
            split / "inputs" / row["input_polygon"],
            folder / row["input_polygon"].replace(".png", ".jpg" if row is rows[0] else ".png"),
        )
    assert (
        predict.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data",
                str(tmp_path / "folder"),
                "--color",
                "#ff8800",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.png")) == sorted(
        f"nested/{r['input_polygon']}" for r in rows
    )
    listed = tmp_path / "list.csv"
    listed.write_text(
        "image,colour,output\n"
        + "".join(f"validation/inputs/{r['input_polygon']},{r['colour']},{i}.png\n" for i, r in enumerate(rows))
    )
    shutil.move(listed, split.parent / "list.csv")
    assert (
        predict.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data",
                str(split.parent / "list.csv"),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    for i, row in enumerate(rows):
        assert (tmp_path / "b" / f"{i}.png").read_bytes() == png(
            colorizer.colorize(split / "inputs" / row["input_polygon"], row["colour"])
        )


@pytest.mark.parametrize(
    "data, extra, message",
    [
        ("folder", [], "a folder of outlines needs --color"),
        ("split", ["--color", "red"], "its data.json names each row's colour"),
        ("escape.csv", [], "'../x.png' must be a relative path inside the folder"),
        ("clash.json", [], "rows 0 and 1 both write 'a.png'"),
        ("missing", [], "nothing there"),
    ],
)
def test_a_bad_source_is_refused_before_any_work(tiny_checkpoint, split, tmp_path, capsys, data, extra, message):
    """A source that cannot be read is refused before any work, naming what is wrong."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "escape.csv").write_text("image,colour\n../x.png,red\n")
    (tmp_path / "clash.json").write_text(
        json.dumps([{"image": "a.png", "colour": "red"}, {"image": "a.jpg", "colour": "blue"}])
    )
    source = str(split) if data == "split" else str(tmp_path / data)
    assert (
        predict.main(["--checkpoint", str(tiny_checkpoint), "--data", source, "--out", str(tmp_path / "out"), *extra])
        == 2
    )
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_outputs_are_not_overwritten_without_resume(ray_session, tiny_checkpoint, split, tmp_path, capsys):
    """An output folder already holding outputs is not overwritten without resume."""
    out = tmp_path / "out"
    out.mkdir()
    first = json.loads((split / "data.json").read_text())[0]["output_image"]
    (out / first).write_bytes(b"kept")
    assert predict.main(["--checkpoint", str(tiny_checkpoint), "--data", str(split), "--out", str(out)]) == 2
    assert "already holds 1 of the outputs; pass --resume" in capsys.readouterr().err
    assert (out / first).read_bytes() == b"kept"


def test_evaluate_on_ray_data_gives_the_in_process_metrics(ray_session, tiny_checkpoint, tmp_path, capsys):
    split = tmp_path / "validation"
    synth.write_split(synth.generate(40, seed=8), split)
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(split)]) == 0
    local = json.loads(capsys.readouterr().out)
    assert (
        evaluate.main(
            ["--checkpoint", str(tiny_checkpoint), "--data", str(split), "--ray", "--report", str(tmp_path / "r")]
        )
        == 0
    )
    pipelined = json.loads(capsys.readouterr().out)
    assert pipelined.keys() == local.keys() and pipelined["pairs"] == 40
    assert {k: v for k, v in pipelined.items() if k != "data"} == pytest.approx(
        {k: v for k, v in local.items() if k != "data"}, abs=1e-5
    )
    samples = json.loads((tmp_path / "r" / "per_sample.json").read_text())
    assert [s["input"] for s in samples] == [
        Path(r["input_polygon"]).stem for r in json.loads((split / "data.json").read_text())
    ]
    assert Image.open(tmp_path / "r" / "worst_and_best.png").size[0] == 4 * 128


@pytest.mark.slow
def test_outlines_in_a_bucket_are_coloured_back_into_the_bucket(ray_session, bucket, tiny_checkpoint, split):
    from polycolor import storage

    rows = json.loads((split / "data.json").read_text())
    storage.upload(sorted((split / "inputs").iterdir()), bucket.uri("batch/in"))
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    command = [
        sys.executable,
        "-m",
        "polycolor.predict",
        "--checkpoint",
        str(tiny_checkpoint),
        "--data",
        bucket.uri("batch/in"),
        "--color",
        "navy",
        "--out",
        bucket.uri("batch/out"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done 40, failed 0, skipped 0" in done.stdout
    assert bucket.keys("batch/out") == {r["input_polygon"] for r in rows} | {"errors.jsonl"}
    colorizer = Colorizer.from_checkpoint(tiny_checkpoint, "cpu")
    name = rows[0]["input_polygon"]
    assert storage.read_bytes(bucket.uri(f"batch/out/{name}")) == png(
        colorizer.colorize(split / "inputs" / name, "navy")
    )
    again = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "done 0, failed 0, skipped 40" in again.stdout, again.stderr[-3000:]
