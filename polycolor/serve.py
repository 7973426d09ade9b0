"""Ray Serve application of a checkpoint: an HTTP colorize endpoint with batching, limits and clear errors.

Two deployments, each scaling on its own: ``Ingress`` (HTTP: the API key, parsing, image decoding and PNG
encoding, on CPUs) calls ``Model`` (the checkpoint's Colorizer, colour parsing and batched model passes, on a
GPU with --gpu) through a DeploymentHandle. With --colocate the ingress holds the model itself: one deployment, no
call between processes. The HTTP contract is ``polycolor.api``'s.

    python -m polycolor.serve --checkpoint runs/first/best [--host 127.0.0.1] [--port 8000] [--replicas 1|auto|MIN-MAX]
                              [--ingress-replicas 1|auto|MIN-MAX] [--gpu] [--colocate]
    serve run polycolor.serve:build_app checkpoint=runs/first/best

HTTP surface (nothing else; other methods get 405 with Allow, other paths 404):
    POST /colorize   multipart form (image file, color) or JSON {"image": base64, "color": ...} -> image/png;
                     several images (repeated fields, or a JSON list) -> a JSON list of base64 PNGs or per-item errors
    GET  /colors     palette, conditioning mode, the lexicons, modifiers and notations it reads
    GET  /healthz    200 when a tiny forward pass succeeds on the model thread
    GET  /docs       OpenAPI page (its schema at /openapi.json, its assets under /docs/assets)
    GET  /           demo page
"""

import argparse
import asyncio
import base64
import functools
import html
import logging
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
from types import SimpleNamespace

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from polycolor import api, checkpoint, images
from polycolor.api import Authorized, ClientError
from polycolor.colors import LEXICON, LEXICONS, STEPS
from polycolor.config import Settings, add_flags, setting
from polycolor.predict import Card, Colorizer
from polycolor.runs import init_ray

HEALTH_TIMEOUT_S = 10  # a probe queues behind at most the batch in progress (well under a second on CPU)
# Serve's faster paths, as its RAY_SERVE_THROUGHPUT_OPTIMIZED sets them but without its direct ingress (which opens a
# port per replica): calls between processes over gRPC, and user code and routing on each replica's own event loop,
# not on threads of their own. The replicas get them through their runtime_env; the local Ray that main() starts
# (and so Serve's proxy) through its environment. bench/RESULTS.md has what each saves.
TRANSPORT = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
logger = logging.getLogger("ray.serve")


@dataclass
class ServeConfig(Settings):
    """A deployment's settings: ``serve run`` arguments, a Serve config file's ``args`` and main()'s flags."""

    checkpoint: str = setting("", "checkpoint directory or URI (e.g. runs/NAME/best)")
    replicas: str = setting(
        "1",
        "replicas of the model: N; auto (Serve's autoscaling); or MIN-MAX, autoscaling between them",
        lambda v: replica_range(v) is not None,
        "a count >= 1, auto, or MIN-MAX with 0 <= MIN <= MAX, MAX >= 1",
    )
    ingress_replicas: str = setting(
        "1",
        "replicas of the HTTP ingress (decoding, encoding), in the same form; they scale apart from the model's",
        lambda v: replica_range(v) is not None,
        "a count >= 1, auto, or MIN-MAX with 0 <= MIN <= MAX, MAX >= 1",
    )
    cpus: float = setting(1.0, "CPUs each model replica reserves", lambda v: v >= 0, ">= 0")
    ingress_cpus: float = setting(
        0.0,
        "CPUs each ingress replica reserves (none by default, as Serve's own HTTP proxy: it never keeps a "
        "model replica off a node; a cluster config gives it some)",
        lambda v: v >= 0,
        ">= 0",
    )
    target_ongoing_requests: float = setting(
        2.0, "autoscaling: the requests in progress per replica it aims for", lambda v: v > 0, "> 0"
    )
    upscale_delay_s: float = setting(
        10.0, "autoscaling: how long load must stay high before a replica is added", lambda v: v >= 0, ">= 0"
    )
    downscale_delay_s: float = setting(
        120.0, "autoscaling: how long load must stay low before a replica is removed", lambda v: v >= 0, ">= 0"
    )
    gpu: bool = setting(False, "one GPU per replica")
    colocate: bool = setting(
        False,
        "run the model inside the HTTP replica: no call between processes, and one deployment whose replicas, CPUs "
        "and GPU are the model's",
    )
    max_body_mb: float = setting(10.0, "request body limit in MiB (413 above it)", lambda v: v > 0, "> 0")
    max_pixels: int = setting(
        4096 * 4096, "largest accepted image, in pixels (413 above it, before decoding)", lambda v: v >= 1, ">= 1"
    )
    max_side: int = setting(
        4096, "longest accepted image side, in pixels (413 above it, before decoding)", lambda v: v >= 1, ">= 1"
    )
    max_batch_size: int = setting(32, "requests the model runs together, at most", lambda v: v >= 1, ">= 1")
    model_calls: int = setting(
        2,
        "calls each ingress replica keeps in flight to the model's replicas; the requests that arrive meanwhile "
        "go together in the next one",
        lambda v: v >= 1,
        ">= 1",
    )
    batch_wait_s: float = setting(
        0.0,
        "how long a request waits for others to join its batch (0: it runs at once; under load, batches form while "
        "the model is busy)",
        lambda v: v >= 0,
        ">= 0",
    )
    max_ongoing_requests: int = setting(
        64, "requests a replica takes at once; more are queued", lambda v: v >= 1, ">= 1"
    )
    max_queued_requests: int = setting(256, "queued requests beyond which clients get 503", lambda v: v >= 1, ">= 1")
    max_images_per_request: int = setting(16, "outlines one request may carry (413 above it)", lambda v: v >= 1, ">= 1")
    access_log: bool = setting(False, "log every request (Serve's access log) in the replicas' logs")
    max_new_phrases_per_s: float = setting(
        20.0, "per client: phrases that need an encoder run (text mode; 429 beyond)", lambda v: v > 0, "> 0"
    )

    @classmethod
    def from_args(cls, args: dict) -> "ServeConfig":
        """Return the config of ``serve run ... key=value`` strings or a config file's ``args``; unknown keys are
        refused."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(args) - set(known)
        if unknown:
            raise ValueError(f"unknown argument(s) {sorted(unknown)}; expected some of {sorted(known)}")
        casts = {int: int, float: float, bool: lambda v: str(v).lower() in ("1", "true", "yes"), str: str}
        return cls(**{k: casts[known[k]](v) for k, v in args.items()})


def replica_range(replicas: str) -> tuple[int, int] | str | None:
    """Return ``replicas`` as (MIN, MAX) (N is N-N), or "auto"; None when it is neither."""
    text = str(replicas).strip()
    if text == "auto":
        return text
    low, _, high = text.partition("-")
    if not low.isdigit() or not (high or low).isdigit():
        return None
    bounds = int(low), int(high or low)
    return bounds if bounds[0] <= bounds[1] and bounds[1] >= 1 and (high or bounds[0] >= 1) else None


def replica_options(replicas: str, cfg: ServeConfig) -> dict:
    """Return the deployment options for ``replicas``: a fixed count, or an autoscaling config from ``cfg``."""
    wanted = replica_range(replicas)
    if isinstance(wanted, tuple) and wanted[0] == wanted[1]:
        return {"num_replicas": wanted[0]}
    autoscaling = {
        "target_ongoing_requests": cfg.target_ongoing_requests,
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
    }
    if wanted == "auto":
        return {"num_replicas": "auto", "autoscaling_config": autoscaling}
    return {
        "autoscaling_config": autoscaling
        | {"min_replicas": wanted[0], "max_replicas": wanted[1], "initial_replicas": max(1, wanted[0])}
    }


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


def colors_listing(card: Card) -> dict:
    """Return what ``GET /colors`` tells a client it may send: any name of the palette and the lexicons, with
    modifiers and notations, when the checkpoint reads them; else only its vocabulary's names."""
    lexicons = ["palette", *LEXICONS] if card.reads_lexicons else []
    return {
        "conditioning": card.conditioning,
        "palette": {name: list(rgb) for name, rgb in card.palette.items()},
        "vocabulary": list(card.vocabulary),
        "any_css_name_or_hex": bool(lexicons),
        "free_text_phrases": card.free_text,
        "lexicons": lexicons,
        "modifiers": [*STEPS, "very", "-ish"] if lexicons else [],
        "notations": ["#hex", "rgb()", "hsl()"] if lexicons else [],
    }


class Meters:
    """The replica's metrics, exported by Ray's metrics agent (Prometheus, ``ray_`` prefixed) from every replica."""

    def __init__(self):
        from ray.serve import metrics

        seconds = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
        self.requests = metrics.Counter(
            "polycolor_requests", "outlines answered, by outcome (2xx/4xx/5xx) and 4xx reason", ("outcome", "reason")
        )
        self.batch_size = metrics.Histogram(
            "polycolor_batch_size", "outlines per model batch", [1, 2, 4, 8, 16, 32, 64, 128]
        )
        self.model_latency = metrics.Histogram("polycolor_model_seconds", "time the model takes for one batch", seconds)
        self.decode_latency = metrics.Histogram(
            "polycolor_decode_seconds", "time to decode one image to its outline", seconds
        )
        self.unknown_colours = metrics.Counter(
            "polycolor_unknown_colours", "colours this checkpoint could not paint (422)"
        )

    def answered(self, status: int, reason: str = "") -> None:
        self.requests.inc(tags={"outcome": f"{status // 100}xx", "reason": reason if 400 <= status < 500 else ""})


def demo_page(public: bool) -> str:
    """Return the demo page (static/demo.html): draw outlines, pick a colour, see them filled."""
    # Completions: the public lexicons' names, when the checkpoint reads them (``public``). Its own palette or
    # vocabulary is what /colors (behind the API key) tells; the page adds those once it may ask.
    names = (
        "".join(f'<option value="{html.escape(n)}">' for n in sorted({name for name, _ in LEXICON.values()}))
        if public
        else ""
    )
    return DEMO_HTML.read_text().replace("{{NAMES}}", names)


DEMO_HTML = Path(__file__).with_name("static") / "demo.html"


@dataclass(frozen=True)
class Served:
    """One checkpoint as a model replica serves it; swapped whole, so a batch sees one checkpoint throughout."""

    colorizer: Colorizer
    card: Card
    probe: torch.Tensor  # a condition for health probes

    @classmethod
    def load(cls, location: str, device: str) -> "Served":
        colorizer = Colorizer.from_checkpoint(location, device=device)
        colorizer.prepare()  # a text encoder loads now, not on the first new phrase
        card = colorizer.card()
        served = cls(colorizer, card, colorizer.condition([next(iter(card.vocabulary), "red")]))
        served.paint_probe()  # traces the model now, not on a first request
        return served

    def paint_probe(self) -> np.ndarray:
        """Paint one empty outline: a health probe's forward pass, on the path requests take."""
        size = self.card.image_size
        return self.colorizer.colorize_arrays(np.zeros((1, size, size), bool), self.probe)


@dataclass
class Job:
    """One request's outlines, at the model's size, with a colour each, and its client (for the phrase budget)."""

    outlines: images.Packed  # (N, S, S) bool, packed: an eighth of the bytes to send
    colours: list[str]
    client: str


@dataclass
class Painted:
    """The model's answer to a Job: per outline, the ClientError refusing its colour or None; the painted ones'
    answers, packed (``images.pack_answers``); and the checkpoint that painted them, so the ingress notices a swap."""

    refusals: list[ClientError | None]
    answers: tuple
    location: str

    def images(self) -> list[np.ndarray | ClientError]:
        """Return, per outline, its (S, S, 3) RGB answer or the ClientError refusing it."""
        painted = iter(images.unpack_answers(self.answers)) if self.answers else iter(())
        return [refusal if refusal is not None else next(painted) for refusal in self.refusals]


class Batcher:
    """Runs requests through ``run`` (a coroutine taking a list of them) in batches, at most ``slots`` at once.

    A request that finds a slot free runs at once (after ``wait_s``, 0 by default: a lone request never waits to
    fill a batch); requests that arrive while every slot is busy form the next batch, at most ``max_size`` of them.
    A request whose caller gave up (a timeout, a dropped connection) before its batch started never runs.
    """

    def __init__(self, run, max_size: int, wait_s: float = 0.0, slots: int = 1):
        self.run, self.max_size, self.wait_s, self.slots = run, max_size, wait_s, slots
        self.waiting: list[tuple[object, asyncio.Future]] = []
        self.busy = 0

    async def submit(self, request):
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((request, future))
        if self.busy < self.slots:
            self.busy += 1
            asyncio.get_running_loop().create_task(self.drain())
        return await future

    async def drain(self) -> None:
        try:
            while self.waiting:
                if self.wait_s and len(self.waiting) < self.max_size:
                    await asyncio.sleep(self.wait_s)
                batch = [(r, f) for r, f in self.waiting[: self.max_size] if not f.done()]  # done: its caller gave up
                del self.waiting[: self.max_size]
                if not batch:
                    continue
                try:
                    answers = await self.run([request for request, _ in batch])
                except Exception as err:  # every request of the batch gets the error (then a generic 500)
                    answers = [err] * len(batch)
                for (_, future), answer in zip(batch, answers):
                    if not future.done():
                        future.set_exception(answer) if isinstance(answer, Exception) else future.set_result(answer)
        finally:
            self.busy -= 1


@serve.deployment(name="Model", health_check_period_s=10, health_check_timeout_s=30)
class Model:
    """The model deployment: holds the checkpoint's Colorizer, turns colours into conditions and colours batches of
    outlines on one model thread (on a GPU with ``gpu``). It never sees an encoded image: that is the ingress's work."""

    def __init__(self, config: dict):
        self.cfg = ServeConfig(**config)
        self.device = "cuda" if self.cfg.gpu else "cpu"
        # The checkpoint comes in config, or in the deployment's user_config (build_app's way: see reconfigure).
        self.served = Served.load(self.cfg.checkpoint, self.device) if self.cfg.checkpoint else None
        self.swap_error: str | None = None  # why the last checkpoint swap was refused, for /healthz
        self.batch_sizes: list[int] = []  # outlines in recent batches, for /healthz and the tests
        # One model thread: one batch at a time, and the event loop stays free for calls.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batcher = Batcher(self.paint_batch, self.cfg.max_batch_size, self.cfg.batch_wait_s)
        self.budget = PhraseBudget(self.cfg.max_new_phrases_per_s)  # used on the model thread only
        self.meters = meters()

    async def reconfigure(self, user_config: dict) -> None:
        """Load the checkpoint ``user_config`` names beside the one serving, off the event loop, and swap it in whole.

        Serve calls this before the replica takes requests and whenever the deployment's ``user_config`` changes
        (a redeploy naming another checkpoint). A batch already started finishes on the checkpoint it started with.
        A checkpoint that does not load is refused (C5): the old one keeps serving, and /healthz says why.
        """
        location = str(user_config.get("checkpoint", ""))
        if not location or (self.served and self.served.card.location == location):
            return
        try:
            self.served = await asyncio.get_running_loop().run_in_executor(None, Served.load, location, self.device)
            self.swap_error = None
        except (checkpoint.CheckpointError, ImportError, ValueError, OSError) as err:
            if self.served is None:
                raise  # nothing to keep serving: the replica fails to start, naming the file
            self.swap_error = f"checkpoint {location} was refused, {self.served.card.location} still serves: {err}"
            logger.error(self.swap_error)

    def current(self) -> Served:
        if self.served is None:
            raise RuntimeError(
                "no checkpoint: give checkpoint= in the app's args or in its Model deployment's user_config"
            )
        return self.served

    async def card(self) -> Card:
        return self.current().card

    async def paint(self, jobs: list[Job]) -> list[Painted]:
        """Return ``jobs`` coloured (an ingress sends the requests that arrived together), batched with the others
        that arrived while the model was busy."""
        return list(await asyncio.gather(*(self.batcher.submit(job) for job in jobs)))

    async def paint_batch(self, jobs: list[Job]) -> list[Painted]:
        """Colour the requests that arrived together in one pass on the model thread.

        The Colorizer runs it in chunks of its own batch size (8 on CPU): faster per image than whole large
        batches, and the allocator sees at most eight tensor sizes, so memory stays flat under load.
        """
        served = self.current()
        outlines = sum(len(job.colours) for job in jobs)
        self.batch_sizes = (self.batch_sizes + [outlines])[-100:]
        self.meters.batch_size.observe(outlines)
        started = time.perf_counter()
        painted = await asyncio.get_running_loop().run_in_executor(self.model_thread, self.paint_jobs, served, jobs)
        self.meters.model_latency.observe(time.perf_counter() - started)
        return painted

    def paint_jobs(self, served: Served, jobs: list[Job]) -> list[Painted]:
        """Colour every outline whose colour is accepted, in one pass; on the model thread.

        Each colour becomes its condition or the ClientError refusing it; each accepted condition in ``answers``
        is then replaced by its image.
        """
        colorizer, size = served.colorizer, served.card.image_size
        conditions = [[self.condition(colorizer, colour, job.client) for colour in job.colours] for job in jobs]
        accepted = [  # (its outline at the model's size, its condition) of every outline whose colour is accepted
            (fitted(outline, size), condition)
            for job, conds in zip(jobs, conditions)
            for outline, condition in zip(images.unpack(job.outlines), conds)
            if not isinstance(condition, ClientError)
        ]
        painted = (
            colorizer.colorize_arrays(np.stack([o for o, _ in accepted]), torch.stack([c for _, c in accepted]))
            if accepted
            else np.empty((0, size, size, 3), np.uint8)
        )
        counts = np.cumsum([0] + [sum(not isinstance(c, ClientError) for c in conds) for conds in conditions])
        return [
            Painted(
                [c if isinstance(c, ClientError) else None for c in conds],
                images.pack_answers(painted[counts[k] : counts[k + 1]]) if counts[k + 1] > counts[k] else (),
                served.card.location,
            )
            for k, conds in enumerate(conditions)
        ]

    def condition(self, colorizer: Colorizer, colour: str, client: str) -> torch.Tensor | ClientError:
        """Return the colour's condition, or the ClientError that refuses it: the colour is parsed here, once."""
        if colorizer.costly(colour) and not self.budget.take(client):
            message = (
                f"more than {self.cfg.max_new_phrases_per_s:g} new phrases a second from this client; "
                "retry in a second, or send names the lexicons know (see /colors)"
            )
            return ClientError(429, message, {"Retry-After": "1"}, field="color")
        try:
            return colorizer.condition([colour])[0]
        except ValueError as err:
            self.meters.unknown_colours.inc()
            return ClientError(422, str(err), reason="unknown_colour", field="color")

    async def check_health(self) -> dict:
        """Run a tiny forward pass on the model thread, the path requests take, and return the replica's state.

        A wedged thread fails the check (Serve then replaces the replica), where a pass on the event loop would
        have passed. The state: the checkpoint serving, outlines in recent batches, a refused swap's reason.
        """
        served = self.current()
        probe = self.model_thread.submit(served.paint_probe)
        try:
            await asyncio.wait_for(asyncio.wrap_future(probe), HEALTH_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(f"the model thread did not answer a health probe within {HEALTH_TIMEOUT_S} s") from None
        return {
            "checkpoint": served.card.location,
            "recent_batch_sizes": self.batch_sizes[-20:],
            "swap_error": self.swap_error,
        }


def fitted(outline: np.ndarray, size: int) -> np.ndarray:
    """Return ``outline`` at ``size`` (already so, unless the ingress decoded it for a checkpoint swapped out since)."""
    return outline if outline.shape[-1] == size else images.outline_of(outline, size)


def refusal(err: ClientError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@functools.cache
def meters() -> Meters:
    """Return the metrics of this replica's process (one replica per process), shared by its routes and error
    handlers."""
    return Meters()


class Local:  # defined before Ingress: Serve pickles that class by value, and a name defined after it was missing
    """A model in the ingress's own process, called as through its DeploymentHandle (``model.paint.remote(...)``)."""

    def __init__(self, model: "Model"):
        self.model = model

    def __getattr__(self, method: str):
        return SimpleNamespace(remote=getattr(self.model, method))


app = api.make_app(on_refusal=lambda err: meters().answered(err.status, err.reason))


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """The HTTP deployment: checks the key, parses and decodes requests, encodes the PNGs, and asks the model
    deployment (a DeploymentHandle) for the colouring. Its replicas scale apart from the model's, on CPUs.
    Colocated, it is given the model's class instead, and holds the model in its own process."""

    def __init__(self, config: dict, model: DeploymentHandle | type):
        self.cfg = ServeConfig(**config)
        self.local = model(config) if isinstance(model, type) else None
        self.model = model if self.local is None else Local(self.local)
        self.limit = int(self.cfg.max_body_mb * 1024 * 1024)
        self.limits = images.Limits(self.cfg.max_pixels, self.cfg.max_side, formats=("PNG", "JPEG"))
        # One codec thread: the event loop never decodes or encodes, and one full-size image is held at a time.
        self.codec_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codec")
        self.meters = meters()
        self.known: Card | None = None  # the model's card, fetched again after a swap
        # The requests that arrive while the model has calls in flight go together in the next call: one call's
        # cost for many requests, on both sides.
        self.calls = Batcher(self.model.paint.remote, self.cfg.max_batch_size, slots=self.cfg.model_calls)
        self.pages: dict[bool, str] = {}  # the demo page, with or without the public lexicons' names

    async def reconfigure(self, user_config: dict) -> None:
        """Pass a user_config (the checkpoint) to the model in this process; with two deployments it is the Model's."""
        if self.local is None:
            raise ValueError("user_config (the checkpoint) belongs to the Model deployment unless colocate is set")
        await self.local.reconfigure(user_config)

    async def check_health(self) -> None:
        """Fail when the model in this process fails its check; a Model deployment's replicas check their own."""
        if self.local is not None:
            await self.local.check_health()

    async def card(self) -> Card:
        if self.known is None:
            self.known = await self.model.card.remote()
        return self.known

    def decode(self, data: bytes, size: int, original: bool) -> tuple[images.PackedInk | None, np.ndarray]:
        """Return all a request keeps of its image: with ``original``, its ink at its own size (packed), and
        its outline at the model's size."""
        started = time.perf_counter()
        try:
            outline, ink = images.read_ink(images.decode(data, self.limits), size, original)
        except images.ImageTooLarge as err:
            raise ClientError(413, str(err)) from None
        except images.UnsupportedFormat as err:
            raise ClientError(415, str(err)) from None
        except images.ImageError as err:
            raise ClientError(422, str(err)) from None
        self.meters.decode_latency.observe(time.perf_counter() - started)
        return ink, outline

    @app.post(
        "/colorize", response_class=Response, openapi_extra=api.COLORIZE_OPENAPI, responses=api.colorize_responses()
    )
    async def colorize(self, request: Request, _: Authorized) -> Response:
        """Colour outlines: multipart `image` (PNG or JPEG) + `color`, or JSON {"image": base64, "color": ...}.

        Optional `size=original` answers at the input's size. Several images (repeated `image` fields, or a JSON
        list) get a JSON list, in order, of {"image": base64 PNG} or, for an item that cannot be done,
        {"error": ..., "status": ...}.
        """
        parsed = await api.parse_colorize(request, self.limit, self.cfg.max_images_per_request)
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
        return JSONResponse(
            [
                {"image": base64.b64encode(a).decode()} if isinstance(a, bytes) else a.body() | {"status": a.status}
                for a in answers
            ]
        )

    async def colorize_all(self, parsed: api.Parsed, client: str) -> list[bytes | ClientError]:
        """Return each outline as PNG bytes, or the ClientError that refuses it (the others go on): decoded one at a
        time, each body dropped once decoded, then coloured in one call to the model."""
        loop, card = asyncio.get_running_loop(), await self.card()
        answers: list = []
        for i, data in enumerate(parsed.images):
            parsed.images[i] = None
            try:
                decoded = (
                    data
                    if isinstance(data, ClientError)
                    else await loop.run_in_executor(
                        self.codec_thread, self.decode, data, card.image_size, parsed.original
                    )
                )
                answers.append(decoded)
            except ClientError as err:
                answers.append(err)
        todo = [i for i, answer in enumerate(answers) if not isinstance(answer, ClientError)]
        if todo:
            job = Job(images.pack(np.stack([answers[i][1] for i in todo])), [parsed.colours[i] for i in todo], client)
            painted = await self.calls.submit(job)
            if painted.location != card.location:
                self.known = None  # another checkpoint now: its card is fetched for the next request
            for i, image in zip(todo, painted.images()):
                answers[i] = (
                    image
                    if isinstance(image, ClientError)
                    else await loop.run_in_executor(self.codec_thread, images.encode_png, image, answers[i][0])
                )
        return answers

    @app.get("/colors", responses=api.error_responses(401))
    async def colors(self, _: Authorized) -> JSONResponse:
        """Return the checkpoint's palette and conditioning mode, and the lexicons, modifiers and notations it reads."""
        self.known = None  # asked each time: /colors describes the checkpoint serving now
        return JSONResponse(colors_listing(await self.card()))

    @app.get("/healthz", responses=api.error_responses(503))
    async def healthz(self) -> JSONResponse:
        """Answer 200 when a tiny forward pass answers on the model thread; with the checkpoint serving and a refused
        swap."""
        try:
            state = await asyncio.wait_for(self.model.check_health.remote(), HEALTH_TIMEOUT_S + 5)
        except Exception as err:
            return api.error(503, f"the model is not healthy: {getattr(err, 'cause', None) or type(err).__name__}")
        return JSONResponse({"status": "ok"} | state)

    @app.get("/", response_class=HTMLResponse)
    async def index(self) -> HTMLResponse:
        """Return the demo page: draw outlines, pick a colour, see them filled."""
        public = (await self.card()).reads_lexicons
        if public not in self.pages:
            self.pages[public] = demo_page(public)
        return HTMLResponse(self.pages[public])


def application(cfg: ServeConfig, model=Model, model_options: dict | None = None, ingress_options: dict | None = None):
    """Bind the two deployments: the ingress, and the model deployment it calls; colocated, the ingress alone,
    holding the model.

    ``*_options`` go over the defaults (``ray_actor_options`` key by key); tests use them for faults and resources.
    """

    def merged(defaults: dict, given: dict | None) -> dict:
        given = dict(given or {})
        actor = defaults["ray_actor_options"] | given.get("ray_actor_options", {})
        env = TRANSPORT | actor.get("runtime_env", {}).get("env_vars", {})
        actor["runtime_env"] = actor.get("runtime_env", {}) | {"env_vars": env}
        logging = {"logging_config": {"enable_access_log": cfg.access_log}}
        return defaults | logging | given | {"ray_actor_options": actor}

    model_defaults = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        **replica_options(cfg.replicas, cfg),
        "ray_actor_options": {"num_cpus": cfg.cpus, "num_gpus": 1 if cfg.gpu else 0},
    }
    ingress_defaults = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        **replica_options(cfg.ingress_replicas, cfg),
        "ray_actor_options": {"num_cpus": cfg.ingress_cpus},
    }
    config = asdict(cfg)
    if cfg.colocate:
        one = merged(model_defaults | {"max_queued_requests": cfg.max_queued_requests}, model_options)
        return Ingress.options(**merged(one, ingress_options)).bind(config, model.func_or_class)
    painter = model.options(**merged(model_defaults, model_options)).bind(config)
    return Ingress.options(**merged(ingress_defaults, ingress_options)).bind(config, painter)


def build_app(args: dict):
    """Build the application: `serve run polycolor.serve:build_app checkpoint=...`, config files and main() all use it.

    The checkpoint reaches the model's replicas as its deployment's ``user_config`` (``reconfigure``), never as
    their arguments. In a Serve config file put it there (``deployments: [{name: Model, user_config:
    {checkpoint: ...}}]``): a changed ``args`` rebuilds the app and replaces its replicas, a changed
    ``user_config`` swaps the checkpoint into the running ones.
    """
    cfg = ServeConfig.from_args(dict(args))
    if not cfg.checkpoint:
        return application(cfg)
    # Fail start-up here, naming the file (or the missing extra), not in every replica; a half-written
    # checkpoint in a bucket fails its hash check here too.
    Colorizer.from_checkpoint(cfg.checkpoint, device="cpu")
    return application(replace(cfg, checkpoint=""), model_options={"user_config": {"checkpoint": cfg.checkpoint}})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m polycolor.serve", description="Serve a checkpoint over HTTP with Ray Serve."
    )
    add_flags(p, ServeConfig)
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it to the network)"
    )
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

    for name, value in TRANSPORT.items():  # the local Ray's processes, Serve's proxy among them, inherit these
        os.environ.setdefault(name, value)
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
    from polycolor import serve  # the importable module: its deployments are pickled by reference, not from __main__

    sys.exit(serve.main())
