"""Colour names, hex codes and ``rgb(...)`` strings -> RGB triples.

The CSS/X11 table comes from Pillow's ``ImageColor``. A dataset's own palette (the RGB its targets
really use, e.g. the real data's ``green`` is (0, 255, 0), not CSS (0, 128, 0)) wins over the table.

    >>> parse_color("Light Blue")
    (173, 216, 230)
    >>> parse_color("green", palette={"green": (0, 255, 0)})
    (0, 255, 0)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping

from PIL import ImageColor

RGB = tuple[int, int, int]

MAX_COLOR_LENGTH = 64
_HEX = re.compile(r"#(?:[0-9a-f]{3}|[0-9a-f]{6})")
_RGB_FUNC = re.compile(r"rgb\(\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\)")
CSS_COLORS: dict[str, RGB] = {name: ImageColor.getrgb(name)[:3] for name in ImageColor.colormap}


def normalize_name(text: str) -> str:
    """Case-, space-, hyphen- and underscore-insensitive key: "Light-Blue" -> "lightblue"."""
    return re.sub(r"[\s_\-]+", "", text.strip().lower())


def parse_color(text: object, palette: Mapping[str, RGB] | None = None) -> RGB:
    """Return the (r, g, b) that ``text`` names; ValueError quoting it and suggesting names if unknown."""
    if not isinstance(text, str):
        raise ValueError(f"colour must be a string such as 'red' or '#ff8800', got {type(text).__name__}")
    if not text.strip():
        raise ValueError("colour is empty: expected a name such as 'red', '#ff8800' or 'rgb(255,136,0)'")
    if len(text) > MAX_COLOR_LENGTH:
        raise ValueError(f"colour is {len(text)} characters long; at most {MAX_COLOR_LENGTH} are accepted")
    key = normalize_name(text)
    own = {normalize_name(name): tuple(rgb) for name, rgb in (palette or {}).items()}
    if key in own:
        return own[key]
    if key in CSS_COLORS:
        return CSS_COLORS[key]
    compact = text.strip().lower().replace(" ", "")
    if _HEX.fullmatch(compact):
        return ImageColor.getrgb(compact)[:3]
    if match := _RGB_FUNC.fullmatch(compact):
        rgb = tuple(int(v) for v in match.groups())
        if max(rgb) > 255:
            raise ValueError(f"colour {text!r}: each rgb() component must be 0-255")
        return rgb
    raise ValueError(f"unknown colour {text!r}{suggestion(text, palette)}")


def suggestion(text: str, palette: Mapping[str, RGB] | None = None) -> str:
    """'; did you mean ...?' for the names closest to ``text``, or a hint on the accepted forms."""
    names = {normalize_name(n): n for n in CSS_COLORS} | {normalize_name(n): n for n in (palette or {})}
    close = difflib.get_close_matches(normalize_name(text), names, n=3, cutoff=0.6)
    if close:
        return "; did you mean " + ", ".join(repr(names[c]) for c in close) + "?"
    return "; expected a colour name (e.g. 'red', 'light blue'), '#rrggbb' or 'rgb(r, g, b)'"


def to_hex(rgb: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)
