"""Ray Serve application of a checkpoint: an HTTP colorize endpoint with batching, limits and clear errors.

Two deployments, each scaling on its own: ``Ingress`` (HTTP, key, parsing, image decoding and PNG encoding, on
CPUs) calls ``Colorizer`` (the checkpoint, colour parsing and batched model passes, on a GPU with --gpu)
through a DeploymentHandle.

    python -m polycolor.serve --checkpoint runs/first/best [--host 127.0.0.1] [--port 8000] [--replicas 1|auto|MIN-MAX]
                              [--ingress-replicas 1|auto|MIN-MAX] [--gpu]
    serve run polycolor.serve:build_app checkpoint=runs/first/best

HTTP surface (nothing else; other methods get 405, other paths 404):
    POST /colorize   multipart form (image file, color) or JSON {"image": base64, "color": ...} -> image/png;
                     several images (repeated fields, or a JSON list) -> a JSON list of base64 PNGs or per-item errors
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
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from polycolor import checkpoint
from polycolor.colors import LEXICON
from polycolor.config import Settings, add_flags, setting
from polycolor.data import outline_of
from polycolor.predict import Colorizer, encode_png, read_ink
from polycolor.runs import init_ray

ACCEPTED_FORMATS = ("PNG", "JPEG")
HEALTH_TIMEOUT_S = 10  # a probe queues behind at most the batch in progress (well under a second on CPU)


@dataclass
class ServeConfig(Settings):
    """A deployment's settings: ``serve run`` arguments, a Serve config file's ``args`` and main()'s flags."""

    checkpoint: str = setting("", "checkpoint directory or URI (e.g. runs/NAME/best)")
    replicas: str = setting("1", "replicas of the model: N; auto (Serve's autoscaling); or MIN-MAX, autoscaling between them",
                            lambda v: replica_range(v) is not None, "a count >= 1, auto, or MIN-MAX with 0 <= MIN <= MAX, MAX >= 1")
    ingress_replicas: str = setting("1", "replicas of the HTTP ingress (decoding, encoding), in the same form; they scale apart from the model's",
                                    lambda v: replica_range(v) is not None, "a count >= 1, auto, or MIN-MAX with 0 <= MIN <= MAX, MAX >= 1")
    cpus: float = setting(1.0, "CPUs each model replica reserves", lambda v: v >= 0, ">= 0")
    ingress_cpus: float = setting(0.0, "CPUs each ingress replica reserves (none by default, as Serve's own HTTP proxy: it never keeps a "
                                       "model replica off a node; a cluster config gives it some)", lambda v: v >= 0, ">= 0")
    target_ongoing_requests: float = setting(2.0, "autoscaling: the requests in progress per replica it aims for", lambda v: v > 0, "> 0")
    upscale_delay_s: float = setting(10.0, "autoscaling: how long load must stay high before a replica is added", lambda v: v >= 0, ">= 0")
    downscale_delay_s: float = setting(120.0, "autoscaling: how long load must stay low before a replica is removed", lambda v: v >= 0, ">= 0")
    gpu: bool = setting(False, "one GPU per replica")
    max_body_mb: float = setting(10.0, "request body limit in MiB (413 above it)", lambda v: v > 0, "> 0")
    max_pixels: int = setting(4096 * 4096, "largest accepted image, in pixels (413 above it)", lambda v: v >= 1, ">= 1")
    max_batch_size: int = setting(16, "requests the model runs together", lambda v: v >= 1, ">= 1")
    batch_wait_s: float = setting(0.005, "how long a batch waits to fill", lambda v: v >= 0, ">= 0")
    max_ongoing_requests: int = setting(64, "requests a replica takes at once; more are queued", lambda v: v >= 1, ">= 1")
    max_queued_requests: int = setting(256, "queued requests beyond which clients get 503", lambda v: v >= 1, ">= 1")
    max_images_per_request: int = setting(16, "outlines one request may carry (413 above it)", lambda v: v >= 1, ">= 1")
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


def replica_range(replicas: str) -> tuple[int, int] | str | None:
    """``replicas`` as (MIN, MAX) (N is N-N), or "auto"; None when it is neither."""
    text = str(replicas).strip()
    if text == "auto":
        return text
    low, _, high = text.partition("-")
    if not low.isdigit() or not (high or low).isdigit():
        return None
    bounds = int(low), int(high or low)
    return bounds if bounds[0] <= bounds[1] and bounds[1] >= 1 and (high or bounds[0] >= 1) else None


def replica_options(replicas: str, cfg: ServeConfig) -> dict:
    """The deployment options for ``replicas``: a fixed count, or an autoscaling config from ``cfg``."""
    wanted = replica_range(replicas)
    if isinstance(wanted, tuple) and wanted[0] == wanted[1]:
        return {"num_replicas": wanted[0]}
    autoscaling = {"target_ongoing_requests": cfg.target_ongoing_requests, "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s}
    if wanted == "auto":
        return {"num_replicas": "auto", "autoscaling_config": autoscaling}
    return {"autoscaling_config": autoscaling | {"min_replicas": wanted[0], "max_replicas": wanted[1], "initial_replicas": max(1, wanted[0])}}


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


REASONS = {400: "malformed", 401: "unauthorized", 408: "timeout", 413: "too_large", 415: "unsupported_type", 422: "invalid", 429: "rate_limited"}


class ClientError(Exception):
    """A 4xx: its status, the message the client reads, a short reason for the metrics (from the status unless
    given, as "unknown_colour" is), and the request's field at fault when it is the colour."""

    def __init__(self, status: int, message: str, headers: dict | None = None, reason: str = "", field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.headers, self.reason, self.field = status, message, headers, reason or REASONS.get(status, "other"), field

    def body(self) -> dict:
        """What the client reads: {"error": ...}, with "field": "color" when the colour is at fault."""
        return {"error": self.message} | ({"field": self.field} if self.field else {})

    def __reduce__(self):  # crosses from the model deployment to the ingress whole
        return ClientError, (self.status, self.message, self.headers, self.reason, self.field)


class Meters:
    """The replica's metrics, exported by Ray's metrics agent (Prometheus, ``ray_`` prefixed) from every replica."""

    def __init__(self):
        from ray.serve import metrics

        seconds = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
        self.requests = metrics.Counter("polycolor_requests", "outlines answered, by outcome (2xx/4xx/5xx) and 4xx reason", ("outcome", "reason"))
        self.batch_size = metrics.Histogram("polycolor_batch_size", "outlines per model batch", [1, 2, 4, 8, 16, 32, 64, 128])
        self.model_latency = metrics.Histogram("polycolor_model_seconds", "time the model takes for one batch", seconds)
        self.decode_latency = metrics.Histogram("polycolor_decode_seconds", "time to decode one image to its outline", seconds)
        self.unknown_colours = metrics.Counter("polycolor_unknown_colours", "colours this checkpoint could not paint (422)")

    def answered(self, status: int, reason: str = "") -> None:
        self.requests.inc(tags={"outcome": f"{status // 100}xx", "reason": reason if 400 <= status < 500 else ""})


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def refusal(err: ClientError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


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


@dataclass
class Parsed:
    """A request's outlines (encoded), one colour each, whether the input's size is wanted, and whether the
    client sent a list (answered with a JSON list) or one image (answered with a PNG)."""

    images: list[bytes | ClientError]  # an item already refused (not base64) is its error
    colours: list[object]
    original: bool
    many: bool


async def parse_request(request: Request, limit: int, max_images: int) -> Parsed:
    """The outlines, colours and size from a multipart form (``image`` repeated for several) or a JSON body
    (``image``: base64, or a list of them); ``color`` is one for all or, with several images, one each."""
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
            raise ClientError(422, 'JSON body must be an object {"image": "<base64>" or ["<base64>", ...], "color": "..."}')
        encoded, many = payload.get("image"), isinstance(payload.get("image"), list)
        encoded = encoded if many else [encoded]
        if not encoded or not all(isinstance(e, str) for e in encoded):
            raise ClientError(422, 'field "image" is missing, or not a base64 string or a list of them')
        check_count(len(encoded), max_images)
        images = [base64_image(item) for item in encoded]  # a bad item fails alone when there are several
        if not many and isinstance(images[0], ClientError):
            raise images[0]
        colour = payload.get("color", payload.get("colour"))
        colours = colour if many and isinstance(colour, list) else [colour]
        size = payload.get("size", "model")
    elif content_type == "multipart/form-data":
        request._body = body  # let Starlette parse what was already read under the limit
        try:
            form = await request.form(max_files=max_images + 1, max_fields=max_images + 8)
        except Exception as err:  # python-multipart raises several types for malformed bodies
            if "Too many files" in str(err):
                raise ClientError(413, f"more than {max_images} images in one request; the limit is {max_images}") from None
            raise ClientError(400, "body is not a valid multipart form") from None
        uploads = form.getlist("image")
        if not uploads or any(isinstance(u, str) for u in uploads):
            raise ClientError(422, 'form field "image" is missing or not a file')
        check_count(len(uploads), max_images)
        images, many = [await u.read() for u in uploads], len(uploads) > 1
        colours = form.getlist("color") or form.getlist("colour") or [None]
        size = form.get("size", "model")
        await form.close()  # the images are in ``images`` now: the uploads' files and the raw body are let go
        request._body = b""
    else:
        raise ClientError(415, f"content type {content_type or 'none'!r} is not accepted; send multipart/form-data or application/json")
    if colours == [None]:
        raise ClientError(422, 'field "color" is missing; expected a name, #hex or rgb(r, g, b)', field="color")
    if len(colours) not in (1, len(images)):
        raise ClientError(422, f'{len(images)} images and {len(colours)} colours; send one colour for all, or one per image')
    if size not in ("model", "original"):
        raise ClientError(422, f'field "size" must be "model" or "original", got {str(size)[:20]!r}')
    return Parsed(images, colours * len(images) if len(colours) == 1 else colours, size == "original", many)


def base64_image(encoded: str) -> bytes | ClientError:
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return ClientError(400, 'field "image" is not valid base64')


def check_count(count: int, max_images: int) -> None:
    if count > max_images:
        raise ClientError(413, f"{count} images in one request; the limit is {max_images}")


def demo_page(public: bool) -> str:
    """The demo (static/demo.html): draw outlines, pick a colour, see them filled."""
    # Completions: the public lexicons' names, when the checkpoint reads them (``public``). Its own palette or
    # vocabulary is what /colors (behind the API key) tells; the page adds those once it may ask.
    names = "".join(f'<option value="{html.escape(n)}">' for n in sorted({name for name, _ in LEXICON.values()})) if public else ""
    return DEMO_HTML.read_text().replace("{{NAMES}}", names)


DEMO_HTML = Path(__file__).with_name("static") / "demo.html"


def authorized(request: Request) -> bool:
    key = os.environ.get("POLYCOLOR_API_KEY")
    given = request.headers.get("authorization", "")
    return not key or hmac.compare_digest(given.encode(), f"Bearer {key}".encode())


def fitted(outline: np.ndarray, size: int) -> np.ndarray:
    """``outline`` at ``size`` (already so, unless the ingress decoded it for a checkpoint swapped out since)."""
    return outline if outline.shape[-1] == size else outline_of(outline, size)


@dataclass(frozen=True)
class Served:
    """One checkpoint as a model replica serves it; swapped whole, so a batch sees one checkpoint throughout."""

    location: str
    colorizer: Colorizer
    probe: torch.Tensor  # a condition for health probes

    @classmethod
    def load(cls, location: str, device: str) -> "Served":
        colorizer = Colorizer.from_checkpoint(location, device=device)
        colorizer.model.condition.check_serving(load=True)  # a text encoder loads now, not on the first new phrase
        probe = colorizer.condition([next(iter(colorizer.model.cfg.vocabulary), "red")])
        return cls(location, colorizer, probe)

    def card(self) -> dict:
        """What the ingress needs to know of this checkpoint: where it is from, its outlines' size, /colors."""
        colorizer = self.colorizer
        return {"location": self.location, "image_size": colorizer.image_size, "colors": colorizer.model.condition.advertise(colorizer.palette)}


@dataclass
class Job:
    """One request's outlines, at the model's size, with a colour each, and its client (for the phrase budget)."""

    outlines: np.ndarray  # (N, S, S) bool
    colours: list[object]
    client: str


@dataclass
class Painted:
    """The model's answer to a Job: per outline, its RGB image or the ClientError refusing its colour; and the
    checkpoint that painted them, so the ingress notices a swap."""

    images: list[np.ndarray | ClientError]
    location: str


@serve.deployment(name="Colorizer", health_check_period_s=10, health_check_timeout_s=30)
class Model:
    """The model deployment: holds the checkpoint, turns colours into conditions and colours batches of outlines
    on one model thread (on a GPU with ``gpu``). It never sees an encoded image: that is the ingress's work."""

    def __init__(self, config: dict):
        self.cfg = ServeConfig(**config)
        self.device = "cuda" if self.cfg.gpu else "cpu"
        # The checkpoint comes in config, or in the deployment's user_config (build_app's way: see reconfigure).
        self.served = Served.load(self.cfg.checkpoint, self.device) if self.cfg.checkpoint else None
        self.paint_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.paint_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_s)
        self.batch_sizes: list[int] = []  # outlines in recent batches, for /healthz and the tests
        # One model thread: serve.batch runs one batch at a time, and the event loop stays free for calls.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.budget = PhraseBudget(self.cfg.max_new_phrases_per_s)  # used on the model thread only
        self.meters = Meters()

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this before the replica takes requests and whenever the deployment's ``user_config``
        changes (a redeploy naming another checkpoint): the new one loads beside the old, off the event loop,
        and is swapped in whole. A batch already started finishes on the checkpoint it started with."""
        location = str(user_config.get("checkpoint", ""))
        if not location or (self.served and self.served.location == location):
            return
        self.served = await asyncio.get_running_loop().run_in_executor(None, Served.load, location, self.device)

    def current(self) -> Served:
        if self.served is None:
            raise RuntimeError("no checkpoint: give checkpoint= in the app's args or in its Colorizer deployment's user_config")
        return self.served

    async def card(self) -> dict:
        return self.current().card()

    async def paint(self, job: Job) -> Painted:
        return await self.paint_batch(job)

    @serve.batch(max_batch_size=DEFAULTS.max_batch_size, batch_wait_timeout_s=DEFAULTS.batch_wait_s)
    async def paint_batch(self, jobs: list[Job]) -> list[Painted]:
        """The requests that arrived together, coloured in one pass on the model thread. The Colorizer runs it in
        chunks of its own batch size (8 on CPU): faster per image than whole large batches, and the allocator
        sees at most eight tensor sizes, so memory stays flat under load."""
        served = self.current()
        outlines = sum(len(job.colours) for job in jobs)
        self.batch_sizes = (self.batch_sizes + [outlines])[-100:]
        self.meters.batch_size.observe(outlines)
        started = time.perf_counter()
        painted = await asyncio.get_running_loop().run_in_executor(self.model_thread, self.paint_jobs, served, jobs)
        self.meters.model_latency.observe(time.perf_counter() - started)
        return painted

    def paint_jobs(self, served: Served, jobs: list[Job]) -> list[Painted]:
        """On the model thread: each colour's condition or the error refusing it, then one pass over every outline
        whose colour was accepted; each condition in ``answers`` is replaced by its image."""
        colorizer = served.colorizer
        answers = [[self.condition(colorizer, colour, job.client) for colour in job.colours] for job in jobs]
        accepted = [(answer, i, fitted(outline, colorizer.image_size))
                    for job, answer in zip(jobs, answers) for i, outline in enumerate(job.outlines) if not isinstance(answer[i], ClientError)]  # fmt: skip
        if accepted:
            outlines, conds = np.stack([o for _, _, o in accepted]), torch.stack([answer[i] for answer, i, _ in accepted])
            for (answer, i, _), image in zip(accepted, colorizer.colorize_arrays(outlines, conds)):
                answer[i] = image
        return [Painted(answer, served.location) for answer in answers]

    def condition(self, colorizer: Colorizer, colour: object, client: str) -> torch.Tensor | ClientError:
        """The colour's condition, or the ClientError that refuses it: the colour is parsed here, once."""
        if self.over_budget(colorizer, colour, client):
            return ClientError(429, f"more than {self.cfg.max_new_phrases_per_s:g} new phrases a second from this client; "
                                    "retry in a second, or send names the lexicons know (see /colors)", {"Retry-After": "1"}, field="color")  # fmt: skip
        try:
            return colorizer.condition([colour])[0]
        except ValueError as err:
            self.meters.unknown_colours.inc()
            return ClientError(422, str(err), reason="unknown_colour", field="color")

    def over_budget(self, colorizer: Colorizer, colour: object, client: str) -> bool:
        try:
            costly = colorizer.model.condition.costly(colour, colorizer.palette)
        except ValueError:
            return False  # refused with the others
        return costly and not self.budget.take(client)

    async def check_health(self) -> list[int]:
        """A tiny forward pass on the model thread, the path requests take: a wedged thread fails the check
        (Serve then replaces the replica), where a pass on the event loop would have passed. For /healthz, the
        outlines in recent batches."""
        served = self.current()
        blank = np.zeros((1, served.colorizer.image_size, served.colorizer.image_size), bool)
        probe = self.model_thread.submit(served.colorizer.colorize_arrays, blank, served.probe)
        try:
            await asyncio.wait_for(asyncio.wrap_future(probe), HEALTH_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(f"the model thread did not answer a health probe within {HEALTH_TIMEOUT_S} s") from None
        return self.batch_sizes[-20:]


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """The HTTP deployment: checks the key, parses and decodes requests, encodes the PNGs, and asks the model
    deployment (a DeploymentHandle) for the colouring. Its replicas scale apart from the model's, on CPUs."""

    def __init__(self, config: dict, model: DeploymentHandle):
        self.cfg = ServeConfig(**config)
        self.model = model
        self.limit = int(self.cfg.max_body_mb * 1024 * 1024)
        # One codec thread: the event loop never decodes or encodes, and one full-size image is held at a time.
        self.codec_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codec")
        self.meters = Meters()
        self.known: dict | None = None  # the model's card (see Served.card), fetched again after a swap
        self.pages: dict[bool, str] = {}  # the demo page, with or without the public lexicons' names

    async def card(self) -> dict:
        if self.known is None:
            self.known = await self.model.card.remote()
        return self.known

    def decode(self, data: bytes, size: int, original: bool) -> tuple[tuple[tuple[int, int], np.ndarray] | None, np.ndarray]:
        """(with ``original``, the image's ink at its own size, as its (H, W) and packed bits; the outline at the
        model's size): all a request keeps of its image."""
        started = time.perf_counter()
        outline, ink = read_ink(decode_image(data, self.cfg.max_pixels), size, original)
        self.meters.decode_latency.observe(time.perf_counter() - started)
        return ink, outline

    @app.post("/colorize", response_class=Response, responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def colorize(self, request: Request) -> Response:
        """Multipart `image` (PNG/JPEG) + `color`, or JSON {"image": base64, "color": ...}; optional `size=original`.
        Several images (repeated `image` fields, or a JSON list) get a JSON list, in order, of {"image": base64 PNG}
        or, for an item that cannot be done, {"error": ..., "status": ...}."""
        if not authorized(request):
            self.meters.answered(401, REASONS[401])
            return error(401, "missing or wrong API key; send Authorization: Bearer <key>")
        try:
            parsed = await parse_request(request, self.limit, self.cfg.max_images_per_request)
        except ClientError as err:
            self.meters.answered(err.status, err.reason)
            return refusal(err)
        try:
            answers = await self.colorize_all(parsed, request.client.host if request.client else "unknown")
        except Exception:
            self.meters.answered(500)  # then the app's handler answers a generic 500
            raise
        for answer in answers:
            ok = isinstance(answer, bytes)
            self.meters.answered(200 if ok else answer.status, "" if ok else answer.reason)
        if not parsed.many:
            answer = answers[0]
            return Response(answer, media_type="image/png") if isinstance(answer, bytes) else refusal(answer)
        return JSONResponse([{"image": base64.b64encode(a).decode()} if isinstance(a, bytes) else a.body() | {"status": a.status} for a in answers])

    async def colorize_all(self, parsed: Parsed, client: str) -> list[bytes | ClientError]:
        """Each outline as PNG bytes, or the ClientError that refuses it (the others go on): decoded one at a
        time, each body dropped once decoded, then coloured in one call to the model."""
        loop, card = asyncio.get_running_loop(), await self.card()
        answers: list = []
        for i, data in enumerate(parsed.images):
            parsed.images[i] = None
            try:
                answers.append(data if isinstance(data, ClientError) else
                               await loop.run_in_executor(self.codec_thread, self.decode, data, card["image_size"], parsed.original))  # fmt: skip
            except ClientError as err:
                answers.append(err)
        todo = [i for i, answer in enumerate(answers) if not isinstance(answer, ClientError)]
        if todo:
            job = Job(np.stack([answers[i][1] for i in todo]), [parsed.colours[i] for i in todo], client)
            painted = await self.model.paint.remote(job)
            if painted.location != card["location"]:
                self.known = None  # another checkpoint now: its card is fetched for the next request
            for i, image in zip(todo, painted.images):
                answers[i] = image if isinstance(image, ClientError) else await loop.run_in_executor(self.codec_thread, encode_png, image, answers[i][0])
        return answers

    @app.get("/colors")
    async def colors(self, request: Request) -> JSONResponse:
        if not authorized(request):
            return error(401, "missing or wrong API key; send Authorization: Bearer <key>")
        self.known = None  # asked each time: /colors describes the checkpoint serving now
        return JSONResponse((await self.card())["colors"])

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            sizes = await asyncio.wait_for(self.model.check_health.remote(), HEALTH_TIMEOUT_S + 5)
        except Exception as err:
            return error(503, f"the model is not healthy: {getattr(err, 'cause', None) or type(err).__name__}")
        return JSONResponse({"status": "ok", "recent_batch_sizes": sizes})

    @app.get("/", response_class=HTMLResponse)
    async def index(self) -> HTMLResponse:
        public = bool((await self.card())["colors"]["lexicons"])
        if public not in self.pages:
            self.pages[public] = demo_page(public)
        return HTMLResponse(self.pages[public])


def application(cfg: ServeConfig, model=Model, model_options: dict | None = None, ingress_options: dict | None = None):
    """The two deployments bound together: the ingress, and the model deployment it calls. ``*_options`` go
    over the defaults (``ray_actor_options`` key by key); tests use them for faults and resources."""

    def merged(defaults: dict, given: dict | None) -> dict:
        given = dict(given or {})
        return defaults | given | {"ray_actor_options": defaults["ray_actor_options"] | given.get("ray_actor_options", {})}

    model_defaults = {"max_ongoing_requests": cfg.max_ongoing_requests, **replica_options(cfg.replicas, cfg),
                      "ray_actor_options": {"num_cpus": cfg.cpus, "num_gpus": 1 if cfg.gpu else 0}}
    ingress_defaults = {"max_ongoing_requests": cfg.max_ongoing_requests, "max_queued_requests": cfg.max_queued_requests,
                        **replica_options(cfg.ingress_replicas, cfg), "ray_actor_options": {"num_cpus": cfg.ingress_cpus}}
    config = asdict(cfg)
    painter = model.options(**merged(model_defaults, model_options)).bind(config)
    return Ingress.options(**merged(ingress_defaults, ingress_options)).bind(config, painter)


def build_app(args: dict):
    """The one application builder: `serve run polycolor.serve:build_app checkpoint=...`, config files, main().

    The checkpoint reaches the model's replicas as its deployment's ``user_config`` (``reconfigure``), never as their
    arguments. In a Serve config file put it there (``deployments: [{name: Colorizer, user_config:
    {checkpoint: ...}}]``): a changed ``args`` rebuilds the app and replaces its replicas, a changed
    ``user_config`` swaps the checkpoint into the running ones."""
    cfg = ServeConfig.from_args(dict(args))
    if not cfg.checkpoint:
        return application(cfg)
    # Fail start-up here, naming the file (or the missing extra), not in every replica; a half-written
    # checkpoint in a bucket fails its hash check here too.
    checkpoint.load(cfg.checkpoint).model.condition.check_serving(load=False)
    return application(replace(cfg, checkpoint=""), model_options={"user_config": {"checkpoint": cfg.checkpoint}})


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

    init_ray(num_cpus=max(2, os.cpu_count() or 2))
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
