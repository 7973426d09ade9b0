"""What a colour costs the serving path: a known name against a stream of distinct unknown phrases.

    python bench/colour_cost.py [--requests 300]

For each conditioning mode (``text`` when its extra is installed) it times, in one process, what a replica
does for one request's colour and image: the client's budget of phrases that need the encoder (Serve's
``PhraseBudget``, at its default rate), the colour's condition (``Colorizer.condition``, which refuses an
unknown phrase with its three nearest names in the table-based modes, and places it through the encoder in
``text`` mode), then, when accepted, one 128x128 outline through the model. Known: one name repeated.
Unknown: a new made-up phrase every request (no cache helps), as a client sending more than 100 a second
would. Prints ms per request for each, and their ratio (goal: unknown <= known).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from polycolor import synth, text
from polycolor.data import REAL_PALETTE
from polycolor.model import ConditionalUNet, ModelConfig
from polycolor.predict import Colorizer
from polycolor.serve import DEFAULTS, PhraseBudget


def per_request_ms(colorizer: Colorizer, colours: list[str]) -> float:
    outline, budget = synth.generate(1, seed=0).outlines, PhraseBudget(DEFAULTS.max_new_phrases_per_s)
    start = time.perf_counter()
    for colour in colours:
        if colorizer.model.condition.costly(colour, colorizer.palette) and not budget.take("one client"):
            continue  # a 429, before any encoder run
        try:
            cond = colorizer.condition([colour])
        except ValueError:
            continue  # a 422: the request ends here
        colorizer.colorize_arrays(outline, cond)
    return (time.perf_counter() - start) * 1000 / len(colours)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one replica's CPU
    modes = {"concat": ModelConfig(base_width=8)}
    if text.available():
        encoder = text.load()
        encoder.lexicon()  # done at replica start-up
        modes["text"] = ModelConfig(
            conditioning="text",
            base_width=8,
            vocabulary=tuple(REAL_PALETTE),
            text_encoder=text.DEFAULT_ENCODER,
            text_dim=encoder.dim,
        )
    rng = np.random.default_rng(0)
    syllables = ["zor", "pla", "mek", "tiv", "qua", "bron", "sel", "dar", "vex", "lum"]
    print(f"{'mode':<8}{'known ms':>10}{'unknown ms':>12}{'unknown / known':>17}")
    for mode, cfg in modes.items():
        model = ConditionalUNet(cfg)
        model.condition.fit(REAL_PALETTE)
        colorizer = Colorizer(model, REAL_PALETTE)
        unknown = [
            " ".join("".join(rng.choice(syllables, 3)) for _ in range(2)) + f" {i}" for i in range(args.requests)
        ]
        per_request_ms(colorizer, ["navy blue"] * 10)  # warm-up
        known_ms, unknown_ms = (
            per_request_ms(colorizer, ["navy blue"] * args.requests),
            per_request_ms(colorizer, unknown),
        )
        print(f"{mode:<8}{known_ms:>10.2f}{unknown_ms:>12.2f}{unknown_ms / known_ms:>17.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
