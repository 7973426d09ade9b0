"""What a search shows while it runs: one line per trial result, and its metrics for Prometheus and Grafana."""

from __future__ import annotations

import collections
import math

from ray import tune
from ray.util import metrics

from polycolor.metrics import SCORE

STATES = ("PENDING", "RUNNING", "PAUSED", "TERMINATED", "ERROR")


class Progress(tune.Callback):
    """Print one line per trial result; export the search's trials by state and its best validation pixel_exact
    so far through Ray's metrics agent (``ray_polycolor_search_*``, charted by cluster/grafana-training.json)."""

    def __init__(self, name: str):
        self.tags, self.best_seen = {"search": name}, -1.0
        self.trials = metrics.Gauge("polycolor_search_trials", "the search's trials, by state", ("search", "state"))
        self.best = metrics.Gauge(
            "polycolor_search_best_pixel_exact", "best validation pixel_exact so far", ("search",)
        )

    def count(self, trials) -> None:
        states = collections.Counter(trial.status for trial in trials)
        for state in STATES:
            self.trials.set(states[state], tags=self.tags | {"state": state})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if SCORE in result:
            print(
                f"[search] trial {trial.trial_id} epoch {result['epoch'] + 1}: pixel_exact {result[SCORE]:.6f}  "
                f"iou {result['iou']:.4f}  {result['images_per_s']:.0f} img/s",
                flush=True,
            )
            if math.isfinite(result[SCORE]) and result[SCORE] > self.best_seen:
                self.best_seen = result[SCORE]
                self.best.set(self.best_seen, tags=self.tags)
        self.count(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.count(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.count(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.count(trials)
