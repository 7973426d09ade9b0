import json

import pytest

from polycolor import evaluate
from polycolor.data import read_split


def test_evaluate_cli_reports_the_mean_of_its_per_sample_metrics(tiny_checkpoint, dataset, tmp_path, capsys):
    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data",
                str(dataset / "validation"),
                "--report",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    samples = json.loads((tmp_path / "r" / "per_sample.json").read_text())
    assert metrics["pairs"] == len(samples) == len(read_split(dataset / "validation"))
    assert metrics["pixel_exact"] == pytest.approx(sum(s["pixel_exact"] for s in samples) / len(samples), abs=1e-6)
    assert (tmp_path / "r" / "worst_and_best.png").stat().st_size > 0
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "nope")]) == 2
