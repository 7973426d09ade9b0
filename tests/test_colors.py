import numpy as np
import pytest

from polycolor.colors import LEXICON, XKCD_COLORS, modified, parse_color, phrase, to_hex, to_oklab


@pytest.mark.parametrize(
    "text, rgb",
    [
        ("red", (255, 0, 0)),
        ("Light Blue", (173, 216, 230)),
        ("light-blue", (173, 216, 230)),
        ("LIGHT_BLUE", (173, 216, 230)),
        ("#f80", (255, 136, 0)),
        ("#FF8800", (255, 136, 0)),
        ("rgb(1, 2, 3)", (1, 2, 3)),
        ("  teal ", (0, 128, 128)),
        ("green", (0, 128, 0)),  # CSS wins over the survey's green
        ("navy blue", (0, 17, 70)),  # the XKCD survey's names
        ("Burgundy", (97, 0, 35)),
        ("blood red", (152, 0, 2)),
        ("pastel pink", (255, 186, 205)),
        ("a deep red", (154, 2, 0)),  # a leading article is ignored
        ("robins egg blue", (152, 239, 249)),  # punctuation too ("robin's egg blue")
        ("hsl(120, 100%, 50%)", (0, 255, 0)),
        ("hsl(240deg 100% 50%)", (0, 0, 255)),
        ("hsla(0, 100%, 50%, 0.5)", (255, 128, 128)),  # alpha composited over white
        ("#f808", (255, 192, 119)),
        ("#ff880080", (255, 195, 127)),
        ("rgb(100%, 50%, 0%)", (255, 128, 0)),
        ("rgba(0, 0, 255, 0)", (255, 255, 255)),
    ],
)
def test_parses_names_hex_rgb_and_hsl(text, rgb):
    assert parse_color(text) == rgb


def test_dataset_palette_wins_over_css():
    assert parse_color("Green", palette={"green": (0, 255, 0)}) == (0, 255, 0)
    assert parse_color("teal", palette={"green": (0, 255, 0)}) == (0, 128, 128)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("blu", "did you mean 'blue'"),
        ("lightbleu", "'lightblue'"),
        ("#12345", "is not a valid #hex"),
        ("rgb(300,0,0)", "0-255"),
        ("hsl(120, 1, 0.5)", "in percent"),
        (
            "zorp red",
            "did you mean 'red', 'fire engine red', 'bright red'?",
        ),  # by meaning: names with its colour word, nearest it
        ("blod red", "did you mean 'blood red', 'red'"),  # a near spelling first: a typo
        ("red\x00", "control characters"),
        ("", "empty"),
        pytest.param("x" * 10_000, "at most 64", id="10k-chars"),
        (12, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_bad_colours_are_named_with_suggestions(bad, fragment):
    with pytest.raises(ValueError) as err:
        parse_color(bad)
    assert fragment in str(err.value)


def test_hex_round_trip():
    assert parse_color(to_hex((18, 52, 86))) == (18, 52, 86)


def test_phrase_splits_css_names_into_words_for_text_encoders():
    assert phrase("lightseagreen") == "light sea green" and phrase("mediumvioletred") == "medium violet red"
    assert phrase("goldenrod") == "goldenrod" and phrase("xyzzy") == "xyzzy"


def lch(rgb) -> tuple[float, float, float]:
    """OKLCH: lightness, chroma, hue in degrees."""
    L, a, b = to_oklab(rgb)
    return L, (a * a + b * b) ** 0.5, float(np.degrees(np.arctan2(b, a)))


BASES = ["teal", "salmon", "tomato", "orchid", "steel blue", "olive", "crimson", "slate blue"]


@pytest.mark.parametrize("base", BASES)
def test_modifiers_move_lightness_and_chroma_and_keep_the_hue(base):
    rgb = parse_color(base)
    L, C, h = lch(rgb)
    for words, check in {
        ("dark",): lambda light, c: light < L - 0.05,
        ("light",): lambda light, c: light > L + 0.05,
        ("pale",): lambda light, c: light > L and c < C,
        ("deep",): lambda light, c: light < L,
        ("bright",): lambda light, c: light > L,
        ("very", "dark"): lambda light, c: light < lch(modified(rgb, ["dark"]))[0],
    }.items():
        light, c, hue = lch(modified(rgb, list(words)))
        assert check(light, c), (words, base)
        assert abs((hue - h + 180) % 360 - 180) < 4, (words, base, hue, h)  # the same hue, within a few degrees


def test_modifiers_apply_where_no_lexicon_holds_the_phrase():
    """A modifier applies where no lexicon holds the phrase; a survey name wins where one does."""
    assert "verydarktomato" not in LEXICON and parse_color("very dark tomato") == modified(
        parse_color("tomato"), ["very", "dark"]
    )
    assert parse_color("dark teal") == XKCD_COLORS["dark teal"]  # the survey's own "dark teal"


def test_ish_moves_towards_its_colour_and_stands_alone():
    red = to_oklab(parse_color("red"))
    base, shifted = to_oklab(parse_color("slate blue")), to_oklab(parse_color("reddish slate blue"))
    assert np.linalg.norm(shifted - red) < np.linalg.norm(base - red)
    assert "salmonish" not in LEXICON  # so the modifier reads it: salmon at 70% chroma
    (light, c, hue), (L, C, h) = lch(parse_color("salmonish")), lch(parse_color("salmon"))
    assert abs(light - L) < 0.01 and c < 0.75 * C and abs(hue - h) < 4


def test_lexicons_hold_survey_names_and_css_wins():
    """The lexicons hold the survey's names, and CSS wins a key both hold."""
    assert len(XKCD_COLORS) == 949 and LEXICON["green"] == ("green", (0, 128, 0))
