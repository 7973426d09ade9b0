import json
import shutil

import pytest
import torch
from PIL import Image

from polycolor import data
from polycolor.data import REAL_PALETTE, DatasetError, PolygonDataset, augment_pair, check, read_split


def test_a_dataset_passes_check_and_loads(dataset):
    """A dataset passes check and loads as binary outlines and one colour targets."""
    summary, problems = check(dataset)
    assert problems == []
    train = read_split(dataset / "training")
    assert any(f"training: {len(train)} pairs" in line for line in summary)
    outline, target, colour = PolygonDataset(train)[0]
    assert outline.shape == (1, 128, 128) and target.shape == (3, 128, 128) and colour == train.colors[0]
    assert set(outline.unique().tolist()) == {0.0, 1.0}
    painted = torch.unique((target * 255).round().reshape(3, -1), dim=1).T.tolist()  # white and the row's colour only
    assert sorted(painted) == sorted([[255.0] * 3, [float(v) for v in train.palette[colour]]])


def test_the_real_palette_is_read_from_the_real_targets(ayna):
    train, val = read_split(ayna / "training"), read_split(ayna / "validation")
    assert (len(train), len(val)) == (56, 5)
    assert train.palette == REAL_PALETTE  # its green is (0, 255, 0), not CSS green


def test_check_cli_exit_codes(dataset, tmp_path, capsys):
    assert data.main(["check", str(dataset)]) == 0
    colour = json.loads((dataset / "validation" / "data.json").read_text())[0]["colour"]
    assert colour in capsys.readouterr().out
    assert data.main(["check", str(tmp_path / "nope")]) == 1


def test_a_run_reads_each_dataset_image_twice(dataset, monkeypatch):
    """A training run reads each image of its dataset twice: checking, then loading."""
    from polycolor.runs import read_dataset

    reads: dict[str, int] = {}

    def counted(root, name):
        reads[f"{root}/{name}"] = reads.get(f"{root}/{name}", 0) + 1
        return opened(root, name)

    opened = data.open_image
    monkeypatch.setattr(data, "open_image", counted)
    train, val = read_dataset(str(dataset))
    outputs = [
        f"{dataset / s}/outputs/{r['output_image']}"
        for s in ("training", "validation")
        for r in json.loads((dataset / s / "data.json").read_text())
    ]
    assert {reads[o] for o in outputs} == {2}  # six times each before: checked three times, loaded twice, sized once
    assert (train.targets == read_split(dataset / "training").targets).all() and val.colors == read_split(
        dataset / "validation"
    ).colors


def broken_copy(dataset, tmp_path, edit):
    root = tmp_path / "broken"
    shutil.copytree(dataset / "validation", root / "validation")
    rows = json.loads((root / "validation" / "data.json").read_text())
    edit(root / "validation", rows)
    (root / "validation" / "data.json").write_text(json.dumps(rows))
    _, problems = check(root)
    return problems


def _drop_key(d, rows):
    del rows[1]["colour"]


def _extra_key(d, rows):
    rows[0]["shape"] = "x"


def _missing_file(d, rows):
    (d / "outputs" / rows[2]["output_image"]).unlink()


def _not_image(d, rows):
    (d / "inputs" / rows[0]["input_polygon"]).write_bytes(b"not a png at all")


def _colour_disagrees(d, rows):
    rows[0]["colour"] = rows[1]["colour"]  # row 0's file now claims another row's colour name


def _duplicate(d, rows):
    rows.insert(5, dict(rows[3]))


def _size(d, rows):
    path = d / "outputs" / rows[4]["output_image"]
    Image.open(path).resize((64, 64)).save(path)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (_drop_key, "validation row 1: missing key(s) ['colour']"),
        (_extra_key, "validation row 0: unexpected key(s) ['shape']"),
        (_missing_file, "validation row 2: outputs/"),
        (_not_image, " is not a readable image"),
        (_colour_disagrees, "expected one RGB per colour name"),
        (_duplicate, "validation row 5: duplicates row 3"),
        (_size, "is 64x64, expected the size of inputs/"),
    ],
)
def test_each_broken_copy_gives_its_named_error(dataset, tmp_path, edit, expected):
    problems = broken_copy(dataset, tmp_path, edit)
    assert any(expected in p for p in problems), problems
    with pytest.raises(DatasetError, match="failed its check"):
        read_split(tmp_path / "broken" / "validation")


def test_bad_json_is_named(tmp_path):
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "data.json").write_text("[{")
    _, problems = check(tmp_path)
    assert problems and "data.json: not valid JSON" in problems[0]


def test_augmentation_keeps_pairs_aligned_and_fills_white(dataset):
    split = read_split(dataset / "training")
    torch.manual_seed(0)
    for i in range(0, len(split), 3):
        outline = torch.from_numpy(split.outlines[i]).float()[None]
        target = torch.from_numpy(split.targets[i]).permute(2, 0, 1).float() / 255
        colour = torch.tensor(split.palette[split.colors[i]]) / 255
        for _ in range(4):
            o, t = augment_pair(outline, target, affine=True)
            painted = (t < 1).any(0)
            # the target is still exactly white or the one colour: nothing black, nothing blended
            assert ((t == 1).all(0) | (t == colour[:, None, None]).all(0)).all()
            # every outline pixel is painted: outline and target moved together
            assert painted[o[0] > 0].all()
            assert not (o[0] > 0)[~painted].any()


def split_copy(synth_dir, tmp_path, edit):
    split = tmp_path / "data" / "validation"
    shutil.copytree(synth_dir / "validation", split)
    rows = json.loads((split / "data.json").read_text())
    edit(split, rows)
    (split / "data.json").write_text(json.dumps(rows))
    return split


def test_rows_naming_paths_are_refused_by_check_and_by_predict(synth_dir, tmp_path, tiny_checkpoint):
    import subprocess
    import sys

    def escape(split, rows):
        rows[0]["output_image"] = "../../escaped.png"
        rows[1]["input_polygon"] = "/etc/passwd"

    split = split_copy(synth_dir, tmp_path, escape)
    _, problems = check(split.parent)
    assert (
        len(problems) == 1
        and "row 0 output_image '../../escaped.png'" in problems[0]
        and "row 1 input_polygon '/etc/passwd'" in problems[0]
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "polycolor.predict",
            "--checkpoint",
            str(tiny_checkpoint),
            "--data",
            str(split),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "file names must be plain names inside the split" in done.stderr
    assert not (split.parent.parent / "escaped.png").exists() and not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_a_fifo_in_place_of_an_image_is_named_not_waited_on(synth_dir, tmp_path):
    import os

    def fifo(split, rows):
        target = split / "inputs" / rows[0]["input_polygon"]
        target.unlink()
        os.mkfifo(target)

    split = split_copy(synth_dir, tmp_path, fifo)
    _, problems = check(split.parent)
    assert problems == [
        f"validation row 0: inputs/{json.loads((split / 'data.json').read_text())[0]['input_polygon']}: not a "
        "regular file; expected a PNG or JPEG"
    ]
