"""Ray Serve deployment of a checkpoint: an HTTP colorize endpoint with batching, limits and clear errors.

    python -m polycolor.serve --checkpoint runs/first/best [--host 127.0.0.1] [--port 8000] [--replicas 1] [--gpu]
    serve run polycolor.serve:build_app checkpoint=runs/first/best

HTTP surface (nothing else; other methods get 405, other paths 404):
    POST /colorize   multipart form (image file, color) or JSON {"image": base64, "color": ...} -> image/png
    GET  /colors     palette, conditioning mode, whether any CSS name / hex (or, in text mode, any phrase) works
    GET  /healthz    200 when a tiny forward pass succeeds
    GET  /docs       OpenAPI page (its schema at /openapi.json)
    GET  /           demo page
Every client error is a 4xx with a JSON body {"error": "..."} that names the problem.
"""

import argparse
import asyncio
import base64
import binascii
import hmac
import html
import io
import json
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from polycolor import checkpoint
from polycolor.colors import LEXICON
from polycolor.config import Settings, add_flags, setting
from polycolor.data import outline_array
from polycolor.predict import Colorizer

ACCEPTED_FORMATS = ("PNG", "JPEG")
HEALTH_TIMEOUT_S = 10  # a probe queues behind at most the batch in progress (well under a second on CPU)


@dataclass
class ServeConfig(Settings):
    """A deployment's settings: ``serve run`` arguments, a Serve config file's ``args`` and main()'s flags."""

    checkpoint: str = setting("", "checkpoint directory or URI (e.g. runs/NAME/best)")
    replicas: int = setting(1, "replicas of the model", lambda v: v >= 1, ">= 1")
    gpu: bool = setting(False, "one GPU per replica")
    max_body_mb: float = setting(10.0, "request body limit in MiB (413 above it)", lambda v: v > 0, "> 0")
    max_pixels: int = setting(4096 * 4096, "largest accepted image, in pixels (413 above it)", lambda v: v >= 1, ">= 1")
    max_batch_size: int = setting(16, "requests the model runs together", lambda v: v >= 1, ">= 1")
    batch_wait_s: float = setting(0.005, "how long a batch waits to fill", lambda v: v >= 0, ">= 0")
    max_ongoing_requests: int = setting(64, "requests a replica takes at once; more are queued", lambda v: v >= 1, ">= 1")
    max_queued_requests: int = setting(256, "queued requests beyond which clients get 503", lambda v: v >= 1, ">= 1")
    max_new_phrases_per_s: float = setting(20.0, "per client: phrases that need an encoder run (text mode; 429 beyond)", lambda v: v > 0, "> 0")

    @classmethod
    def from_args(cls, args: dict) -> "ServeConfig":
        """From ``serve run ... key=value`` strings or a config file's ``args``; unknown keys are refused."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(args) - set(known)
        if unknown:
            raise ValueError(f"unknown argument(s) {sorted(unknown)}; expected some of {sorted(known)}")
        casts = {int: int, float: float, bool: lambda v: str(v).lower() in ("1", "true", "yes"), str: str}
        return cls(**{k: casts[known[k]](v) for k, v in args.items()})


DEFAULTS = ServeConfig()


class PhraseBudget:
    """A token bucket per client for phrases that cost an encoder run: ``rate`` a second, as many at once, so
    a client sending new phrases faster pays for a refusal, not an encoder run. At most ``clients`` are
    remembered, the least recently seen forgotten first."""

    def __init__(self, rate: float, clients: int = 10_000, clock=time.monotonic):
        self.rate, self.clients, self.clock = rate, clients, clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when counted)

    def take(self, client: str) -> bool:
        now = self.clock()
        tokens, when = self.buckets.pop(client, (self.rate, now))
        tokens = min(self.rate, tokens + (now - when) * self.rate)
        self.buckets[client] = (tokens - (tokens >= 1), now)
        while len(self.buckets) > self.clients:
            self.buckets.popitem(last=False)
        return tokens >= 1


class ClientError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


app = FastAPI(title="polycolor", description="Colour polygon outlines by colour name.", redoc_url=None, swagger_ui_oauth2_redirect_url=None)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    messages = {404: f"no such path {request.url.path!r}; see /docs", 405: f"method {request.method} is not allowed on {request.url.path}"}
    return error(exc.status_code, messages.get(exc.status_code, str(exc.detail)))


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(422, "request does not match the documented form; see /docs")


@app.exception_handler(Exception)
async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    return error(500, "internal error; the request was not processed")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> a loaded PIL image, refusing non-PNG/JPEG, oversized and truncated images before decoding."""
    if not data:
        raise ClientError(422, "image is empty; expected a PNG or JPEG file")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:  # Pillow's own cap, far above ours: refused from the header alone
        raise ClientError(413, f"image declares more pixels than Pillow will open; the limit is {max_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ClientError(422, "image is not a PNG or JPEG that can be read") from None
    if image.format not in ACCEPTED_FORMATS:
        raise ClientError(415, f"image format {image.format} is not accepted; expected PNG or JPEG")
    width, height = image.size
    if width * height > max_pixels:
        raise ClientError(413, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError):
        raise ClientError(422, "image is truncated or corrupt") from None
    return image


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_request(request: Request, limit: int) -> tuple[bytes, object, bool]:
    """(image bytes, colour, original size?) from a multipart form or a JSON body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limit)
    if content_type == "application/json":
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ClientError(400, "body is not valid JSON") from None
        except RecursionError:  # json nests in Python's stack: thousands of brackets exhaust it
            raise ClientError(400, "body is JSON nested too deeply") from None
        if not isinstance(payload, dict):
            raise ClientError(422, 'JSON body must be an object {"image": "<base64>", "color": "..."}')
        encoded = payload.get("image")
        if not isinstance(encoded, str):
            raise ClientError(422, 'field "image" is missing or not a base64 string')
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ClientError(400, 'field "image" is not valid base64') from None
        colour = payload.get("color", payload.get("colour"))
        size = payload.get("size", "model")
    elif content_type == "multipart/form-data":
        request._body = body  # let Starlette parse what was already read under the limit
        try:
            form = await request.form(max_files=2, max_fields=8)
        except Exception:  # python-multipart raises several types for malformed bodies
            raise ClientError(400, "body is not a valid multipart form") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ClientError(422, 'form field "image" is missing or not a file')
        data = await upload.read()
        colour = form.get("color", form.get("colour"))
        size = form.get("size", "model")
    else:
        raise ClientError(415, f"content type {content_type or 'none'!r} is not accepted; send multipart/form-data or application/json")
    if colour is None:
        raise ClientError(422, 'field "color" is missing; expected a name, #hex or rgb(r, g, b)')
    if size not in ("model", "original"):
        raise ClientError(422, f'field "size" must be "model" or "original", got {str(size)[:20]!r}')
    return data, colour, size == "original"


def demo_page(colorizer: Colorizer) -> str:
    """The demo (static/demo.html): pick a real shape (drawn here, no dataset needed) or upload one, pick a colour."""
    from polycolor.synth import REAL_SHAPES, draw_outline, shape_points

    rng = np.random.default_rng(0)
    options = []
    for name in REAL_SHAPES:
        ink = draw_outline(shape_points(name, rng) * 40 + 64, 2, 128)
        buffer = io.BytesIO()
        Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
        options.append(f'<option value="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">{name}</option>')
    described = colorizer.model.condition.advertise(colorizer.palette)  # completions: every name it accepts
    accepted = set(described["palette"]) | {name for name, _ in LEXICON.values()} if described["lexicons"] else set(described["vocabulary"])
    names = "".join(f'<option value="{html.escape(n)}">' for n in sorted(accepted))  # a checkpoint's names: escaped
    return DEMO_HTML.read_text().replace("{{SHAPES}}", "".join(options)).replace("{{NAMES}}", names)


DEMO_HTML = Path(__file__).with_name("static") / "demo.html"


def authorized(request: Request) -> bool:
    key = os.environ.get("POLYCOLOR_API_KEY")
    given = request.headers.get("authorization", "")
    return not key or hmac.compare_digest(given.encode(), f"Bearer {key}".encode())


@serve.deployment(name="Colorizer", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(app)
class ColorizeService:
    def __init__(self, config: dict):
        self.cfg = ServeConfig(**config)
        self.colorizer = Colorizer.from_checkpoint(self.cfg.checkpoint, device="cuda" if self.cfg.gpu else "cpu")
        self.colorizer.model.condition.check_serving(load=True)  # a text encoder loads now, not on the first new phrase
        self.limit = int(self.cfg.max_body_mb * 1024 * 1024)
        self.colorize_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.colorize_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_s)
        self.page = demo_page(self.colorizer)
        self.probe = self.colorizer.condition([next(iter(self.colorizer.model.cfg.vocabulary), "red")])
        self.batch_sizes: list[int] = []  # recent batch sizes, for /healthz and the tests
        # One model thread: serve.batch runs one batch at a time, and the event loop stays free for HTTP.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        # One decode thread: the event loop never decodes, and at most one full-size image is held at a time.
        self.decode_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self.budget = PhraseBudget(self.cfg.max_new_phrases_per_s)  # used on the decode thread only

    @serve.batch(max_batch_size=DEFAULTS.max_batch_size, batch_wait_timeout_s=DEFAULTS.batch_wait_s)
    async def colorize_batch(self, items: list[tuple[np.ndarray, torch.Tensor]]) -> list[np.ndarray]:
        """The Colorizer runs a batch in chunks of its own batch size (8 on CPU): faster per image than whole
        large batches, and the allocator sees at most eight tensor sizes, so memory stays flat under load."""
        self.batch_sizes = (self.batch_sizes + [len(items)])[-100:]
        outlines = np.stack([outline for outline, _ in items])
        cond = torch.stack([c for _, c in items])
        return list(await asyncio.get_running_loop().run_in_executor(self.model_thread, self.colorizer.colorize_arrays, outlines, cond))

    def prepare(self, data: bytes, colour: object, client: str) -> tuple[tuple[int, int], np.ndarray, torch.Tensor]:
        """(image size, outline at the model's size, the colour's condition): all a request keeps of its image."""
        if self.over_budget(colour, client):
            raise ClientError(429, f"more than {self.cfg.max_new_phrases_per_s:g} new phrases a second from this client; "
                                   "retry in a second, or send names the lexicons know (see /colors)", {"Retry-After": "1"})  # fmt: skip
        image = decode_image(data, self.cfg.max_pixels)
        try:
            cond = self.colorizer.condition([colour])[0]
        except ValueError as err:
            raise ClientError(422, str(err)) from None
        return image.size, outline_array(image, self.colorizer.image_size), cond

    def over_budget(self, colour: object, client: str) -> bool:
        try:
            costly = self.colorizer.model.condition.costly(colour, self.colorizer.palette)
        except ValueError:
            return False  # refused with the others, after the image is checked
        return costly and not self.budget.take(client)

    async def check_health(self) -> None:
        """A tiny forward pass on the model thread, the path requests take: a wedged thread fails the check
        (Serve then replaces the replica), where a pass on the event loop would have passed and blocked HTTP."""
        blank = np.zeros((1, self.colorizer.image_size, self.colorizer.image_size), bool)
        probe = self.model_thread.submit(self.colorizer.colorize_arrays, blank, self.probe)
        try:
            await asyncio.wait_for(asyncio.wrap_future(probe), HEALTH_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(f"the model thread did not answer a health probe within {HEALTH_TIMEOUT_S} s") from None

    @app.post("/colorize", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def colorize(self, request: Request) -> Response:
        """Multipart `image` (PNG/JPEG) + `color`, or JSON {"image": base64, "color": ...}; optional `size=original`."""
        if not authorized(request):
            return error(401, "missing or wrong API key; send Authorization: Bearer <key>")
        try:
            data, colour, original = await parse_request(request, self.limit)
            client = request.client.host if request.client else "unknown"
            size, outline, cond = await asyncio.get_running_loop().run_in_executor(self.decode_thread, self.prepare, data, colour, client)
        except ClientError as err:
            return error(err.status, err.message, err.headers)
        del data  # the body is not needed past decoding
        result = Image.fromarray(await self.colorize_batch((outline, cond)))
        if original:
            result = result.resize(size, Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        result.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    @app.get("/colors")
    async def colors(self, request: Request) -> JSONResponse:
        if not authorized(request):
            return error(401, "missing or wrong API key; send Authorization: Bearer <key>")
        return JSONResponse(self.colorizer.model.condition.advertise(self.colorizer.palette))

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            await self.check_health()
        except RuntimeError as err:
            return error(503, str(err))
        return JSONResponse({"status": "ok", "recent_batch_sizes": self.batch_sizes[-20:]})

    @app.get("/", response_class=HTMLResponse)
    async def index(self) -> HTMLResponse:
        return HTMLResponse(self.page)



def build_app(args: dict):
    """The one application builder: `serve run polycolor.serve:build_app checkpoint=...`, config files, main()."""
    cfg = ServeConfig.from_args(dict(args))
    if not cfg.checkpoint:
        raise ValueError("build_app needs checkpoint=PATH")
    # Fail start-up here, naming the file (or the missing extra), not in every replica; a half-written
    # checkpoint in a bucket fails its hash check here too.
    checkpoint.load(cfg.checkpoint).model.condition.check_serving(load=False)
    return ColorizeService.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": 1, "num_gpus": 1 if cfg.gpu else 0},
    ).bind(asdict(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m polycolor.serve", description="Serve a checkpoint over HTTP with Ray Serve.")
    add_flags(p, ServeConfig)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--request-timeout-s", type=float, default=30.0, help="408 after this long (default: 30)")
    args = p.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if hasattr(args, f.name)}
    if "checkpoint" not in given:
        p.error("--checkpoint is required")
    try:
        application = build_app(given)
    except (checkpoint.CheckpointError, ImportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", num_cpus=None if os.environ.get("RAY_ADDRESS") else max(2, os.cpu_count() or 2))
    try:
        serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout_s})
        serve.run(application, name="polycolor", route_prefix="/")
        print(f"[serve] http://{args.host}:{args.port}/  (docs at /docs); Ctrl-C to stop", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    except KeyboardInterrupt:  # Ctrl-C while it was starting: stop the same way, without a traceback
        pass
    serve.shutdown()
    ray.shutdown()
    print("[serve] stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
