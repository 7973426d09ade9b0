"""Ray Serve: the real deployment on the session's local Ray, driven over loopback HTTP with httpx."""

import asyncio
import base64
import io
import json
import os
import re
import signal
import struct
import time
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from polycolor import synth
from polycolor.data import REAL_PALETTE
from polycolor.predict import Colorizer
from polycolor.serve import Model, PhraseBudget, ServeConfig, application

from conftest import free_port, png_bytes

pytestmark = pytest.mark.timeout(300)
sys.set_int_max_str_digits(0)  # the fuzzer sends integers of any size
LIMIT_MB = 0.25
REQUEST_TIMEOUT_S = 6  # the proxy's end-to-end limit: a request still unanswered gets 408


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    from polycolor import checkpoint

    from conftest import tiny_model

    path = checkpoint.write(tmp_path_factory.mktemp("serve") / "ckpt", tiny_model(), REAL_PALETTE)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
    cfg = ServeConfig(checkpoint=str(path), max_body_mb=LIMIT_MB, max_pixels=512 * 512, max_batch_size=8, batch_wait_s=0.05, ingress_cpus=0.25)
    serve.run(application(cfg), name="main", route_prefix="/")
    keyed = ServeConfig(checkpoint=str(path), cpus=0.5, ingress_cpus=0.1)  # the ingress checks the key
    serve.run(application(keyed, ingress_options={"ray_actor_options": {"runtime_env": {"env_vars": {"POLYCOLOR_API_KEY": "s3cret"}}}}),
              name="keyed", route_prefix="/keyed")  # fmt: skip
    tight = ServeConfig(checkpoint=str(path), max_batch_size=1, max_ongoing_requests=1, max_queued_requests=1, cpus=0.5, ingress_cpus=0.1)
    serve.run(application(tight), name="tight", route_prefix="/tight")
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "checkpoint": path}
    serve.shutdown()


@pytest.fixture(scope="module")
def outline(ayna=None) -> bytes:
    ink = synth.draw_outline(synth.shape_points("star", np.random.default_rng(0)) * 40 + 64, 2, 128)
    return png_bytes(Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)))


def live_actors() -> list:
    """This session's live actors (an explicit address: a cluster started later must not be asked instead)."""
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000)


def replica_pids() -> set[int]:
    return {a.pid for a in live_actors() if "main" in (a.class_name or "") or "Model" in (a.class_name or "")}


def test_good_request_matches_colorizer_and_json_gives_the_same_png(server, outline):
    with httpx.Client(base_url=server["url"], timeout=30) as client:
        form = client.post("/colorize", files={"image": ("o.png", outline, "image/png")}, data={"color": "teal"})
        body = {"image": base64.b64encode(outline).decode(), "colour": "teal"}
        as_json = client.post("/colorize", json=body)
        again = client.post("/colorize", json=body)
        big = Image.open(io.BytesIO(outline)).resize((300, 200))
        original = client.post("/colorize", json={"image": base64.b64encode(png_bytes(big)).decode(), "colour": "teal", "size": "original"})
    assert form.status_code == 200 and form.headers["content-type"] == "image/png", form.text
    assert form.content == as_json.content == again.content  # deterministic bytes
    colorizer = Colorizer.from_checkpoint(server["checkpoint"], device="cpu")
    expected = colorizer.colorize(Image.open(io.BytesIO(outline)), "teal")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(form.content))), np.asarray(expected))
    at_size = colorizer.colorize(big, "teal", original_size=True)  # the same answer at the input's size, with its edges
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(original.content))), np.asarray(at_size)) and at_size.size == (300, 200)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16", "JPEG", "odd-size"])
def test_every_accepted_variant_gives_a_valid_png(server, outline, mode):
    """S5: every accepted image variant gives a valid PNG, the same bytes each time."""
    image = Image.open(io.BytesIO(outline))
    if mode == "JPEG":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG")
        data = buffer.getvalue()
    elif mode == "odd-size":
        data = png_bytes(image.resize((97, 61)))
    elif mode == "I;16":
        data = png_bytes(Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257))
    else:
        data = png_bytes(image.convert(mode))
    answer = httpx.post(f"{server['url']}/colorize", files={"image": ("x", data)}, data={"color": "#123456", "size": "original"}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert Image.open(io.BytesIO(answer.content)).format == "PNG"


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
    "malformed multipart": dict(content=b"--xx\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=xx"}),
    "malformed base64": dict(json={"image": "!!!not base64!!!", "color": "red"}),
    "GIF instead of PNG": dict(files={"image": ("x.gif", "GIF")}, data={"color": "red"}),
    "colour a 5000-digit number": dict(content=b'{"image": "GOOD64", "color": ' + b"9" * 5000 + b"}", headers={"content-type": "application/json"}),
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
    swap = {"GOOD": outline, "TRUNC": truncated(outline), "GIF": gif.getvalue(), "EMPTY": bomb_png(0, 128), "LONG": bomb_png(65536, 256)}
    out = dict(kwargs)
    if "files" in out:
        files = out["files"].items() if isinstance(out["files"], dict) else out["files"]
        out["files"] = [(k, (name, swap.get(v, v) if isinstance(v, str) else v)) for k, (name, v) in files]
    if "json" in out and out["json"].get("image") == "GOOD64":
        out["json"] = out["json"] | {"image": base64.b64encode(outline).decode()}
    if b"GOOD64" in out.get("content", b""):
        out["content"] = out["content"].replace(b"GOOD64", base64.b64encode(outline))
    return out


def test_malformed_requests_get_named_4xx_and_the_replica_survives(server, outline):
    """S1: malformed requests get a named 4xx within 2 s, and the replica survives."""
    before = replica_pids()
    with httpx.Client(base_url=server["url"], timeout=10) as client:
        for label, kwargs in MALFORMED.items():
            for _ in range(3):
                answer = client.post("/colorize", **realise(kwargs, outline))
                assert 400 <= answer.status_code < 500, (label, answer.status_code, answer.text)
                assert answer.elapsed.total_seconds() < 2, label
                body = answer.json()  # the colour's errors say so: a form can show them beside the colour's field
                assert body["error"] and body == {"error": body["error"]} | ({"field": "color"} if "colour" in label else {}), label
                assert "Traceback" not in answer.text and "/work" not in answer.text and "site-packages" not in answer.text
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
        under = client.post("/colorize", files={"image": ("o.png", padded_png(outline, limit - 1024))}, data={"color": "red"})
        over = client.post("/colorize", files={"image": ("o.png", padded_png(outline, limit + 1))}, data={"color": "red"})

        def chunks():
            for _ in range(limit // 65536 + 4):
                yield b"\0" * 65536

        chunked = client.post("/colorize", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert under.status_code == 200, under.text
    assert over.status_code == 413 and str(limit) in over.json()["error"]
    assert chunked.status_code == 413


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_without_decoding(server, outline):
    """S4: a decompression bomb and an image over our pixel cap get 413 naming the limit, undecoded."""
    with httpx.Client(base_url=server["url"], timeout=10) as client:
        bomb = client.post("/colorize", files={"image": ("b.png", bomb_png(100_000, 100_000))}, data={"color": "red"})
        ours = client.post("/colorize", files={"image": ("b.png", bomb_png(1000, 1000))}, data={"color": "red"})  # under Pillow's cap
        near = client.post("/colorize", files={"image": ("o.png", png_bytes(Image.new("L", (512, 512), 255)))}, data={"color": "red"})
    assert bomb.status_code == 413 and "limit is 262144" in bomb.json()["error"]
    assert ours.status_code == 413 and ours.json()["error"] == "image is 1000x1000 = 1000000 pixels; the limit is 262144"
    assert near.status_code == 200  # exactly at the cap


def test_fifty_concurrent_requests_succeed_in_batches(server, outline):
    """L4: a bounded burst of concurrent valid requests all succeed, batched (L4's p95 budget is checked in bench/serve_load.py, memory and leaks in bench/serve_soak.py)."""
    async def fire():
        async with httpx.AsyncClient(base_url=server["url"], timeout=60) as client:
            return await asyncio.gather(*(client.post("/colorize", files={"image": ("o.png", outline)}, data={"color": "red"}) for _ in range(50)))

    answers = asyncio.run(fire())
    assert [a.status_code for a in answers] == [200] * 50
    assert len({a.content for a in answers}) == 1
    sizes = httpx.get(f"{server['url']}/healthz").json()["recent_batch_sizes"]
    assert max(sizes) > 1


def test_backpressure_answers_the_excess_with_503_before_the_held_requests_finish(server, outline):
    """L1: past the replica's ongoing and queued limits the excess gets 503 at once; the held requests are right."""
    big = png_bytes(Image.open(io.BytesIO(outline)).resize((512, 512)))
    expected = png_bytes(Colorizer.from_checkpoint(server["checkpoint"], device="cpu").colorize(Image.open(io.BytesIO(big)), "red"))

    async def timed(client):
        start = time.perf_counter()
        answer = await client.post("/tight/colorize", files={"image": ("o.png", big)}, data={"color": "red"})
        return answer, time.perf_counter() - start

    async def fire():
        async with httpx.AsyncClient(base_url=server["url"], timeout=60) as client:
            return await asyncio.gather(*(timed(client) for _ in range(24)))

    answers = asyncio.run(fire())
    refused, served = [t for a, t in answers if a.status_code == 503], [(a, t) for a, t in answers if a.status_code == 200]
    assert len(refused) + len(served) == 24 and refused and served
    assert all(a.content == expected for a, _ in served)  # the held requests are answered, and right
    assert max(refused) < max(t for _, t in served)  # the excess is not made to wait for them


def test_api_key_is_enforced_when_set(server, outline):
    url = f"{server['url']}/keyed/colorize"
    files, data = {"image": ("o.png", outline)}, {"color": "red"}
    assert httpx.post(url, files=files, data=data).status_code == 401
    assert httpx.post(url, files=files, data=data, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url, files=files, data=data, headers={"authorization": "Bearer s3cret"}, timeout=30).status_code == 200


def test_colors_healthz_docs_and_demo_page(server):
    with httpx.Client(base_url=server["url"], timeout=10) as client:
        colors = client.get("/colors").json()
        assert colors["palette"]["green"] == [0, 255, 0] and colors["any_css_name_or_hex"] is True
        assert colors["lexicons"] == ["palette", "css", "xkcd"] and "very" in colors["modifiers"]
        assert client.get("/healthz").json()["status"] == "ok"
        assert "openapi" in client.get("/docs").text.lower()
        page = client.get("/").text
        assert 'id="overlay"' in page and '<option value="navy blue">' in page  # the drawing canvas, completions


def test_listens_on_loopback_only(server):
    """N1: the test server listens on 127.0.0.1 only."""
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == server["port"]]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)


@pytest.mark.slow
@pytest.mark.ray
def test_the_serve_command_listens_on_loopback_by_default(tiny_checkpoint):
    """N1: `python -m polycolor.serve` with no --host, on its own local Ray, answers on 127.0.0.1 and nowhere else."""
    import subprocess
    import sys

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "polycolor.serve", "--checkpoint", str(tiny_checkpoint), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:  # up when it says where (a healthy replica alone is not: the app may still deploy)
            if line.startswith("[serve] http://"):
                break
        assert line.startswith(f"[serve] http://127.0.0.1:{port}/"), line
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "[serve] stopped" in output, output[-2000:]


def test_a_corrupt_checkpoint_stops_the_serve_command_before_anything_starts(tiny_checkpoint, capsys, monkeypatch):
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
    st.none() | st.booleans() | st.integers() | st.sampled_from([10**5000, -(2**64), 1e308]) | st.floats() | st.text(max_size=20),
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
    content_type=st.sampled_from(["", "application/json", "text/plain", "multipart/form-data", "multipart/form-data; boundary=zz", "image/png"]),
    values=st.dictionaries(st.sampled_from(FIELDS), st.one_of(JSON_VALUES, IMAGES.map(encoded)), max_size=4),
    parts=st.lists(st.tuples(st.sampled_from(FIELDS), st.booleans(), st.one_of(IMAGES, st.text(max_size=10).map(str.encode))), max_size=5),
)
def test_fuzzed_requests_never_get_a_5xx(server, image, colour, form, content_type, values, parts):
    """S2: fuzzed requests never get a 5xx, nor an answer outside the declared error shape: any JSON value (numbers of
    any size, nulls, lists, objects) in any field, file parts where text is expected and the reverse, repeated
    fields, images of any aspect ratio and size."""
    if form == "multipart":
        kwargs = {"files": {"image": ("f.png", image)}, "data": {"color": colour}}
    elif form == "json":
        kwargs = {"content": json.dumps({"image": encoded(image), "color": colour}).encode(), "headers": {"content-type": "application/json"}}
    elif form == "json values":
        kwargs = {"content": json.dumps(values).encode(), "headers": {"content-type": "application/json"}}
    elif form == "form parts":  # each part a file or a text field, by any of the names
        kwargs = {"files": [(name, ("p.png", data) if as_file else (None, data)) for name, as_file, data in parts] or [("image", ("p.png", image))]}
    else:
        kwargs = {"content": image + colour.encode("utf-8", "replace"), "headers": {"content-type": content_type}}
    answer = httpx.post(f"{server['url']}/colorize", timeout=30, **kwargs)
    assert answer.status_code < 500, (answer.status_code, answer.text)
    assert answer.elapsed.total_seconds() < 10
    if answer.status_code != 200:
        assert set(answer.json()) <= {"error", "field"} and answer.json()["error"]


def test_an_internal_error_gives_a_generic_500_and_the_next_request_works(server, outline):
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

    with deployed("faulty", Faulty, checkpoint=str(server["checkpoint"])) as path, httpx.Client(base_url=server["url"], timeout=30) as client:
        broken = client.post(f"{path}/colorize", files={"image": ("o.png", outline)}, data={"color": "#123456"})
        assert broken.status_code == 500 and broken.json() == {"error": "internal error; the request was not processed"}
        assert "secret" not in broken.text and "Traceback" not in broken.text
        assert client.post(f"{path}/colorize", files={"image": ("o.png", outline)}, data={"color": "red"}).status_code == 200


def test_a_request_over_the_timeout_gets_408_and_leaves_nothing_behind(server, outline):
    """L2: a request over the timeout gets 408, and its work never runs."""
    slow = {"max_batch_size": 64, "batch_wait_s": REQUEST_TIMEOUT_S + 4}  # a lone request waits past the timeout
    with deployed("slow", checkpoint=str(server["checkpoint"]), **slow) as path, httpx.Client(base_url=server["url"], timeout=60) as client:
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
            sends = [client.post("/tight/colorize", files={"image": ("o.png", big)}, data={"color": "red"}) for _ in range(20)]
            return await asyncio.gather(*sends, return_exceptions=True)

    for after_s in (0.05, 0.02, 0.01, 0.005):  # on an idle machine the replica can answer within 50 ms: give up sooner
        dropped = asyncio.run(abandon(after_s))
        if any(isinstance(d, httpx.TimeoutException) for d in dropped):
            break
    assert sum(isinstance(d, httpx.TimeoutException) for d in dropped) > 0
    time.sleep(1)
    with httpx.Client(base_url=server["url"], timeout=30) as client:  # the tight app has one slot and one queue place
        codes = [client.post("/tight/colorize", files={"image": ("o.png", outline)}, data={"color": "red"}).status_code for _ in range(10)]
    assert codes == [200] * 10


@pytest.mark.slow
def test_a_replica_killed_under_load_is_replaced_and_a_retrying_client_always_succeeds(server, outline):
    """L5: a replica killed under load is replaced; a retrying client always succeeds."""
    with deployed("victim", checkpoint=str(server["checkpoint"])) as path, httpx.Client(base_url=server["url"], timeout=30) as client:
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
def test_the_health_check_catches_a_wedged_model_and_the_replica_is_replaced(server, outline, tmp_path):
    """L6: the health check catches a wedged model and Serve replaces the replica."""
    marker = tmp_path / "wedged"

    class Wedgeable(Model.func_or_class):  # while ``marker`` exists, the model's forward hangs
        async def __init__(self, config):
            super().__init__(config)
            forward = self.served.colorizer.model.forward

            def maybe_wedged(*args, **kwargs):
                while marker.exists():
                    time.sleep(0.1)
                return forward(*args, **kwargs)

            self.served.colorizer.model.forward = maybe_wedged

    wedge_and_see_the_replica_replaced("wedge", Wedgeable, {"health_check_period_s": 1, "health_check_timeout_s": 3}, marker, server, outline, 90)


def wedge_and_see_the_replica_replaced(name: str, cls, checks: dict, marker, server, outline, within_s: int) -> None:
    """Deploy ``cls``, wedge it by creating ``marker``: Serve's health check must replace the replica within
    ``within_s``; once ``marker`` is gone, the application answers again."""
    with deployed(name, cls, checks, checkpoint=str(server["checkpoint"])) as path, httpx.Client(base_url=server["url"], timeout=30) as client:
        (first,) = alive_replica_pids(name)
        marker.touch()
        deadline = time.time() + within_s
        while first in alive_replica_pids(name) and time.time() < deadline:
            time.sleep(1)
        assert first not in alive_replica_pids(name), f"the wedged replica of {name} was never replaced"
        marker.unlink()
        assert post_with_retries(client, f"{path}/colorize", outline, tries=120).status_code == 200


@pytest.mark.slow
def test_a_wedged_model_thread_fails_the_health_check_and_the_replica_is_replaced(server, outline, tmp_path):
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

    # Wedged, /colorize hangs while a forward pass on the event loop would still succeed: the probe must take the thread.
    wedge_and_see_the_replica_replaced("thread", WedgeableThread, {"health_check_period_s": 1, "health_check_timeout_s": 30}, marker, server, outline, 120)


def test_the_phrase_budget_refuses_a_client_past_its_rate_and_no_other():
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


def test_several_outlines_in_one_request_come_back_in_order_with_an_error_for_each_bad_one(server, outline):
    other = png_bytes(Image.open(io.BytesIO(outline)).transpose(Image.Transpose.FLIP_TOP_BOTTOM).resize((90, 70)))
    colorizer = Colorizer.from_checkpoint(server["checkpoint"], device="cpu")
    expected = [np.asarray(colorizer.colorize(Image.open(io.BytesIO(data)), colour)) for data, colour in ((outline, "teal"), (other, "red"))]
    b64 = [base64.b64encode(data).decode() for data in (outline, other)]
    with httpx.Client(base_url=server["url"], timeout=30) as client:
        files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate((outline, other, b"junk"))]
        form = client.post("/colorize", files=files, data={"color": ["teal", "red", "blue"]})
        as_json = client.post("/colorize", json={"image": [*b64, "%%%"], "color": ["teal", "red", "blue"]})
        unknown = client.post("/colorize", json={"image": b64, "color": "no such colour"})
        too_many = client.post("/colorize", json={"image": b64[:1] * 17, "color": "red"})
        too_many_files = client.post("/colorize", files=[("image", ("o.png", outline, "image/png"))] * 40, data={"color": "red"})
        mismatched = client.post("/colorize", json={"image": b64, "color": ["red", "blue", "green"]})
        single = client.post("/colorize", json={"image": b64[0], "color": "teal"})
    assert form.status_code == 200 and form.headers["content-type"] == "application/json", form.text
    items = form.json()
    for item, want in zip(items, expected):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(item["image"])))), want)
    assert items[2] == {"error": "image is not a readable PNG or JPEG", "status": 422}
    assert as_json.json()[:2] == items[:2] and as_json.json()[2] == {"error": 'field "image" is not valid base64', "status": 400}
    assert [i["status"] for i in unknown.json()] == [422, 422] and "unknown colour 'no such colour'" in unknown.json()[0]["error"]
    assert too_many.status_code == 413 and too_many.json() == {"error": "17 images in one request; the limit is 16"}
    assert too_many_files.status_code == 413 and "the limit is 16" in too_many_files.json()["error"]
    assert mismatched.status_code == 422 and "2 images and 3 colours" in mismatched.json()["error"]
    assert single.headers["content-type"] == "image/png"  # one image: a PNG, as before


def running_replicas(app_name: str, deployment: str = "Model") -> int:
    from ray import serve

    return serve.status().applications[app_name].deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_autoscaling_grows_to_two_replicas_under_load_and_shrinks_back_after(server, outline):
    import threading

    cfg = {"replicas": "1-2", "ingress_replicas": "2", "target_ongoing_requests": 1.0, "upscale_delay_s": 1.0, "downscale_delay_s": 3.0, "batch_wait_s": 0.05}
    with deployed("elastic", checkpoint=str(server["checkpoint"]), **cfg) as path:
        assert running_replicas("elastic") == 1
        stop, statuses = threading.Event(), []

        def client() -> None:  # a bounded load: eight clients, one request in flight each
            with httpx.Client(base_url=server["url"], timeout=30) as http:
                while not stop.is_set():
                    statuses.append(http.post(f"{path}/colorize", files={"image": ("o.png", outline)}, data={"color": "red"}).status_code)

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
    """``serve deploy`` of ``config`` to the session's Ray, as a user or the KubeRay operator does (the REST API, token auth)."""
    import subprocess
    import sys

    import yaml

    where.write_text(yaml.safe_dump(config))
    address = f"http://{ray_session._private.worker._global_node.webui_url}"
    done = subprocess.run([Path(sys.executable).with_name("serve"), "deploy", str(where), "--address", address],
                          env=os.environ | {"RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_a_new_checkpoint_is_swapped_in_under_load_with_no_failed_request_and_no_restart(ray_session, server, outline, tmp_path):
    import threading

    from ray import serve

    from polycolor import checkpoint

    from conftest import tiny_model

    old = server["checkpoint"]
    new = checkpoint.write(tmp_path / "new", tiny_model(), REAL_PALETTE | {"red": (0, 128, 0)})  # "red" now paints green
    image = Image.open(io.BytesIO(outline))
    painted = {name: np.asarray(Colorizer.from_checkpoint(path, "cpu").colorize(image, "red")) for name, path in (("old", old), ("new", new))}
    assert not np.array_equal(painted["old"], painted["new"])

    def config(path: Path) -> dict:  # cluster/serve.yaml's shape: the checkpoint in the deployment's user_config
        colorizer = {"name": "Model", "user_config": {"checkpoint": str(path)}}
        return {"applications": [{"name": "swap", "route_prefix": "/swap", "import_path": "polycolor.serve:build_app",
                                  "deployments": [colorizer], "args": {"replicas": "1", "cpus": 0.5, "ingress_cpus": 0.1}}]}  # fmt: skip

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
                seen[i].append(next((name for name, want in painted.items() if got is not None and np.array_equal(got, want)), answer.status_code))

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
        assert client.post("/colorize", files={"image": ("o.png", outline)}, data={"color": "no such colour"}).status_code == 422
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
    queried = {name for panel in dashboard["panels"] for target in panel["targets"] for name in re.findall(r"ray_polycolor_\w+", target["expr"])}
    assert len(dashboard["panels"]) == 6 and queried and all(re.search(rf"^{name}\{{", text, re.M) for name in queried), queried
