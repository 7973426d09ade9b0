import json

import pytest
import torch

from polycolor import evaluate
from polycolor.data import read_split
from polycolor.metrics import per_image, summarize


def test_truth_against_itself_scores_perfectly_and_white_scores_nothing(dataset):
    split = read_split(dataset / "validation")
    target = torch.from_numpy(split.targets).permute(0, 3, 1, 2).float() / 255
    values = per_image(target, target)
    metrics = summarize({k: float(v.sum()) for k, v in values.items()}, len(split))
    assert metrics["pixel_exact"] == 1 and metrics["iou"] == 1 and metrics["l1"] == 0 and metrics["psnr"] == 100
    assert [metrics[f"inside_{c}"] for c in "rgb"] == pytest.approx([metrics[f"true_{c}"] for c in "rgb"])
    white = per_image(torch.ones_like(target), target)
    assert float(white["iou"].max()) == 0 and float(white["pixel_exact"].max()) < 1


def test_an_all_white_answer_on_the_real_validation_split_is_the_readme_baseline(ayna):
    target = torch.from_numpy(read_split(ayna / "validation").targets).permute(0, 3, 1, 2).float() / 255
    assert 0.06 < float(per_image(torch.ones_like(target), target)["mse"].mean()) < 0.07  # the README's 0.0657


def test_off_colour_shows_in_colour_error_not_iou():
    target = torch.ones(1, 3, 8, 8)
    target[:, :, 2:6, 2:6] = torch.tensor([1.0, 0, 0])[:, None, None]
    pred = target.clone()
    pred[:, :, 2:6, 2:6] = torch.tensor([0.9, 0.1, 0.0])[:, None, None]
    values = per_image(pred, target)
    assert float(values["iou"]) == 1 and abs(float(values["color_error"]) - 0.2 / 3) < 1e-6
    assert [float(values[f"inside_{c}"]) for c in "rgb"] == pytest.approx([0.9 * 255, 0.1 * 255, 0])


def test_evaluate_cli_reports_the_mean_of_its_per_sample_metrics(tiny_checkpoint, dataset, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(dataset / "validation"), "--report", str(tmp_path / "r")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    samples = json.loads((tmp_path / "r" / "per_sample.json").read_text())
    assert metrics["pairs"] == len(samples) == len(read_split(dataset / "validation"))
    assert metrics["pixel_exact"] == pytest.approx(sum(s["pixel_exact"] for s in samples) / len(samples), abs=1e-6)
    assert (tmp_path / "r" / "worst_and_best.png").stat().st_size > 0
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "nope")]) == 2
