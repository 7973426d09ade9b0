"""polycolor.metrics: what the scores mean, and how checkpoints rank."""

import pytest
import torch

from polycolor.data import read_split
from polycolor.metrics import best, per_image, rank, summarize


def test_truth_scores_perfectly_and_white_nothing(dataset):
    """The truth against itself scores perfectly, and an all-white answer scores nothing."""
    split = read_split(dataset / "validation")
    target = torch.from_numpy(split.targets).permute(0, 3, 1, 2).float() / 255
    values = per_image(target, target)
    metrics = summarize({k: float(v.sum()) for k, v in values.items()}, len(split))
    assert metrics["pixel_exact"] == 1 and metrics["iou"] == 1 and metrics["l1"] == 0 and metrics["psnr"] == 100
    assert [metrics[f"inside_{c}"] for c in "rgb"] == pytest.approx([metrics[f"true_{c}"] for c in "rgb"])
    white = per_image(torch.ones_like(target), target)
    assert float(white["iou"].max()) == 0 and float(white["pixel_exact"].max()) < 1


def test_all_white_on_real_validation_is_the_baseline(ayna):
    """An all-white answer on the real validation split scores the README's baseline."""
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


def test_checkpoints_rank_by_exactness_then_l1():
    """The one ranking of checkpoints: validation pixel_exact, then the lowest l1; a run's best and a search's."""
    assert rank({"pixel_exact": 0.9, "l1": 0.5}) > rank({"pixel_exact": 0.8, "l1": 0.0})
    candidates = [
        ("a", {"pixel_exact": 0.99, "l1": 0.02}),
        ("b", {"pixel_exact": 0.99, "l1": 0.01}),
        ("c", {"pixel_exact": 0.9, "l1": 0.0}),
    ]
    assert best(candidates)[0] == "b" and best([]) is None
