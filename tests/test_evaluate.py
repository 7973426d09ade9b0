import json

import torch

from polycolor import evaluate
from polycolor.data import read_split
from polycolor.evaluate import per_image, summarize


def test_truth_against_itself_scores_perfectly(ayna):
    split = read_split(ayna / "validation")
    target = torch.from_numpy(split.targets).permute(0, 3, 1, 2).float() / 255
    rgb = torch.from_numpy(split.rgbs()).float() / 255
    values = per_image(target, target, rgb)
    metrics = summarize({k: float(v.sum()) for k, v in values.items()}, len(split))
    assert metrics["pixel_exact"] == 1 and metrics["iou"] == 1 and metrics["l1"] == 0 and metrics["psnr"] == 100
    white = per_image(torch.ones_like(target), target, rgb)
    assert float(white["iou"].max()) == 0 and 0.06 < float(white["mse"].mean()) < 0.07  # the README's 0.0657 baseline


def test_off_colour_shows_in_colour_error_not_iou():
    target = torch.ones(1, 3, 8, 8)
    target[:, :, 2:6, 2:6] = torch.tensor([1.0, 0, 0])[:, None, None]
    pred = target.clone()
    pred[:, :, 2:6, 2:6] = torch.tensor([0.9, 0.1, 0.0])[:, None, None]
    values = per_image(pred, target, torch.tensor([[1.0, 0, 0]]))
    assert float(values["iou"]) == 1 and abs(float(values["color_error"]) - 0.2 / 3) < 1e-6


def test_evaluate_cli_with_report(tiny_checkpoint, ayna, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(ayna / "validation"), "--report", str(tmp_path / "r")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["pairs"] == 5 and 0 <= metrics["pixel_exact"] <= 1
    assert len(json.loads((tmp_path / "r" / "per_sample.json").read_text())) == 5
    assert (tmp_path / "r" / "worst_and_best.png").stat().st_size > 0
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "nope")]) == 2
