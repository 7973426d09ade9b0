"""Ray Serve: the real deployment on the session's local Ray, driven over loopback HTTP with httpx."""

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from polycolor.data import REAL_PALETTE
from polycolor.predict import Colorizer
from polycolor.serve import Model, PhraseBudget, ServeConfig, application

from conftest import LIMIT_MB, REQUEST_TIMEOUT_S, bomb_png, free_port, png_bytes

pytestmark = pytest.mark.timeout(300)
sys.set_int_max_str_digits(0)  # the fuzzer sends integers of any size


def live_actors() -> list:
    """This session's live actors (an explicit address: a cluster started later must not be asked instead)."""
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000)


def replica_pids() -> set[int]:
    return {a.pid for a in live_actors() if "main" in (a.class_name or "") or "Model" in (a.class_name or "")}


def test_a_good_request_matches_the_colorizer(server, outline):
    """A good request matches the in-process Colorizer, and JSON gives the same PNG."""
    with httpx.Client(base_url=server["url"], timeout=30) as client:
        form = client.post("/colorize", files={"image": ("o.png", outline, "image/png")}, data={"color": "teal"})
        body = {"image": base64.b64encode(outline).decode(), "colour": "teal"}
        as_json = client.post("/colorize", json=body)
        again = client.post("/colorize", json=body)
        big = Image.open(io.BytesIO(outline)).resize((300, 200))
        original = client.post(
            "/colorize", json={"image": base64.b64encode(png_bytes(big)).decode(), "colour": "teal", "size": "original"}
        )
    assert form.status_code == 200 and form.headers["content-type"] == "image/png", form.text
    assert form.content == as_json.content == again.content  # deterministic bytes
    colorizer = Colorizer.from_checkpoint(server["checkpoint"], device="cpu")
    expected = colorizer.colorize(Image.open(io.BytesIO(outline)), "teal")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(form.content))), np.asarray(expected))
    at_size = colorizer.colorize(big, "teal", original_size=True)  # the same answer at the input's size, with its edges
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(original.content))), np.asarray(at_size)
    ) and at_size.size == (300, 200)


def test_the_model_inside_the_ingress_answers_as_two_deployments_do(server, outline):
    """colocate: one deployment parses, colours and encodes in one process, with the checkpoint in its user_config
    (build_app's way): the same bytes as the default shape, its health, and no Model deployment."""
    from ray import serve

    from polycolor.serve import build_app

    args = {"checkpoint": str(server["checkpoint"]), "colocate": "true", "cpus": "0.25"}
    serve.run(build_app(args), name="one", route_prefix="/one")
    try:
        with httpx.Client(base_url=server["url"], timeout=30) as client:
            answers = [
                client.post(f"{path}/colorize", files={"image": ("o.png", outline)}, data={"color": "teal"})
                for path in ("/one", "")
            ]
            health = client.get("/one/healthz").json()
            many = client.post("/one/colorize", files=[("image", ("o.png", outline))] * 3, data={"color": "red"})
        deployments = {a.class_name for a in live_actors() if ":one:" in (a.class_name or "")}
    finally:
        serve.delete("one")
    assert answers[0].status_code == 200 and answers[0].content == answers[1].content
    assert health["status"] == "ok" and health["checkpoint"] == str(server["checkpoint"])
    assert many.status_code == 200 and len(many.json()) == 3
    assert deployments == {"ServeReplica:one:Ingress"}


@pytest.mark.parametrize(
    "mode", ["RGB", "RGBA", "L", "P", "LA", "1", "I;16", "CMYK JPEG", "JPEG", "animated", "odd-size", "1x400"]
)
def test_every_accepted_variant_gives_a_valid_png(server, outline, mode):
    """S5: every accepted image variant gives a PNG that decodes whole, at the input's size, and the same bytes
    each time it is asked."""
    image = Image.open(io.BytesIO(outline))
    buffer = io.BytesIO()
    if mode.endswith("JPEG"):
        image.convert("CMYK" if mode == "CMYK JPEG" else "RGB").save(buffer, format="JPEG")
    elif mode == "animated":
        image.save(buffer, format="PNG", save_all=True, append_images=[image.transpose(Image.Transpose.ROTATE_90)])
    elif mode == "I;16":
        Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257).save(buffer, format="PNG")
    else:
        {"odd-size": image.resize((97, 61)), "1x400": image.resize((1, 400))}.get(mode, image).convert(
            mode if len(mode) < 4 else "L"
        ).save(buffer, format="PNG")
    sent = Image.open(io.BytesIO(buffer.getvalue()))
    answers = [
        httpx.post(
            f"{server['url']}/colorize",
            files={"image": ("x", buffer.getvalue())},
            data={"color": "#123456", "size": "original"},
            timeout=30,
        )
        for _ in range(2)
    ]
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].content == answers[1].content
    png = Image.open(io.BytesIO(answers[0].content))
    assert png.format == "PNG" and png.size == sent.size
    png.load()  # decodes whole
    assert {tuple(c) for c in np.asarray(png.convert("RGB")).reshape(-1, 3)} <= {(255, 255, 255), (0x12, 0x34, 0x56)}


def truncated(outline):
    return outline[: len(outline) // 2]


MALFORMED = {
    "empty body": dict(content=b"", headers={"content-type": "application/json"}),
    "random bytes as image": dict(files={"image": ("x.png", os.urandom(300))}, data={"color": "red"}),
    "truncated image": dict(files={"image": ("x.png", "TRUNC")}, data={"color": "red"}),
    "text file as image": dict(files={"image": ("x.txt", b"hello, I am not an image")}, data={"color": "red"}),
    "missing image field": dict(data={"color": "red"}, files={"other": ("x", b"1")}),
    "missing colour": dict(files={"image": ("x.png", "GOOD")}),
    "unknown colour": dict(files={"image": ("x.png", "GOOD")}, data={"color": "redd"}),
    "colour of the wrong type": dict(json={"image": "GOOD64", "color": 12}),
    "colour of 10k characters": dict(files={"image": ("x.png", "GOOD")}, data={"color": "r" * 10_000}),
    "empty colour": dict(files={"image": ("x.png", "GOOD")}, data={"color": ""}),
    "wrong content type": dict(content=b"image=1", headers={"content-type": "text/plain"}),
    "malformed JSON": dict(content=b'{"image": ', headers={"content-type": "application/json"}),
    "JSON nested 20,000 deep": dict(content=b"[" * 20000 + b"]" * 20000, headers={"content-type": "application/json"}),
    "malformed multipart": dict(
        content=b"--xx\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=xx"}
    ),
    "malformed base64": dict(json={"image": "!!!not base64!!!", "color": "red"}),
    "GIF instead of PNG": dict(files={"image": ("x.gif", "GIF")}, data={"color": "red"}),
    "colour a 5000-digit number": dict(
        content=b'{"image": "GOOD64", "color": ' + b"9" * 5000 + b"}", headers={"content-type": "application/json"}
    ),
    "colour null, a list of numbers, an object": dict(json={"image": "GOOD64", "color": {"r": 1}}),
    "image a number": dict(json={"image": 12, "color": "red"}),
    "image a list of objects": dict(json={"image": [{"a": 1}], "color": "red"}),
    "size a list": dict(json={"image": "GOOD64", "color": "red", "size": ["original"]}),
    "an unknown JSON field": dict(json={"image": "GOOD64", "color": "red", "extra": 1}),
    "colour and color both": dict(json={"image": "GOOD64", "color": "red", "colour": "blue"}),
    "colour as a file part": dict(files=[("image", ("x.png", "GOOD")), ("color", ("c.txt", b"red"))]),
    "image as a text field": dict(data={"image": "not a file", "color": "red"}),
    "size given twice": dict(files={"image": ("x.png", "GOOD")}, data={"color": "red", "size": ["model", "original"]}),
    "an unknown form field": dict(files={"image": ("x.png", "GOOD")}, data={"color": "red", "extra": "1"}),
    "an image 0 pixels wide": dict(files={"image": ("x.png", "EMPTY")}, data={"color": "red"}),
    "an image 65536x256": dict(files={"image": ("x.png", "LONG")}, data={"color": "red"}),
}


def realise(kwargs: dict, outline: bytes) -> dict:
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    swap = {
        "GOOD": outline,
        "TRUNC": truncated(outline),
        "GIF": gif.getvalue(),
        "EMPTY": bomb_png(0, 128),
        "LONG": bomb_png(65536, 256),
    }
    out = dict(kwargs)
    if "files" in out:
        files = out["files"].items() if isinstance(out["files"], dict) else out["files"]
        out["files"] = [(k, (name, swap.get(v, v) if isinstance(v, str) else v)) for k, (name, v) in files]
    if "json" in out and out["json"].get("image") == "GOOD64":
        out["json"] = out["json"] | {"image": base64.b64encode(outline).decode()}
    if b"GOOD64" in out.get("content", b""):
        out["content"] = out["content"].replace(b"GOOD64", base64.b64encode(outline))
    return out


def test_malformed_requests_get_named_4xx(server, outline):
    """S1: malformed requests get a named 4xx within 2 s, and the replica survives."""
    before = replica_pids()
    with httpx.Client(base_url=server["url"], timeout=10) as client:
        for label, kwargs in MALFORMED.items():
            for _ in range(3):
                answer = client.post("/colorize", **realise(kwargs, outline))
                assert 400 <= answer.status_code < 500, (label, answer.status_code, answer.text)
                assert answer.elapsed.total_seconds() < 2, label
                body = answer.json()  # the colour's errors say so: a form can show them beside the colour's field
                assert body["error"] and body == {"error": body["error"]} | (
                    {"field": "color"} if "colour" in label else {}
                ), label
                assert (
                    "Traceback" not in answer.text and "/work" not in answer.text and "site-packages" not in answer.text
                )
        unknown = client.post("/colorize", **realise(MALFORMED["unknown colour"], outline)).json()["error"]
        assert "did you mean 'red'" in unknown
        assert client.get("/colorize").status_code == 405 and client.get("/colorize").json()["error"]
        assert client.delete("/colors").status_code == 405
        assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").json()
        assert client.post("/colorize", files={"image": ("o.png", outline)}, data={"color": "red"}).status_code == 200
    assert replica_pids() == before


def padded_png(outline: bytes, total: int) -> bytes:
    return outline + b"\0" * (total - len(outline))  # bytes after IEND are ignored by decoders


def test_body_size_boundary_and_chunked_overflow(server, outline):
    """S3: a body just under the limit is served; over it, declared or chunked, gets 413 unread."""
    limit = int(LIMIT_MB * 1024 * 1024)
    with httpx.Client(base_url=server["url"], timeout=30) as client:
        under = client.post(
            "/colorize", files={"image": ("o.png", padded_png(outline, limit - 1024))}, data={"color": "red"}
        )
        over = client.post(
            "/colorize", files={"image": ("o.png", padded_png(outline, limit + 1))}, data={"color": "red"}
        )

        def chunks():
            for _ in range(limit // 65536 + 4):
                yield b"\0" * 65536

        chunked = client.post(
            "/colorize", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
        )
    assert under.status_code == 200, under.text
    assert over.status_code == 413 and str(limit) in over.json()["error"]
    assert chunked.status_code == 413


def test_decompression_bomb_is_refused_without_decoding(server, outline):
    """S4: a decompression bomb and an image over our pixel cap get 413 naming the limit, undecoded."""
    with httpx.Client(base_url=server["url"], timeout=10) as client:
        bomb = client.post("/colorize", files={"image": ("b.png", bomb_png(100_000, 100_000))}, data={"color": "red"})
        ours = client.post(
            "/colorize", files={"image": ("b.png", bomb_png(1000, 1000))}, data={"color": "red"}
        )  # under Pillow's cap
        near = client.post(
            "/colorize", files={"image": ("o.png", png_bytes(Image.new("L", (512, 512), 255)))}, data={"color": "red"}
        )
    assert bomb.status_code == 413 and "limit is 262144" in bomb.json()["error"]
    assert (
        ours.status_code == 413 and ours.json()["error"] == "image is 1000x1000 = 1000000 pixels; the limit is 262144"
    )
    assert near.status_code == 200  # exactly at the cap


def test_fifty_concurrent_requests_succeed_in_batches(server, outline):
    """L4: a bounded burst of concurrent valid requests all succeed, batched (L4's p95 budget is checked in
    bench/serve_load.py, memory and leaks in bench/serve_soak.py)."""

    async def fire():
        async with httpx.AsyncClient(base_url=server["url"], timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post("/colorize", files={"image": ("o.png", outline)}, data={"color": "red"})
                    for _ in range(50)
                )
            )

    answers = asyncio.run(fire())
    assert [a.status_code for a in answers] == [200] * 50
    assert len({a.content for a in answers}) == 1
    sizes = httpx.get(f"{server['url']}/healthz").json()["recent_batch_sizes"]
    assert max(sizes) > 1


def test_backpressure_answers_the_excess_with_503(server, outline):
    """L1: past the replica's ongoing and queued limits the excess gets 503 at once; the held requests are right."""
    big = png_bytes(Image.open(io.BytesIO(outline)).resize((512, 512)))
    expected = png_bytes(
        Colorizer.from_checkpoint(server["checkpoint"], device="cpu").colorize(Image.open(io.BytesIO(big)), "red")
    )

    async def timed(client):
        start = time.perf_counter()
        answer = await client.post("/tight/colorize", files={"image": ("o.png", big)}, data={"color": "red"})
        return answer, time.perf_counter() - start

    async def fire():
        async with httpx.AsyncClient(base_url=server["url"], timeout=60) as client:
            return await asyncio.gather(*(timed(client) for _ in range(24)))

    answers = asyncio.run(fire())
    refused, served = (
        [t for a, t in answers if a.status_code == 503],
        [(a, t) for a, t in answers if a.status_code == 200],
    )
    assert len(refused) + len(served) == 24 and refused and served
    assert all(a.content == expected for a, _ in served)  # the held requests are answered, and right
    assert max(refused) < max(t for _, t in served)  # the excess is not made to wait for them


def test_api_key_is_enforced_when_set(server, outline):
    url = f"{server['url']}/keyed/colorize"
    files, data = {"image": ("o.png", outline)}, {"color": "red"}
    assert httpx.post(url, files=files, data=data).status_code == 401
    assert httpx.post(url, files=files, data=data, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert (
        httpx.post(url, files=files, data=data, headers={"authorization": "Bearer s3cret"}, timeout=30).status_code
        == 200
    )


def test_colors_healthz_docs_and_demo_page(server):
    with httpx.Client(base_url=server["url"], timeout=10) as client:
        colors = client.get("/colors").json()
        assert colors["palette"]["green"] == [0, 255, 0] and colors["any_css_name_or_hex"] is True
        assert colors["lexicons"] == ["palette", "css", "xkcd"] and "very" in colors["modifiers"]
        assert client.get("/healthz").json()["status"] == "ok"
        assert "openapi" in client.get("/docs").text.lower()
        page = client.get("/").text
        assert 'id="overlay"' in page and '<option value="navy blue">' in page  # the drawing canvas, completions


@pytest.mark.slow
@pytest.mark.ray
def test_the_serve_command_listens_on_loopback_by_default(tiny_checkpoint):
    """N1, N2: `python -m polycolor.serve` with no --host, on the local Ray it starts, answers on 127.0.0.1 and
    nowhere else, and that Ray's dashboard and Jobs API (the dashboard head this command started) too."""
    import subprocess
    import sys

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "polycolor.serve", "--checkpoint", str(tiny_checkpoint), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        dashboard_at = None  # Ray's own line says where its dashboard is (8265, or the next free port if that is taken)
        for line in process.stdout:  # up when it says where (a healthy replica alone is not: the app may still deploy)
            dashboard_at = dashboard_at or re.search(r"View the dashboard at \S*?http://([\d.]+):(\d+)", line)
            if line.startswith("[serve] http://"):
                break
        assert line.startswith(f"[serve] http://127.0.0.1:{port}/"), line
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        listening = [
            c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening
        (dashboard,) = [
            p
            for p in psutil.Process(process.pid).children(recursive=True)
            if "dashboard/dashboard.py" in " ".join(p.cmdline())
        ]
        assert dashboard_at and dashboard_at[1] == "127.0.0.1", dashboard_at
        served = [
            c
            for c in dashboard.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == int(dashboard_at[2])
        ]
        assert served and all(c.laddr.ip == "127.0.0.1" for c in served), served
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "[serve] stopped" in output, output[-2000:]


def test_a_corrupt_checkpoint_stops_the_serve_command(tiny_checkpoint, capsys, monkeypatch):
    """C2: a truncated checkpoint fails Serve's start-up, naming the file, before Ray or Serve start."""
    from polycolor import serve as module

    weights = tiny_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    monkeypatch.setattr(module.serve, "start", lambda *a, **k: pytest.fail("Serve was started"))
    assert module.main(["--checkpoint", str(tiny_checkpoint)]) == 2
    assert f"{weights}: sha256 does not match" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Faults: forced internal errors, timeouts, disconnects, killed and wedged replicas. Each uses its own
# application so that the shared one stays healthy.


@contextmanager
def deployed(name: str, cls=Model, options: dict | None = None, **config):
    """The application with ``cls`` as its model deployment, as ``name`` at /name for the duration of the
    block (``options``: the model deployment's); yields that path."""
    from ray import serve

    deployment = cls if cls is Model else serve.deployment(name="Model")(cls)
    cfg = ServeConfig(**{"cpus": 0.25, "ingress_cpus": 0.1} | config)
    serve.run(application(cfg, deployment, options), name=name, route_prefix=f"/{name}")
    try:
        yield f"/{name}"
    finally:
        serve.delete(name)


def alive_replica_pids(app_name: str) -> set[int]:
    return {a.pid for a in live_actors() if a.class_name == f"ServeReplica:{app_name}:Model"}


def post_with_retries(client: httpx.Client, path: str, outline: bytes, tries: int = 20) -> httpx.Response:
    """A client that retries timeouts, 5xx and dropped connections, as a real one behind a load balancer would."""
    for _ in range(tries):
        try:
            answer = client.post(path, files={"image": ("o.png", outline)}, data={"color": "red"})
            if answer.status_code < 500 and answer.status_code != 408:
                return answer
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return answer


SIDES = [0, 1, 2, 127, 4096, 4097, 65536, 16_777_216]
IMAGES = st.one_of(
    st.binary(max_size=2048),
    st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", bomb_png(70_000, 70_000)]),
    st.builds(bomb_png, st.sampled_from(SIDES), st.sampled_from(SIDES)),  # any aspect ratio, inside the limits and out
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**5000, -(2**64), 1e308])
    | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ("image", "color", "colour", "size", "other")


def encoded(image: bytes) -> str:
    return base64.b64encode(image).decode()


@settings(max_examples=80, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    image=IMAGES,
    colour=st.one_of(st.text(max_size=80), st.sampled_from(["red", "#ff8800", "rgb(999,0,0)", "\x00", "é" * 70])),
    form=st.sampled_from(["multipart", "json", "raw", "json values", "form parts"]),
    content_type=st.sampled_from(
        ["", "application/json", "text/plain", "multipart/form-data", "multipart/form-data; boundary=zz", "image/png"]
    ),
    values=st.dictionaries(st.sampled_from(FIELDS), st.one_of(JSON_VALUES, IMAGES.map(encoded)), max_size=4),
    parts=st.lists(
        st.tuples(st.sampled_from(FIELDS), st.booleans(), st.one_of(IMAGES, st.text(max_size=10).map(str.encode))),
        max_size=5,
    ),
)
def test_fuzzed_requests_never_get_a_5xx(server, image, colour, form, content_type, values, parts):
    """S2: fuzzed requests never get a 5xx, nor an answer outside the declared error shape: any JSON value (numbers of
    any size, nulls, lists, objects) in any field, file parts where text is expected and the reverse, repeated
    fields, images of any aspect ratio and size."""
    if form == "multipart":
        kwargs = {"files": {"image": ("f.png", image)}, "data": {"color": colour}}
    elif form == "json":
        kwargs = {
            "content": json.dumps({"image": encoded(image), "color": colour}).encode(),
            "headers": {"content-type": "application/json"},
        }
    elif form == "json values":
        kwargs = {"content": json.dumps(values).encode(), "headers": {"content-type": "application/json"}}
    elif form == "form parts":  # each part a file or a text field, by any of the names
        kwargs = {
            "files": [(name, ("p.png", data) if as_file else (None, data)) for name, as_file, data in parts]
            or [("image", ("p.png", image))]
        }
    else:
        kwargs = {"content": image + colour.encode("utf-8", "replace"), "headers": {"content-type": content_type}}
    answer = httpx.post(f"{server['url']}/colorize", timeout=30, **kwargs)
    assert answer.status_code < 500, (answer.status_code, answer.text)
    assert answer.elapsed.total_seconds() < 10
    if answer.status_code != 200:
        assert set(answer.json()) <= {"error", "field"} and answer.json()["error"]


def test_an_internal_error_gives_a_generic_500(server, outline):
    """S6: an internal error is a generic 500 JSON, and the next request works."""

    class Faulty(Model.func_or_class):  # a local class: pickled by value into the replica
        async def __init__(self, config):  # the model raises on one colour (not the health check's red)
            super().__init__(config)
            colorize = self.served.colorizer.colorize_arrays

            def faulty(outlines, cond):
                if [0x12, 0x34, 0x56] in (cond * 255).round().int().tolist():  # the colour "#123456"
                    raise RuntimeError("forced failure in /secret/path/model.py")
                return colorize(outlines, cond)

            self.served.colorizer.colorize_arrays = faulty

    with (
        deployed("faulty", Faulty, checkpoint=str(server["checkpoint"])) as path,
        httpx.Client(base_url=server["url"], timeout=30) as client,
    ):
        broken = client.post(f"{path}/colorize", files={"image": ("o.png", outline)}, data={"color": "#123456"})
        assert broken.status_code == 500 and broken.json() == {"error": "internal error; the request was not processed"}
        assert "secret" not in broken.text and "Traceback" not in broken.text
        assert (
            client.post(f"{path}/colorize", files={"image": ("o.png", outline)}, data={"color": "red"}).status_code
            == 200
        )


def test_a_request_over_the_timeout_gets_408(server, outline):
    """L2: a request over the timeout gets 408, and its work never runs."""
    slow = {"max_batch_size": 64, "batch_wait_s": REQUEST_TIMEOUT_S + 4}  # a lone request waits past the timeout
    with (
        deployed("slow", checkpoint=str(server["checkpoint"]), **slow) as path,
        httpx.Client(base_url=server["url"], timeout=60) as client,
    ):
        pids = alive_replica_pids("slow")
        late = client.post(f"{path}/colorize", files={"image": ("o.png", outline)}, data={"color": "red"})
        assert late.status_code == 408, late.text
        assert late.elapsed.total_seconds() < REQUEST_TIMEOUT_S + 3
        time.sleep(5)  # the abandoned batch would have run by now
        assert client.get(f"{path}/healthz").json()["recent_batch_sizes"] == []  # the timed-out request never ran
        assert client.post("/colorize", files={"image": ("o.png", outline)}, data={"color": "red"}).status_code == 200
        assert alive_replica_pids("slow") == pids


def test_clients_that_disconnect_early_leave_no_stuck_slots(server, outline):
    """L3: clients that disconnect early leave no stuck slots."""
    big = png_bytes(Image.open(io.BytesIO(outline)).resize((512, 512)))

    async def abandon(after_s: float):
        async with httpx.AsyncClient(base_url=server["url"], timeout=httpx.Timeout(after_s)) as client:
            sends = [
                client.post("/tight/colorize", files={"image": ("o.png", big)}, data={"color": "red"})
                for _ in range(20)
            ]
            return await asyncio.gather(*sends, return_exceptions=True)

    for after_s in (0.05, 0.02, 0.01, 0.005):  # on an idle machine the replica can answer within 50 ms: give up sooner
        dropped = asyncio.run(abandon(after_s))
        if any(isinstance(d, httpx.TimeoutException) for d in dropped):
            break
    assert sum(isinstance(d, httpx.TimeoutException) for d in dropped) > 0
    time.sleep(1)
    with httpx.Client(base_url=server["url"], timeout=30) as client:  # the tight app has one slot and one queue place
        codes = [
            client.post("/tight/colorize", files={"image": ("o.png", outline)}, data={"color": "red"}).status_code
            for _ in range(10)
        ]
    assert codes == [200] * 10


@pytest.mark.slow
def test_a_replica_killed_under_load_is_replaced(server, outline):
    """L5: a replica killed under load is replaced; a retrying client always succeeds."""
    with (
        deployed("victim", checkpoint=str(server["checkpoint"])) as path,
        httpx.Client(base_url=server["url"], timeout=30) as client,
    ):
        (victim,) = alive_replica_pids("victim")
        answers = []
        for i in range(30):
            if i == 5:
                os.kill(victim, signal.SIGKILL)
            answers.append(post_with_retries(client, f"{path}/colorize", outline))
        assert alive_replica_pids("victim") - {victim}, "the killed replica was not replaced"
    assert [a.status_code for a in answers] == [200] * 30
    assert len({a.content for a in answers}) == 1


@pytest.mark.slow
def test_a_wedged_model_is_replaced(server, outline, tmp_path):
    """L6: the health check catches a wedged model and Serve replaces the replica."""
    marker = tmp_path / "wedged"

    class Wedgeable(Model.func_or_class):  # while ``marker`` exists, the model's forward pass hangs
        async def __init__(self, config):
            super().__init__(config)
            forward = self.served.colorizer.forward  # the traced graph, which never calls the model's forward

            def maybe_wedged(*args, **kwargs):
                while marker.exists():
                    time.sleep(0.1)
                return forward(*args, **kwargs)

            self.served.colorizer.forward = maybe_wedged

    wedge_and_see_the_replica_replaced(
        "wedge", Wedgeable, {"health_check_period_s": 1, "health_check_timeout_s": 3}, marker, server, outline, 90
    )


def wedge_and_see_the_replica_replaced(name: str, cls, checks: dict, marker, server, outline, within_s: int) -> None:
    """Deploy ``cls``, wedge it by creating ``marker``: Serve's health check must replace the replica within
    ``within_s``; once ``marker`` is gone, the application answers again."""
    with (
        deployed(name, cls, checks, checkpoint=str(server["checkpoint"])) as path,
        httpx.Client(base_url=server["url"], timeout=30) as client,
    ):
        (first,) = alive_replica_pids(name)
        marker.touch()
        deadline = time.time() + within_s
        while first in alive_replica_pids(name) and time.time() < deadline:
            time.sleep(1)
        assert first not in alive_replica_pids(name), f"the wedged replica of {name} was never replaced"
        marker.unlink()
        assert post_with_retries(client, f"{path}/colorize", outline, tries=120).status_code == 200


@pytest.mark.slow
def test_a_wedged_model_thread_is_replaced(server, outline, tmp_path):
    """L6: a wedged model thread fails the health check and Serve replaces the replica."""
    marker = tmp_path / "wedged"

    class WedgeableThread(Model.func_or_class):  # once ``marker`` exists, the model thread blocks while it does
        async def __init__(self, config):
            super().__init__(config)

            def block():
                while marker.exists():
                    time.sleep(0.1)

            async def wedge_when_told():
                while not marker.exists():
                    await asyncio.sleep(0.2)
                self.model_thread.submit(block)

            self.wedger = asyncio.get_running_loop().create_task(wedge_when_told())

    # Wedged, /colorize hangs while a forward pass on the event loop would still succeed: the probe must take the
    # model thread.
    wedge_and_see_the_replica_replaced(
        "thread",
        WedgeableThread,
        {"health_check_period_s": 1, "health_check_timeout_s": 30},
        marker,
        server,
        outline,
        120,
    )


def test_the_phrase_budget_refuses_a_client_past_its_rate():
    """The phrase budget refuses a client past its rate and no other."""
    now = [0.0]
    budget = PhraseBudget(rate=5, clients=2, clock=lambda: now[0])
    assert [budget.take("a") for _ in range(7)] == [True] * 5 + [False] * 2
    assert budget.take("b")  # another client has its own budget
    now[0] += 0.2  # a fifth of a second: one phrase back
    assert budget.take("a") and not budget.take("a")
    budget.take("c")  # a third client: the least recently seen ("b") is forgotten, so memory stays bounded
    assert list(budget.buckets) == ["a", "c"]


def test_the_http_surface_is_exactly_what_the_readme_documents():
    """N3: the HTTP surface is exactly the README's table."""
    from starlette.routing import Route

    from polycolor.serve import app

    served = {(m.upper(), path) for path, operations in app.openapi()["paths"].items() for m in operations}
    served |= {(m, r.path) for r in app.routes if isinstance(r, Route) for m in r.methods - {"HEAD"}}
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## The HTTP endpoint")[1].split("\n## ")[0]
    assert served == set(re.findall(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/\S*)` \|", section, re.M))


def test_several_outlines_come_back_in_order(server, outline):
    """Several outlines in one request come back in order, with an error for each bad one."""
    other = png_bytes(Image.open(io.BytesIO(outline)).transpose(Image.Transpose.FLIP_TOP_BOTTOM).resize((90, 70)))
    colorizer = Colorizer.from_checkpoint(server["checkpoint"], device="cpu")
    expected = [
        np.asarray(colorizer.colorize(Image.open(io.BytesIO(data)), colour))
        for data, colour in ((outline, "teal"), (other, "red"))
    ]
    b64 = [base64.b64encode(data).decode() for data in (outline, other)]
    with httpx.Client(base_url=server["url"], timeout=30) as client:
        files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate((outline, other, b"junk"))]
        form = client.post("/colorize", files=files, data={"color": ["teal", "red", "blue"]})
        as_json = client.post("/colorize", json={"image": [*b64, "%%%"], "color": ["teal", "red", "blue"]})
        unknown = client.post("/colorize", json={"image": b64, "color": "no such colour"})
        too_many = client.post("/colorize", json={"image": b64[:1] * 17, "color": "red"})
        too_many_files = client.post(
            "/colorize", files=[("image", ("o.png", outline, "image/png"))] * 40, data={"color": "red"}
        )
        mismatched = client.post("/colorize", json={"image": b64, "color": ["red", "blue", "green"]})
        single = client.post("/colorize", json={"image": b64[0], "color": "teal"})
    assert form.status_code == 200 and form.headers["content-type"] == "application/json", form.text
    items = form.json()
    for item, want in zip(items, expected):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(item["image"])))), want)
    assert items[2] == {"error": "image is not a readable PNG or JPEG", "status": 422}
    assert as_json.json()[:2] == items[:2] and as_json.json()[2] == {
        "error": 'field "image" is not valid base64',
        "status": 400,
    }
    assert [i["status"] for i in unknown.json()] == [422, 422] and "unknown colour 'no such colour'" in unknown.json()[
        0
    ]["error"]
    assert too_many.status_code == 413 and too_many.json() == {"error": "17 images in one request; the limit is 16"}
    assert too_many_files.status_code == 413 and "the limit is 16" in too_many_files.json()["error"]
    assert mismatched.status_code == 422 and "2 images and 3 colours" in mismatched.json()["error"]
    assert single.headers["content-type"] == "image/png"  # one image: a PNG, as before


def running_replicas(app_name: str, deployment: str = "Model") -> int:
    from ray import serve

    return serve.status().applications[app_name].deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_autoscaling_grows_and_shrinks_with_load(server, outline):
    """Autoscaling grows to two replicas under load and shrinks back after it."""
    import threading

    cfg = {
        "replicas": "1-2",
        "ingress_replicas": "2",
        "target_ongoing_requests": 1.0,
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 3.0,
        "batch_wait_s": 0.05,
    }
    with deployed("elastic", checkpoint=str(server["checkpoint"]), **cfg) as path:
        assert running_replicas("elastic") == 1
        stop, statuses = threading.Event(), []

        def client() -> None:  # a bounded load: eight clients, one request in flight each
            with httpx.Client(base_url=server["url"], timeout=30) as http:
                while not stop.is_set():
                    statuses.append(
                        http.post(
                            f"{path}/colorize", files={"image": ("o.png", outline)}, data={"color": "red"}
                        ).status_code
                    )

        clients = [threading.Thread(target=client) for _ in range(8)]
        for thread in clients:
            thread.start()
        try:
            deadline = time.time() + 90
            while running_replicas("elastic") < 2 and time.time() < deadline:
                time.sleep(0.5)
            grew, ingress = running_replicas("elastic"), running_replicas("elastic", "Ingress")
        finally:
            stop.set()
            for thread in clients:
                thread.join()
        assert grew == 2, "the load did not add a replica within 90 s"
        assert ingress == 2  # the ingress keeps its own count: each deployment scales apart
        deadline = time.time() + 90
        while running_replicas("elastic") > 1 and time.time() < deadline:
            time.sleep(0.5)
        assert running_replicas("elastic") == 1, "the idle deployment did not shrink back within 90 s"
    assert statuses and set(statuses) == {200}


def serve_deploy(ray_session, config: dict, where: Path) -> None:
    """``serve deploy`` of ``config`` to the session's Ray, as a user or the KubeRay operator does (the REST API,
    token auth)."""
    import subprocess
    import sys

    import yaml

    where.write_text(yaml.safe_dump(config))
    address = f"http://{ray_session._private.worker._global_node.webui_url}"
    done = subprocess.run(
        [Path(sys.executable).with_name("serve"), "deploy", str(where), "--address", address],
        env=os.environ | {"RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_a_new_checkpoint_is_swapped_in_under_load(ray_session, server, outline, tmp_path):
    """A new checkpoint is swapped in under load with no failed request and no restart."""
    import threading

    from ray import serve

    from polycolor import checkpoint

    from conftest import tiny_model

    old = server["checkpoint"]
    new = checkpoint.write(
        tmp_path / "new", tiny_model(), REAL_PALETTE | {"red": (0, 128, 0)}
    )  # "red" now paints green
    image = Image.open(io.BytesIO(outline))
    painted = {
        name: np.asarray(Colorizer.from_checkpoint(path, "cpu").colorize(image, "red"))
        for name, path in (("old", old), ("new", new))
    }
    assert not np.array_equal(painted["old"], painted["new"])

    def config(path: Path) -> dict:  # cluster/serve.yaml's shape: the checkpoint in the deployment's user_config
        colorizer = {"name": "Model", "user_config": {"checkpoint": str(path)}}
        return {
            "applications": [
                {
                    "name": "swap",
                    "route_prefix": "/swap",
                    "import_path": "polycolor.serve:build_app",
                    "deployments": [colorizer],
                    "args": {"replicas": "1", "cpus": 0.5, "ingress_cpus": 0.1},
                }
            ]
        }

    serve_deploy(ray_session, config(old), tmp_path / "old.yaml")
    deadline = time.time() + 120
    while httpx.get(f"{server['url']}/swap/healthz", timeout=10).status_code != 200 and time.time() < deadline:
        time.sleep(0.5)
    (pid,) = alive_replica_pids("swap")
    stop, seen = threading.Event(), {i: [] for i in range(4)}

    def client(i: int) -> None:
        with httpx.Client(base_url=server["url"], timeout=30) as http:
            while not stop.is_set():
                answer = http.post("/swap/colorize", files={"image": ("o.png", outline)}, data={"color": "red"})
                got = np.asarray(Image.open(io.BytesIO(answer.content))) if answer.status_code == 200 else None
                seen[i].append(
                    next(
                        (name for name, want in painted.items() if got is not None and np.array_equal(got, want)),
                        answer.status_code,
                    )
                )

    clients = [threading.Thread(target=client, args=(i,)) for i in seen]
    try:
        for thread in clients:
            thread.start()
        time.sleep(3)
        serve_deploy(ray_session, config(new), tmp_path / "new.yaml")  # the redeploy: only user_config changed
        deadline = time.time() + 60
        while not all(answers and answers[-1] == "new" for answers in seen.values()) and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
        swapped_in_place = alive_replica_pids("swap") == {pid}
        serve.delete("swap")
    for answers in seen.values():  # every answer is the old model's, then the new one's: none failed, none went back
        assert answers and set(answers) <= {"old", "new"}, answers
        assert answers == sorted(answers, key=["old", "new"].index) and answers[0] == "old" and answers[-1] == "new"
    assert swapped_in_place, "the replica was restarted, not reconfigured"


def test_the_metrics_reach_rays_prometheus_endpoint(server, outline, metrics_port):
    with httpx.Client(base_url=server["url"], timeout=30) as client:
        assert client.post("/colorize", files={"image": ("o.png", outline)}, data={"color": "teal"}).status_code == 200
        assert (
            client.post("/colorize", files={"image": ("o.png", outline)}, data={"color": "no such colour"}).status_code
            == 422
        )
        assert client.post("/colorize", files={"image": ("o.png", b"junk")}, data={"color": "red"}).status_code == 422
    wanted = [
        r'ray_polycolor_requests_total\{[^}]*outcome="2xx"[^}]*\} [1-9]',
        r'ray_polycolor_requests_total\{(?=[^}]*outcome="4xx")(?=[^}]*reason="unknown_colour")[^}]*\} [1-9]',
        r'ray_polycolor_requests_total\{(?=[^}]*outcome="4xx")(?=[^}]*reason="invalid")[^}]*\} [1-9]',
        r"ray_polycolor_unknown_colours_total\{[^}]*\} [1-9]",
        r'ray_polycolor_batch_size_bucket\{[^}]*le="1(\.0)?"[^}]*\} [1-9]',
        r'ray_polycolor_model_seconds_count\{[^}]*deployment="Model"[^}]*\} [1-9]',  # the model runs in its deployment,
        r'ray_polycolor_decode_seconds_count\{[^}]*deployment="Ingress"[^}]*\} [1-9]',  # the codecs in the ingress
    ]
    deadline, missing = time.time() + 60, wanted
    while missing and time.time() < deadline:
        time.sleep(1)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        missing = [pattern for pattern in wanted if not re.search(pattern, text)]
    assert not missing, f"not exported within 60 s: {missing}"
    dashboard = json.loads((Path(__file__).parents[1] / "cluster" / "grafana-polycolor.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"ray_polycolor_\w+", target["expr"])
    }
    assert (
        len(dashboard["panels"]) == 6 and queried and all(re.search(rf"^{name}\{{", text, re.M) for name in queried)
    ), queried


def test_schemathesis_finds_nothing_in_the_declared_contract(server, tmp_path):
    """S8: an OpenAPI-driven fuzzer (schemathesis) with 100 examples per operation, every check but positive-data
    acceptance (random bytes as an image cannot be accepted), finds nothing: every status and body is declared,
    invalid data is refused (413 counts: an array over the image limit is too large), 405 carries Allow."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[checks]\npositive_data_acceptance.enabled = false\n\n[checks.negative_data_rejection]\n"
        'expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]\n'
    )
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(config),
        "--no-color",
        "run",
        f"{server['url']}/openapi.json",
        "--max-examples",
        "100",
        "--seed",
        "0",
        "--workers",
        "2",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache too
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "4 selected / 4 total" in done.stdout and " passed" in done.stdout


def test_the_contract_declares_both_bodies_and_every_status(server):
    """S8: /openapi.json documents /colorize's multipart and JSON bodies and every status it answers, each error
    with its JSON shape; a method a path does not take gets 405 with Allow."""
    with httpx.Client(base_url=server["url"], timeout=10) as client:
        spec = client.get("/openapi.json").json()
        refused = client.put("/colorize")
    colorize = spec["paths"]["/colorize"]["post"]
    assert set(colorize["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"400", "401", "408", "413", "415", "422", "429", "503"} <= set(colorize["responses"])
    assert colorize["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    assert spec["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    assert refused.status_code == 405 and refused.headers["allow"] == "POST" and refused.json()["error"]


def test_the_docs_page_loads_its_assets_from_the_service(server):
    """S8: /docs works without internet: the page names only the service's own assets, and they are served."""
    with httpx.Client(base_url=server["url"], timeout=10) as client:
        page = client.get("/docs").text
        assets = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert assets and all(a.startswith("/docs/assets/") for a in assets), assets
        assert all(client.get(a).status_code == 200 for a in assets)


def test_a_bad_checkpoint_is_refused_and_the_old_serves(ray_session, server, outline, tmp_path):
    """C5: redeploying with a checkpoint that does not load (a typo, a half-written one) under load: no request
    fails, the old checkpoint keeps answering, the same replica goes on, /healthz says why, and the replica's
    log says so."""
    import threading

    from ray import serve

    good = str(server["checkpoint"])
    half = tmp_path / "half"
    shutil.copytree(good, half)
    (half / "model.safetensors").write_bytes((half / "model.safetensors").read_bytes()[:500])

    def deploy(checkpoint: str) -> None:  # as a user redeploys: only the Model deployment's user_config changes
        model = {"name": "Model", "user_config": {"checkpoint": checkpoint}}
        serve_deploy(
            ray_session,
            {
                "applications": [
                    {
                        "name": "swapbad",
                        "route_prefix": "/swapbad",
                        "import_path": "polycolor.serve:build_app",
                        "deployments": [model],
                        "args": {"cpus": 0.25, "ingress_cpus": 0.1},
                    }
                ]
            },
            tmp_path / "app.yaml",
        )

    deploy(good)
    deadline = time.time() + 120
    while httpx.get(f"{server['url']}/swapbad/healthz", timeout=10).status_code != 200 and time.time() < deadline:
        time.sleep(0.5)
    expected = np.asarray(
        Colorizer.from_checkpoint(good, device="cpu").colorize(Image.open(io.BytesIO(outline)), "red")
    )
    (pid,) = alive_replica_pids("swapbad")
    stop, answers = threading.Event(), []

    def client() -> None:
        with httpx.Client(base_url=server["url"], timeout=30) as http:
            while not stop.is_set():
                answer = http.post("/swapbad/colorize", files={"image": ("o.png", outline)}, data={"color": "red"})
                answers.append(
                    answer.status_code
                    if answer.status_code != 200
                    else np.asarray(Image.open(io.BytesIO(answer.content)))
                )

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for bad in (str(tmp_path / "no-such-checkpoint"), str(half)):
            deploy(bad)
            deadline, health = time.time() + 60, {}
            while bad not in str(health.get("swap_error")) and time.time() < deadline:
                time.sleep(0.5)
                health = httpx.get(f"{server['url']}/swapbad/healthz", timeout=30).json()
            assert (
                health["checkpoint"] == good and bad in health["swap_error"] and "still serves" in health["swap_error"]
            ), health
        time.sleep(1)
    finally:
        stop.set()
        thread.join()
        same_replica = alive_replica_pids("swapbad") == {pid}
        serve.delete("swapbad")
    assert answers and all(not isinstance(a, int) and np.array_equal(a, expected) for a in answers)
    assert same_replica
    logs = Path("/tmp/ray/session_latest/logs/serve")
    assert any(
        f"checkpoint {tmp_path / 'no-such-checkpoint'} was refused" in f.read_text(errors="replace")
        for f in logs.glob("replica_swapbad_Model_*.log")
    )


def test_hostile_images_inside_the_limits_cost_bounded_memory(server, outline):
    """S7: hostile shapes and sizes inside (and just outside) every documented limit, at Serve's defaults: each
    answered within 10 s, a 4xx JSON when refused, with the ingress replica growing far less than 512 MB (it
    drove 20.8 GB before outlines were made without the letterboxed square), and the server healthy after."""
    import threading

    from ray import serve

    serve.run(
        application(ServeConfig(checkpoint=str(server["checkpoint"]), cpus=0.25, ingress_cpus=0.1)),
        name="hostile",
        route_prefix="/hostile",
    )
    try:
        (ingress,) = [psutil.Process(a.pid) for a in live_actors() if a.class_name == "ServeReplica:hostile:Ingress"]

        def outline_png(width: int, height: int) -> bytes:  # a rectangle outline the size of the image, a few kB of PNG
            image = Image.new("1", (width, height), 1)
            ImageDraw.Draw(image).rectangle((0, 0, width - 1, height - 1), outline=0)
            return png_bytes(image)

        def sent(images: list[bytes], original: bool = False) -> dict:
            return {
                "files": [("image", (f"{i}.png", data)) for i, data in enumerate(images)],
                "data": {"color": "red"} | ({"size": "original"} if original else {}),
            }

        battery = {  # label -> (request, statuses expected)
            "65536x256 (over --max-side)": (sent([bomb_png(65536, 256)]), {413}),
            "1x16777216 (over --max-side)": (sent([bomb_png(1, 16_777_216)]), {413}),
            "4096x4096, the largest accepted": (sent([outline_png(4096, 4096)]), {200}),
            "4096x1": (sent([outline_png(4096, 1)], original=True), {200}),
            "1x4096": (sent([outline_png(1, 4096)], original=True), {200}),
            "4096x2, at its own size": (sent([outline_png(4096, 2)], original=True), {200}),
            "sixteen 4096x4096": (sent([outline_png(4096, 4096)] * 16), {200}),
            "0x128": (sent([bomb_png(0, 128)]), {422}),
        }
        idle, peak, done = ingress.memory_info().rss, [0], threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], ingress.memory_info().rss)
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with httpx.Client(base_url=server["url"], timeout=60) as client:
                for label, (request, statuses) in battery.items():
                    answer = client.post("/hostile/colorize", **request)
                    assert answer.status_code in statuses, (label, answer.status_code, answer.text[:200])
                    assert answer.elapsed.total_seconds() < 10, label
                    if answer.status_code >= 400:
                        assert answer.json()["error"], label
                healthy = client.get("/hostile/healthz").status_code
        finally:
            done.set()
            watcher.join()
        assert healthy == 200
        assert peak[0] - idle < 512 * 2**20, f"the ingress grew {(peak[0] - idle) / 2**20:.0f} MB"
    finally:
        serve.delete("hostile")
