"""A Python client of the colouring service, with retries: what the README's example, the benches and the tests use.

    from polycolor.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        client.colorize("outline.png", "teal").save("teal.png")
        answers = client.colorize_many(["a.png", "b.png"], ["teal", "red"])  # an image, or a ServiceError, each

408, 429 and 503 mean "not now": they are retried with exponential backoff and full jitter, waiting at least
what ``Retry-After`` asks, as are dropped connections (``/colorize`` changes nothing, so a retry is safe).
Any other refusal raises ``ServiceError`` at once, with the service's status, message and field at fault.
``AsyncClient`` is the same for asyncio.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

RETRIED = (408, 429, 503)
Picture = Image.Image | bytes | str | Path


class ServiceError(Exception):
    """A refusal from the service: its HTTP status, its message, and the field at fault ("color") when named."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.field = status, message, field


@dataclass(frozen=True)
class Retry:
    """How requests are retried: up to ``tries`` in all, waiting ``backoff_s`` doubling to ``max_backoff_s``, with
    full jitter, and at least what a ``Retry-After`` header asks."""

    tries: int = 6
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def wait(self, attempt: int, answer: httpx.Response | None) -> float:
        """Return how long to wait before try ``attempt + 1`` after ``answer`` (None: the connection failed)."""
        delay = random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))
        after = answer.headers.get("retry-after", "") if answer is not None else ""
        return max(delay, float(after)) if after.replace(".", "", 1).isdigit() else delay


def png_of(picture: Picture) -> bytes:
    """Return the bytes to send for ``picture``: a file's own bytes, or a PIL image as PNG."""
    if isinstance(picture, bytes):
        return picture
    if isinstance(picture, (str, Path)):
        return Path(picture).read_bytes()
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def form(pictures: Sequence[Picture], colours: Sequence[str], original_size: bool) -> dict:
    """Return httpx's ``files`` and ``data`` for a multipart ``/colorize``."""
    files = [("image", (f"{i}.png", png_of(p), "image/png")) for i, p in enumerate(pictures)]
    return {"files": files, "data": {"color": list(colours)} | ({"size": "original"} if original_size else {})}


def refused(answer: httpx.Response) -> ServiceError:
    """Return the ServiceError an error answer carries (a JSON body, or the proxy's plain text)."""
    try:
        body = answer.json()
        return ServiceError(answer.status_code, body.get("error", answer.text), body.get("field"))
    except ValueError:
        return ServiceError(answer.status_code, answer.text.strip() or answer.reason_phrase)


def images_of(answer: httpx.Response, many: bool) -> list[Image.Image | ServiceError]:
    """Return the images a 200 answer holds, an item refused on its own as its ServiceError."""
    if not many:
        return [Image.open(io.BytesIO(answer.content))]
    items = answer.json()
    return [
        Image.open(io.BytesIO(base64.b64decode(item["image"])))
        if "image" in item
        else ServiceError(item.get("status", 422), item.get("error", ""), item.get("field"))
        for item in items
    ]


class Client:
    """A synchronous client of the service at ``url``; ``api_key`` is sent as ``Authorization: Bearer``."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0, retry: Retry = Retry()):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http, self.retry = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout), retry

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """Send a request, retrying what ``Retry`` retries; ServiceError for any other refusal."""
        for attempt in range(self.retry.tries):
            answer = None
            try:
                answer = self.http.request(method, path, **kwargs)
                if answer.status_code < 400:
                    return answer
                if answer.status_code not in RETRIED:
                    raise refused(answer)
            except httpx.TransportError:
                if attempt == self.retry.tries - 1:
                    raise
            if attempt < self.retry.tries - 1:
                time.sleep(self.retry.wait(attempt, answer))
        raise refused(answer)

    def colorize(self, picture: Picture, colour: str, original_size: bool = False) -> Image.Image:
        """Return ``picture`` (a PIL image, PNG or JPEG bytes, or a path) coloured ``colour``."""
        return images_of(self.request("POST", "/colorize", **form([picture], [colour], original_size)), many=False)[0]

    def colorize_many(
        self, pictures: Sequence[Picture], colours: str | Sequence[str], original_size: bool = False
    ) -> list:
        """Return each picture coloured, in order, in one request: its image, or the ServiceError refusing it alone."""
        colours = [colours] if isinstance(colours, str) else colours
        answer = self.request("POST", "/colorize", **form(pictures, colours, original_size))
        return images_of(answer, many=len(pictures) > 1)

    def colors(self) -> dict:
        """Return what the service tells of the colours it reads (``GET /colors``)."""
        return self.request("GET", "/colors").json()

    def health(self) -> dict:
        """Return the service's health (``GET /healthz``); ServiceError 503 when it is not healthy."""
        return self.request("GET", "/healthz").json()


class AsyncClient(Client):
    """``Client`` for asyncio: the same methods, awaited."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retry: Retry = Retry(),
        connections: int = 100,
    ):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=connections)
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout, limits=limits)
        self.retry = retry

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        for attempt in range(self.retry.tries):
            answer = None
            try:
                answer = await self.http.request(method, path, **kwargs)
                if answer.status_code < 400:
                    return answer
                if answer.status_code not in RETRIED:
                    raise refused(answer)
            except httpx.TransportError:
                if attempt == self.retry.tries - 1:
                    raise
            if attempt < self.retry.tries - 1:
                await asyncio.sleep(self.retry.wait(attempt, answer))
        raise refused(answer)

    async def colorize(self, picture: Picture, colour: str, original_size: bool = False) -> Image.Image:
        return images_of(
            await self.request("POST", "/colorize", **form([picture], [colour], original_size)), many=False
        )[0]

    async def colorize_many(
        self, pictures: Sequence[Picture], colours: str | Sequence[str], original_size: bool = False
    ) -> list:
        colours = [colours] if isinstance(colours, str) else colours
        return images_of(
            await self.request("POST", "/colorize", **form(pictures, colours, original_size)), many=len(pictures) > 1
        )

    async def colors(self) -> dict:
        return (await self.request("GET", "/colors")).json()

    async def health(self) -> dict:
        return (await self.request("GET", "/healthz")).json()
