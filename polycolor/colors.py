"""Colour names, modifiers and notations -> RGB triples.

Names, first match wins: a dataset's own palette (the RGB its targets really use: the real data's
``green`` is (0, 255, 0), not CSS (0, 128, 0)), the CSS/X11 names (Pillow's ``ImageColor``), then the
949 names of the XKCD colour survey as matplotlib ships them ("navy blue", "burgundy", "blood red").
Names match case-, space- and punctuation-insensitively, after a leading article ("a deep red").

Notations: ``#rgb``, ``#rgba``, ``#rrggbb``, ``#rrggbbaa``; ``rgb()``/``rgba()`` in 0-255 or percentages;
``hsl()``/``hsla()``. An alpha below 1 is composited over white, as a painted image would show it.

Modifiers, before any known name, act in OKLCH (OKLab's lightness L in [0, 1], chroma C, hue h), so the
hue stays (chroma is lowered until the colour fits sRGB):

    light   L moves 35% of the way to white, C x 0.85       dark    L x 0.7
    pale    L moves 50% of the way to white, C x 0.5        deep    L x 0.85, C x 1.2
    bright  L moves 10% of the way to white, C x 1.3        very    the next modifier twice
    X-ish   ("reddish", "bluish") 30% of the way to X in OKLab; alone ("greenish"), X at 70% chroma

A name the lexicons hold wins over its modifier reading: "dark red" is the survey's (132, 0, 0).

    >>> parse_color("Light Blue")
    (173, 216, 230)
    >>> parse_color("green", palette={"green": (0, 255, 0)})
    (0, 255, 0)
"""

from __future__ import annotations

import colorsys
import difflib
import re
from collections.abc import Iterable, Mapping

import numpy as np
from PIL import ImageColor

RGB = tuple[int, int, int]

MAX_COLOR_LENGTH = 64
CSS_COLORS: dict[str, RGB] = {name: ImageColor.getrgb(name)[:3] for name in ImageColor.colormap}
_ARTICLE = re.compile(r"^(?:a|an|the)\s+")
_HEX = re.compile(r"#([0-9a-f]{3,4}|[0-9a-f]{6}|[0-9a-f]{8})")
_NUMBER = r"\s*([0-9]*\.?[0-9]+)(%?)\s*"
_FUNC = re.compile(rf"(rgba?|hsla?)\({_NUMBER}(?:deg)?[,\s]{_NUMBER}[,\s]{_NUMBER}(?:[,/]{_NUMBER})?\)")


def normalize_name(text: str) -> str:
    """Return a name's lookup key: lower case, no leading article, letters and digits only ("A Light-Blue" ->
    "lightblue")."""
    return re.sub(r"[^a-z0-9]", "", _ARTICLE.sub("", text.strip().lower()))


def _xkcd() -> dict[str, RGB]:
    from matplotlib.colors import XKCD_COLORS

    return {name.removeprefix("xkcd:"): ImageColor.getrgb(value)[:3] for name, value in XKCD_COLORS.items()}


XKCD_COLORS: dict[str, RGB] = _xkcd()
LEXICONS = {"css": CSS_COLORS, "xkcd": XKCD_COLORS}  # in the order they are consulted, after a dataset's palette
# key -> (name as written, RGB); an earlier lexicon wins a key both hold
LEXICON: dict[str, tuple[str, RGB]] = {
    normalize_name(n): (n, rgb) for table in reversed(LEXICONS.values()) for n, rgb in table.items()
}


def parse_color(text: object, palette: Mapping[str, RGB] | None = None) -> RGB:
    """Return the (r, g, b) that ``text`` names; ValueError quoting it and suggesting names if unknown."""
    rgb = read_color(text, palette)
    if rgb is None:
        raise ValueError(f"unknown colour {text!r}{suggestion(text, palette)}")
    return rgb


def read_color(text: object, palette: Mapping[str, RGB] | None = None) -> RGB | None:
    """Return what ``parse_color`` does, without its search for suggestions: None for a phrase no lexicon reads."""
    check_phrase(text)
    if (rgb := notation(text)) is not None or (rgb := lookup(text, palette)) is not None:
        return rgb
    words = _ARTICLE.sub("", text.strip().lower()).replace("-", " ").split()
    for split in range(len(words) - 1, 0, -1):  # the most modifiers before a known name: "very light" + "blue"
        base = lookup(" ".join(words[split:]), palette)
        if base is not None and all(is_modifier(w, palette) for w in words[:split]):
            return modified(base, words[:split], palette)
    if len(words) == 1 and (tint := ish(words[0], palette)) is not None:  # "greenish" alone
        return from_oklab(scale_chroma(to_oklab(tint), 0.7))
    return None


def lookup(name: str, palette: Mapping[str, RGB] | None = None) -> RGB | None:
    key = normalize_name(name)
    own = {normalize_name(n): tuple(rgb) for n, rgb in (palette or {}).items()}
    return own.get(key) or (LEXICON[key][1] if key in LEXICON else None)


def notation(text: str) -> RGB | None:
    """Return the RGB of a hex, rgb()/rgba() or hsl()/hsla() string, None if it is none of them; ValueError if
    malformed."""
    compact = text.strip().lower()
    if match := _HEX.fullmatch(compact.replace(" ", "")):
        digits = match.group(1)
        if len(digits) <= 4:
            digits = "".join(2 * d for d in digits)
        values = [int(digits[i : i + 2], 16) / 255 for i in range(0, len(digits), 2)]
        return over_white(values[:3], values[3] if len(values) == 4 else 1.0)
    if not (match := _FUNC.fullmatch(compact)):
        if compact.startswith(("rgb", "hsl", "#")):
            raise ValueError(f"colour {text!r} is not a valid #hex, rgb(r, g, b) or hsl(h, s%, l%)")
        return None
    kind, groups = match.group(1), match.groups()[1:]
    values, percent = [float(v) if v else None for v in groups[0::2]], [p == "%" for p in groups[1::2]]
    alpha = 1.0 if values[3] is None else values[3] / 100 if percent[3] else values[3]
    if kind.startswith("rgb"):
        channels = [v / 100 if p else v / 255 for v, p in zip(values[:3], percent[:3])]
    else:
        if not (percent[1] and percent[2]):
            raise ValueError(
                f"colour {text!r}: hsl() takes saturation and lightness in percent, e.g. hsl(120, 100%, 50%)"
            )
        channels = list(colorsys.hls_to_rgb(values[0] % 360 / 360, values[2] / 100, values[1] / 100))
    if max(channels) > 1 or alpha > 1:
        raise ValueError(f"colour {text!r}: each component must be 0-255 (or 0-100%), alpha 0-1")
    return over_white(channels, alpha)


def over_white(channels, alpha: float) -> RGB:
    return tuple(int(round((alpha * c + 1 - alpha) * 255)) for c in channels)


# ---------------------------------------------------------------------------------------------------
# Modifiers in OKLab (Björn Ottosson's matrices): lightness and chroma change, hue stays.

_M1 = np.array(
    [
        [0.4122214708, 0.5363325363, 0.0514459929],
        [0.2119034982, 0.6806995451, 0.1073969566],
        [0.0883024619, 0.2817188376, 0.6299787005],
    ]
)
_M2 = np.array(
    [
        [0.2104542553, 0.7936177850, -0.0040720468],
        [1.9779984951, -2.4285922050, 0.4505937099],
        [0.0259040371, 0.7827717662, -0.8086757660],
    ]
)
STEPS = {  # modifier -> (share of the way to white, lightness factor, chroma factor)
    "light": (0.35, 1.0, 0.85),
    "dark": (0.0, 0.7, 1.0),
    "pale": (0.5, 1.0, 0.5),
    "deep": (0.0, 0.85, 1.2),
    "bright": (0.1, 1.0, 1.3),
}


def to_oklab(rgb) -> np.ndarray:
    """Return the OKLab (..., 3) of (..., 3) 8-bit sRGB."""
    c = np.asarray(rgb, dtype=float) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return np.cbrt(linear @ _M1.T) @ _M2.T


def from_oklab(lab: np.ndarray) -> RGB:
    """Return the sRGB colour of ``lab``, its chroma lowered (hue and lightness kept) until it fits."""
    for _ in range(30):
        linear = np.linalg.solve(_M1, np.linalg.solve(_M2, lab) ** 3)
        if linear.min() >= -1e-4 and linear.max() <= 1 + 1e-4:
            break
        lab = scale_chroma(lab, 0.9)
    linear = np.clip(linear, 0, 1)
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return tuple(int(round(v * 255)) for v in c)


def scale_chroma(lab: np.ndarray, factor: float) -> np.ndarray:
    return np.array([lab[0], lab[1] * factor, lab[2] * factor])


def ish(word: str, palette: Mapping[str, RGB] | None = None) -> RGB | None:
    """Return the colour X of "Xish" ("reddish", "bluish", "orangeish"), or None."""
    if not word.endswith("ish") or len(word) < 5:
        return None
    stem = word[:-3]
    for base in (stem, stem[:-1], stem + "e"):  # reddish -> red, bluish -> blue
        if (rgb := lookup(base, palette)) is not None:
            return rgb
    return None


def is_modifier(word: str, palette: Mapping[str, RGB] | None = None) -> bool:
    return word in STEPS or word == "very" or ish(word, palette) is not None


def modified(rgb: RGB, modifiers: list[str], palette: Mapping[str, RGB] | None = None) -> RGB:
    """Return ``rgb`` under ``modifiers``, the one nearest the name first; "very" repeats the modifier after it."""
    steps, times = [], 1
    for word in modifiers:
        if word == "very":
            times += 1
        else:
            steps, times = steps + [word] * times, 1
    lab = to_oklab(rgb)
    for word in reversed(steps):
        if word in STEPS:
            to_white, lightness, chroma = STEPS[word]
            light = lab[0] * lightness
            lab = np.array([light + (1 - light) * to_white, lab[1] * chroma, lab[2] * chroma])
        else:
            lab = lab + 0.3 * (to_oklab(ish(word, palette)) - lab)
    return from_oklab(lab)


def check_phrase(text: object) -> str:
    """Return ``text`` if it is a non-empty string of at most MAX_COLOR_LENGTH characters, else ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"colour must be a string such as 'red' or '#ff8800', got {type(text).__name__}")
    if not text.strip():
        raise ValueError("colour is empty: expected a name such as 'red', '#ff8800' or 'rgb(255,136,0)'")
    if len(text) > MAX_COLOR_LENGTH:
        raise ValueError(f"colour is {len(text)} characters long; at most {MAX_COLOR_LENGTH} are accepted")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text):
        raise ValueError(f"colour {text!r} holds control characters; expected a name, #hex, rgb() or hsl()")
    return text


def name_distance(lab: np.ndarray, other: np.ndarray) -> float:
    """Return how far apart two OKLab colours are as names go: hue difference in full, chroma at half and lightness at
    a quarter, since names follow hue first (teal is nearer cyan than purple, though cyan is far lighter)."""
    chroma, chroma_other = np.hypot(lab[1], lab[2]), np.hypot(other[1], other[2])
    hue2 = max(0.0, float(np.sum((lab[1:] - other[1:]) ** 2)) - (chroma - chroma_other) ** 2)  # ΔH² = Δa² + Δb² − ΔC²
    return float(np.sqrt((0.25 * (lab[0] - other[0])) ** 2 + (0.5 * (chroma - chroma_other)) ** 2 + hue2))


def suggestion(text: str, palette: Mapping[str, RGB] | None = None, only: Iterable[str] | None = None) -> str:
    """Return '; did you mean ...?' with the three names nearest ``text`` among the lexicons and the palette (or
    ``only``
    those names: a closed vocabulary): a near spelling first (a typo), then, of the names sharing most of its
    words (any name, in a closed vocabulary), those whose colour is nearest in OKLab the colour the phrase or
    its colour words name ("zorp red" -> the reds), then the closest spellings; else a hint on what is accepted."""
    if only is None:
        names = dict(LEXICON) | {normalize_name(n): (n, tuple(rgb)) for n, rgb in (palette or {}).items()}
    else:
        names = {normalize_name(n): (n, rgb) for n in only if (rgb := lookup(n, palette)) is not None}
    words = set(_ARTICLE.sub("", text.strip().lower()).replace("-", " ").split())
    try:
        whole = read_color(text, palette)  # a colour a closed vocabulary lacks ("teal") is still a colour
    except ValueError:
        whole = None
    named = (
        [to_oklab(whole)]
        if whole is not None
        else [to_oklab(rgb) for w in words if (rgb := lookup(w, palette) or ish(w, palette)) is not None]
    )
    meaning = np.mean(named, axis=0) if named else None
    ranked = sorted(
        (
            -len(words & set(n.lower().split())),
            name_distance(to_oklab(rgb), meaning) if meaning is not None else 0.0,
            len(n),
            k,
        )
        for k, (n, rgb) in names.items()
        if words & set(n.lower().split()) or (only is not None and meaning is not None)
    )
    typo = difflib.get_close_matches(normalize_name(text), names, n=1, cutoff=0.85)  # a near spelling leads: a typo
    close = list(dict.fromkeys(typo + [k for *_, k in ranked[:3]]))
    close += [k for k in difflib.get_close_matches(normalize_name(text), names, n=3, cutoff=0.6) if k not in close]
    if close:
        return "; did you mean " + ", ".join(repr(names[c][0]) for c in close[:3]) + "?"
    if only is not None:
        return (
            "; expected one of "
            + ", ".join(repr(n) for n, _ in list(names.values())[:12])
            + (", ..." if len(names) > 12 else "")
        )
    return (
        "; expected a colour name (e.g. 'red', 'navy blue', 'light teal'), '#rrggbb', 'rgb(r, g, b)' or "
        "'hsl(h, s%, l%)'"
    )


# The words CSS names are made of, for ``phrase``; a compound that is one word stays one ("goldenrod").
_WORDS = set(
    """
alice almond antique aqua aquamarine azure beige bisque black blanched blue blush brick brown burly wood
cadet chartreuse chiffon chocolate coral cornflower cornsilk cream crimson cyan dark deep dim dodger drab
fire floral forest fuchsia gainsboro ghost gold goldenrod gray green grey honeydew hot indian indigo ivory
khaki lace lavender lawn lemon light lime linen magenta maroon medium midnight mint misty moccasin navajo
navy old olive orange orchid pale papaya peach peru pink plum powder puff purple rebecca red rose rosy
royal saddle salmon sandy sea seashell sienna silver sky slate smoke snow spring steel tan teal thistle
tomato turquoise violet wheat whip white yellow
""".split()
)


def phrase(name: str) -> str:
    """Return a CSS name as words ("lightseagreen" -> "light sea green"), for text encoders; unchanged if it will not
    split."""
    best: list[list[str] | None] = [[]] + [None] * len(name)  # best[i]: fewest words spelling name[:i]
    for end in range(1, len(name) + 1):
        for start in range(end):
            word = name[start:end]
            if (
                best[start] is not None
                and word in _WORDS
                and (best[end] is None or len(best[start]) + 1 < len(best[end]))
            ):
                best[end] = best[start] + [word]
    return " ".join(best[-1]) if best[-1] else name


def to_hex(rgb: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)
