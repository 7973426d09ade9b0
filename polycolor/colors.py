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
    check_phrase(text)
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


def check_phrase(text: object) -> str:
    """``text`` if it is a non-empty string of at most MAX_COLOR_LENGTH characters, else ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"colour must be a string such as 'red' or '#ff8800', got {type(text).__name__}")
    if not text.strip():
        raise ValueError("colour is empty: expected a name such as 'red', '#ff8800' or 'rgb(255,136,0)'")
    if len(text) > MAX_COLOR_LENGTH:
        raise ValueError(f"colour is {len(text)} characters long; at most {MAX_COLOR_LENGTH} are accepted")
    return text


def suggestion(text: str, palette: Mapping[str, RGB] | None = None) -> str:
    """'; did you mean ...?' for the names closest to ``text``, or a hint on the accepted forms."""
    names = {normalize_name(n): n for n in CSS_COLORS} | {normalize_name(n): n for n in (palette or {})}
    close = difflib.get_close_matches(normalize_name(text), names, n=3, cutoff=0.6)
    if close:
        return "; did you mean " + ", ".join(repr(names[c]) for c in close) + "?"
    return "; expected a colour name (e.g. 'red', 'light blue'), '#rrggbb' or 'rgb(r, g, b)'"


# The words CSS names are made of, for ``phrase``; a compound that is one word stays one ("goldenrod").
_WORDS = set("""
alice almond antique aqua aquamarine azure beige bisque black blanched blue blush brick brown burly wood
cadet chartreuse chiffon chocolate coral cornflower cornsilk cream crimson cyan dark deep dim dodger drab
fire floral forest fuchsia gainsboro ghost gold goldenrod gray green grey honeydew hot indian indigo ivory
khaki lace lavender lawn lemon light lime linen magenta maroon medium midnight mint misty moccasin navajo
navy old olive orange orchid pale papaya peach peru pink plum powder puff purple rebecca red rose rosy
royal saddle salmon sandy sea seashell sienna silver sky slate smoke snow spring steel tan teal thistle
tomato turquoise violet wheat whip white yellow
""".split())


def phrase(name: str) -> str:
    """A CSS name as words ("lightseagreen" -> "light sea green"), for text encoders; unchanged if it will not split."""
    best: list[list[str] | None] = [[]] + [None] * len(name)  # best[i]: fewest words spelling name[:i]
    for end in range(1, len(name) + 1):
        for start in range(end):
            word = name[start:end]
            if best[start] is not None and word in _WORDS and (best[end] is None or len(best[start]) + 1 < len(best[end])):
                best[end] = best[start] + [word]
    return " ".join(best[-1]) if best[-1] else name


def to_hex(rgb: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)
