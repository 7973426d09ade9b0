import pytest

from polycolor.colors import parse_color, phrase, to_hex


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
        ("green", (0, 128, 0)),
    ],
)
def test_parses_names_hex_and_rgb(text, rgb):
    assert parse_color(text) == rgb


def test_dataset_palette_wins_over_css():
    assert parse_color("Green", palette={"green": (0, 255, 0)}) == (0, 255, 0)
    assert parse_color("teal", palette={"green": (0, 255, 0)}) == (0, 128, 128)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("blu", "did you mean 'blue'"),
        ("lightbleu", "'lightblue'"),
        ("#12345", "unknown colour '#12345'"),
        ("rgb(300,0,0)", "0-255"),
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
