"""polycolor.loop: the plain-PyTorch core (no Ray): schedule, loss, one epoch, one evaluation."""

import pytest
import torch
from torch.utils.data import DataLoader

from polycolor import synth
from polycolor.config import TrainConfig
from polycolor.data import REAL_PALETTE, PolygonDataset
from polycolor.loop import compute_loss, evaluate, make_optimizer, metrics_from_sums, train_one_epoch

from conftest import tiny_model


def loader(n: int = 8) -> DataLoader:
    return DataLoader(PolygonDataset(synth.generate(n, seed=3, colors=list(REAL_PALETTE))), batch_size=4)


def test_one_cycle_peaks_at_the_learning_rate():
    """The one-cycle schedule warms up to --lr over the first tenth of the steps, then anneals to near zero."""
    optimizer, scheduler = make_optimizer(tiny_model(), TrainConfig().optim, steps=100)
    rates = []
    for _ in range(100):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert max(rates) == pytest.approx(3e-3, rel=0.05) and rates.index(max(rates)) in range(8, 12) and rates[-1] < 1e-5


def test_an_epoch_lowers_the_loss_on_the_pairs_it_saw():
    """Training epochs on a few pairs lower the loss on them; the result reports images/s."""
    torch.manual_seed(0)
    model, data = tiny_model(), loader()
    optimizer, scheduler = make_optimizer(model, TrainConfig().replace(schedule="constant").optim, steps=0)
    outline, target, colours = next(iter(data))
    cond = model.condition.prepare(colours, REAL_PALETTE)
    before = float(compute_loss(model, "bce", outline, target, cond))
    for _ in range(5):
        stats = train_one_epoch(model, data, optimizer, scheduler, "bce", REAL_PALETTE, torch.device("cpu"))
    assert float(compute_loss(model, "bce", outline, target, cond)) < before and stats["images_per_s"] > 0


def test_evaluation_sums_per_image_metrics():
    """An evaluation sums each image's metrics and counts the images, so shards add up to the whole."""
    model, data = tiny_model(), loader(8)
    sums = evaluate(model, data, REAL_PALETTE, torch.device("cpu"))
    halves = [
        evaluate(
            model,
            DataLoader(torch.utils.data.Subset(data.dataset, part), batch_size=4),
            REAL_PALETTE,
            torch.device("cpu"),
        )
        for part in (range(0, 4), range(4, 8))
    ]
    assert sums[-1] == 8 and torch.allclose(sums, halves[0] + halves[1])
    assert 0 <= metrics_from_sums(sums)["pixel_exact"] <= 1
