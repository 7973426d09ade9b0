"""Compare the conditioning modes at one training budget and seed, on seen colours, unseen names and phrases.

    pip install -e '.[bench]'
    python bench/conditioning.py [--epochs 3] [--pairs 2000] [--out bench/results/conditioning]

Every run trains with the plain-PyTorch core (``polycolor.loop``; no Ray: the comparison is about the
model) on the same synthetic pairs, whose colours are CSS names minus a held-out set. Each run is then
scored on fresh shapes in: seen colour names; "blue" alone (where the published FiLM+CLIP model failed);
held-out CSS names; paraphrases of CSS names ("crimson red", "a deep red"), scored against the CSS colour;
and held-out phrases that no lexicon holds ("fire truck red"), scored against the reference RGBs below. A
mode that cannot take a colour (``embedding`` outside its vocabulary, RGB modes given a phrase no lexicon
parses) scores n/a: that is the answer, not a gap. The colour error is the mean absolute channel error
inside the polygon in 8-bit levels; CIEDE2000 compares each image's mean colour there with the truth's.
Prints a markdown table, writes results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage.color import deltaE_ciede2000, rgb2lab
from torch.utils.data import DataLoader

from polycolor import checkpoint, synth, text
from polycolor.colors import phrase
from polycolor.config import TrainConfig
from polycolor.data import REAL_PALETTE, Split
from polycolor.evaluate import evaluate_split
from polycolor.loop import make_optimizer, train_one_epoch
from polycolor.predict import Colorizer
from polycolor.train import build_model

HELD_OUT = (
    "darkblue",
    "skyblue",
    "crimson",
    "tomato",
    "teal",
    "orchid",
    "gold",
    "seagreen",
    "slateblue",
    "chocolate",
    "hotpink",
    "olivedrab",
    "steelblue",
    "indianred",
    "darkorange",
    "mediumpurple",
)
PARAPHRASES = {
    "crimson red": "crimson",
    "a deep red": "darkred",
    "navy blue": "navy",
    "bright yellow": "yellow",
    "deep blue": "darkblue",
    "pale sky blue": "lightskyblue",
    "tomato red": "tomato",
    "hot pink colour": "hotpink",
    "sea green paint": "seagreen",
    "golden yellow": "gold",
}
RUNS = [  # (label, TrainConfig overrides): ours first, then the published design and its failure
    ("concat", dict(conditioning="concat")),
    ("film", dict(conditioning="film")),
    ("embedding", dict(conditioning="embedding")),
    ("text", dict(conditioning="text")),
    ("concat, rgb head, l1, lr 1e-4 (published)", dict(conditioning="concat", head="rgb", loss="l1", lr=1e-4)),
    ("text, rgb head, l1, lr 1e-4 (published FiLM)", dict(conditioning="text", head="rgb", loss="l1", lr=1e-4)),
    ("text, rgb head, l1, lr 3e-3", dict(conditioning="text", head="rgb", loss="l1")),
]
# Phrases no lexicon holds, with common reference RGBs (the named things' usual colour values).
PHRASES = {
    "fire truck red": "#ce2029",
    "school bus yellow": "#ffd800",
    "coca cola red": "#f40009",
    "denim jeans blue": "#1560bd",
    "emerald gemstone": "#50c878",
    "ruby gemstone": "#e0115f",
    "sapphire gemstone": "#0f52ba",
    "canary bird yellow": "#ffff99",
    "halloween pumpkin": "#ff7518",
    "chocolate bar brown": "#7b3f00",
}
SETS = ("seen", "blue", "unseen names", "paraphrases", "held-out phrases")


def training_phrases() -> tuple[str, ...]:
    return tuple(sorted({phrase(n) for n in synth.NAMED_COLORS if n not in HELD_OUT}))


def renamed(names: dict[str, str], n: int, seed: int) -> Split:
    """``n`` fresh pairs coloured by the colours (CSS names or #hex) ``names`` maps to, labelled with its keys."""
    keys = list(names)
    split = synth.generate(n, seed=seed, colors=[names[k] for k in keys])
    by_css = {names[k]: k for k in keys}
    return Split(split.outlines, split.targets, [by_css[c] for c in split.colors], split.inputs)


def eval_sets(n: int) -> dict[str, Split]:
    seen = training_phrases()
    return {
        "seen": renamed({p: p for p in seen}, n, seed=101),
        "blue": renamed({"blue": "blue"}, n // 2, seed=102),
        "unseen names": renamed({phrase(c): c for c in HELD_OUT}, n, seed=103),
        "paraphrases": renamed(PARAPHRASES, n, seed=104),
        "held-out phrases": renamed(PHRASES, n, seed=105),
    }


def train(cfg: TrainConfig, vocabulary: tuple[str, ...], out: Path) -> tuple[Path, float]:
    """One run of the plain-PyTorch core; returns the checkpoint and the training seconds."""
    torch.manual_seed(cfg.data.seed)
    palette, optim = dict(REAL_PALETTE), cfg.optim
    model = build_model(cfg, palette, vocabulary)
    data = synth.SyntheticDataset(cfg.data.train_pairs, seed=(cfg.data.seed, 0, 0), colors=vocabulary)
    loader = DataLoader(data, batch_size=optim.batch_size, shuffle=False, drop_last=True)
    optimizer, scheduler = make_optimizer(model, optim, optim.epochs * len(loader))
    start = time.perf_counter()
    for epoch in range(optim.epochs):
        data.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, scheduler, optim.loss, palette, torch.device("cpu"))
        print(
            f"  epoch {epoch + 1}/{optim.epochs}  loss {stats['train_loss']:.4f}  {stats['images_per_s']:.0f} img/s",
            flush=True,
        )
    seconds = time.perf_counter() - start
    return checkpoint.write(out, model, palette, train=cfg.to_dict()), seconds


def score(path: Path, sets: dict[str, Split]) -> dict[str, dict | None]:
    colorizer = Colorizer.from_checkpoint(path, device="cpu")
    scores = {}
    for name, split in sets.items():
        try:
            metrics, per, _ = evaluate_split(colorizer, split)
            inside, true = (
                np.stack([per[f"{what}_{c}"] for c in "rgb"], axis=1) / 255 for what in ("inside", "true")
            )  # (N, 3) each
            ciede = float(deltaE_ciede2000(rgb2lab(inside[None]), rgb2lab(true[None])).mean())
            scores[name] = {k: metrics[k] for k in ("pixel_exact", "iou", "color_error")} | {"ciede2000": ciede}
        except ValueError as err:  # this mode cannot take these colours at all
            scores[name] = None
            print(f"  {name}: n/a ({str(err).splitlines()[0][:90]})")
    return scores


def table(results: list[dict]) -> str:
    head = "| mode | " + " | ".join(f"{s}: exact / IoU / colour err / ΔE00" for s in SETS) + " |"
    lines = [head, "|" + "---|" * (len(SETS) + 1)]
    for r in results:
        cells = []
        for s in SETS:
            m = r["scores"][s]
            cells.append(
                "n/a"
                if m is None
                else f"{m['pixel_exact']:.4f} / {m['iou']:.4f} / {m['color_error'] * 255:.1f} / {m['ciede2000']:.1f}"
            )
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2000, help="training pairs per epoch")
    parser.add_argument("--eval-pairs", type=int, default=200, help="pairs per evaluation set")
    parser.add_argument("--only", nargs="*", help="run labels to keep (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/conditioning"))
    args = parser.parse_args(argv)
    runs = [r for r in RUNS if not args.only or r[0] in args.only]
    if any(o.get("conditioning") == "text" for _, o in runs) and not text.available():
        print(f"error: {text.INSTALL_HINT}", file=sys.stderr)
        return 2
    vocabulary, sets = training_phrases(), eval_sets(args.eval_pairs)
    print(
        f"{len(vocabulary)} training phrases, {len(HELD_OUT)} held-out names, {len(PARAPHRASES)} paraphrases; "
        f"{args.epochs} epochs x {args.pairs} pairs per run"
    )
    results = []
    for i, (label, overrides) in enumerate(runs):
        cfg = TrainConfig().replace(epochs=args.epochs, train_pairs=args.pairs, **overrides)
        print(f"{label}: {overrides}", flush=True)
        path, seconds = train(cfg, vocabulary, args.out / f"run{i}")
        results.append({"label": label, "config": overrides, "train_s": seconds, "scores": score(path, sets)})
        print(table(results[-1:]).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"epochs": args.epochs, "pairs": args.pairs, "runs": results}, indent=2)
    )
    print("\n" + table(results))
    print(
        "\ncolour error is the mean absolute channel error inside the polygon, in 8-bit levels; exact = pixels "
        "within 16/255"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
