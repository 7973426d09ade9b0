"""The HTTP contract of the colouring service: what each path takes and answers, declared and read within limits.

``polycolor.serve`` binds these routes to its Ray Serve deployments; nothing here imports Ray. Every request
body is read under a byte limit, every field is checked for its type and count, and every refusal is a
``ClientError``: a 4xx with a JSON ``{"error": ...}`` body that names the problem. The OpenAPI schema at
/openapi.json declares the two bodies of ``POST /colorize`` (multipart and JSON) and every status it answers,
and /docs renders it from assets the app serves itself (no CDN).
"""

from __future__ import annotations

import base64
import binascii
import copy
import hmac
import json
import os
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

SIZES = ("model", "original")
REASONS = {
    400: "malformed",
    401: "unauthorized",
    408: "timeout",
    413: "too_large",
    415: "unsupported_type",
    422: "invalid",
    429: "rate_limited",
    503: "unavailable",
}


class ClientError(Exception):
    """A refusal the client caused: its 4xx status, the message it reads, a short reason for the metrics (from
    the status unless given, as "unknown_colour" is), and the request's field at fault when it is the colour."""

    def __init__(
        self, status: int, message: str, headers: dict | None = None, reason: str = "", field: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.headers, self.field = status, message, headers, field
        self.reason = reason or REASONS.get(status, "other")

    def body(self) -> dict:
        """Return what the client reads: {"error": ...}, with "field": "color" when the colour is at fault."""
        return {"error": self.message} | ({"field": self.field} if self.field else {})

    def __reduce__(self):  # crosses from the model deployment to the ingress whole
        return ClientError, (self.status, self.message, self.headers, self.reason, self.field)


# ---------------------------------------------------------------------------------------------------
# The declared shapes (OpenAPI). Parsing does not go through FastAPI's own validation: one path takes two
# content types, and each refusal must name its field in our error shape.


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer of the service (but Serve's own plain-text 408 and 503)."""

    model_config = ConfigDict(extra="forbid")
    error: str = Field(description="what is wrong, and what was expected")
    field: Literal["color"] | None = Field(
        None, description="present when the colour is at fault, for a form to show it there"
    )


class ItemAnswer(BaseModel):
    """One outline's answer in a several-outline request: its PNG, or why it could not be done."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="the coloured outline, a base64 PNG")
    error: str | None = Field(None, description="why this outline could not be coloured (the others were)")
    status: int | None = Field(None, description="the status this outline alone would have got")
    field: Literal["color"] | None = None


Colours = Annotated[list[str], Field(min_length=1)]


class ColorizeJSON(BaseModel):
    """The JSON body of ``POST /colorize``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    image: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="a base64 PNG or JPEG, or a list of them"
    )
    color: str | Colours | None = Field(
        None, description="a colour (name, #hex, rgb(), hsl()) for all, or one per image"
    )
    colour: str | Colours | None = Field(None, description="the same as color")
    size: Literal["model", "original"] = Field("model", description="original: answer at the input's size")


COLOUR_TEXT = {"type": "string", "maxLength": 64, "description": "a name, modifiers, #hex, rgb() or hsl()"}
MULTIPART = {
    "type": "object",
    "properties": {
        "image": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "minItems": 1,
            "description": "PNG or JPEG outlines, any mode; repeat the field for several",
        },
        "color": {
            "type": "array",
            "items": COLOUR_TEXT,
            "minItems": 1,
            "example": ["teal"],
            "description": "one colour for all, or one per image",
        },
        "size": {
            "type": "string",
            "enum": list(SIZES),
            "default": "model",
            "description": "original: answer at the input's size",
        },
    },
    "required": ["image"],
    "additionalProperties": False,
}


def error_responses(*statuses: int) -> dict:
    """Return the OpenAPI ``responses`` entries of ``statuses``, each an ``ErrorBody``."""
    said = {
        400: "malformed body (JSON, multipart or base64)",
        401: "missing or wrong API key (when the server has one)",
        408: "the request took longer than the server's timeout (Serve's proxy: plain text)",
        413: "body, image or image count over its limit",
        415: "content type or image format not accepted",
        422: "a field is missing, of the wrong type, or its value cannot be used (an unknown colour suggests names)",
        429: "too many phrases that need a text encoder run, from this client",
        500: "internal error",
        503: "the service is overloaded or not ready; retry with backoff (Serve's proxy: plain text)",
    }
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    plain = content | {"text/plain": {"schema": {"type": "string"}}}
    return {
        status: {"description": said[status], "content": plain if status in (408, 503) else content}
        for status in statuses
    }


SQUARE = (  # a 24x24 square outline, as a PNG in base64: the JSON body's example
    "iVBORw0KGgoAAAANSUhEUgAAABgAAAAYAQAAAADIDABVAAAAI0lEQVR42mP8z8DAxIDADB8Y+FnY/39AFiMWM3xg4GdEMw8AaFYGHwxFUsMAAAAASUVORK5CYII="
)
COLORIZE_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": MULTIPART,
                "encoding": {"image": {"contentType": "image/png, image/jpeg"}},
            },
            "application/json": {
                "schema": ColorizeJSON.model_json_schema(ref_template="#/components/schemas/{model}"),
                "example": {"image": SQUARE, "color": "teal"},
            },
        },
    },
}


def colorize_responses() -> dict:
    """Return ``POST /colorize``'s answers: a PNG for one outline, a JSON list for several, and its refusals."""
    many = {"type": "array", "items": {"$ref": "#/components/schemas/ItemAnswer"}}
    ok = {
        "description": "one outline: the PNG; several: a JSON list in order",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": many},
        },
    }
    return {200: ok} | error_responses(400, 401, 408, 413, 415, 422, 429, 500, 503)


# ---------------------------------------------------------------------------------------------------
# Reading a request.


@dataclass
class Parsed:
    """A request's outlines (encoded, or the error refusing one), a colour each, whether the input's size is
    wanted, and whether the client sent a list (answered with a JSON list) or one image (answered with a PNG)."""

    images: list[bytes | ClientError]
    colours: list[str]
    original: bool
    many: bool


async def read_body(request: Request, limit: int) -> bytes:
    """Return the body, refused with 413 as soon as it is known to exceed ``limit`` (declared or streamed)."""
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


async def parse_colorize(request: Request, limit: int, max_images: int) -> Parsed:
    """Return the outlines, colours and size of a ``POST /colorize``, multipart or JSON (see ``COLORIZE_OPENAPI``)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/json", "multipart/form-data"):
        raise ClientError(
            415,
            f"content type {content_type or 'none'!r} is not accepted; send multipart/form-data or application/json",
        )
    body = await read_body(request, limit)
    if content_type == "application/json":
        return parse_json(body, max_images)
    return await parse_form(request, body, max_images)


def parse_json(body: bytes, max_images: int) -> Parsed:
    """Return what a JSON ``/colorize`` body asks (``ColorizeJSON``)."""
    try:
        payload = json.loads(body, parse_int=Decimal, parse_float=Decimal)  # a number of any size is read, then refused
    except RecursionError:  # json nests in Python's stack: thousands of brackets exhaust it
        raise ClientError(400, "body is JSON nested too deeply") from None
    except ValueError:  # invalid JSON or UTF-8, and numbers past Python's digit limit
        raise ClientError(400, "body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ClientError(422, 'JSON body must be an object {"image": "<base64>" or ["<base64>", ...], "color": "..."}')
    try:
        asked = ColorizeJSON.model_validate(payload)
    except ValidationError as err:
        raise invalid(err) from None
    many = isinstance(asked.image, list)
    encoded = asked.image if many else [asked.image]
    check_count(len(encoded), max_images)
    images = [base64_image(item) for item in encoded]  # a bad item fails alone when there are several
    if not many and isinstance(images[0], ClientError):
        raise images[0]
    return finish(images, one_of(asked.color, asked.colour), asked.size, many)


def invalid(err: ValidationError) -> ClientError:
    """Return the 422 naming the first field a JSON body got wrong, and what it expected."""
    first = err.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"][:2] if not str(part).startswith(("list[", "str", "literal")))
    kind = first["type"]
    if kind == "extra_forbidden":
        return ClientError(422, f'field "{where}" is not known; expected image, color (or colour) and size')
    expected = {
        "image": "a base64 string or a list of them",
        "color": "a string or a list of strings",
        "colour": "a string or a list of strings",
        "size": '"model" or "original"',
    }.get(where.split(".")[0], "")
    if kind == "missing":
        return ClientError(422, f'field "{where}" is missing; expected {expected}')
    return ClientError(
        422, f'field "{where}" is not valid; expected {expected}', field="color" if where.startswith("colo") else None
    )


async def parse_form(request: Request, body: bytes, max_images: int) -> Parsed:
    """Return what a multipart ``/colorize`` form asks: ``image`` files, ``color`` texts, ``size``."""

    async def replay() -> dict:  # the body, already read under the limit, handed to Starlette's form parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_images + 1, max_fields=max_images * 2 + 8)
    except StarletteHTTPException as err:  # Starlette's own limits (too many files or fields, a part too big)
        if "Too many files" in str(err.detail):
            raise ClientError(413, f"more than {max_images} images in one request; the limit is {max_images}") from None
        raise ClientError(400, f"body is not a valid multipart form ({err.detail})") from None
    except Exception:  # python-multipart raises several types for malformed bodies
        raise ClientError(400, "body is not a valid multipart form") from None
    try:
        if unknown := sorted(set(form.keys()) - {"image", "color", "colour", "size"}):
            raise ClientError(
                422, f'form field "{unknown[0]}" is not known; expected image, color (or colour) and size'
            )
        uploads = form.getlist("image")
        if not uploads or not all(isinstance(u, UploadFile) for u in uploads):
            raise ClientError(422, 'form field "image" is missing or not a file')
        check_count(len(uploads), max_images)
        colours = form.getlist("color")
        if not all(isinstance(c, str) for c in colours):
            raise ClientError(422, 'form field "color" must be text, not a file', field="color")
        sizes = form.getlist("size")
        if len(sizes) > 1 or not all(isinstance(s, str) for s in sizes):
            raise ClientError(422, 'form field "size" must be given at most once, as text: "model" or "original"')
        images = [await u.read() for u in uploads]
        return finish(images, colours or None, sizes[0] if sizes else "model", len(uploads) > 1)
    finally:
        await form.close()  # the images are in ``images`` now: the uploads' files are let go


def one_of(color, colour):
    """Return the colour given as ``color`` or as ``colour``; 422 when both are."""
    if color is not None and colour is not None:
        raise ClientError(422, 'give the colour as "color" or as "colour", not both', field="color")
    return color if color is not None else colour


def finish(images: list, colour: str | list[str] | None, size: str, many: bool) -> Parsed:
    """Return the Parsed request, once its colours match its images and its size is known."""
    colours = colour if isinstance(colour, list) else [colour]
    if colour is None:
        raise ClientError(422, 'field "color" is missing; expected a name, #hex or rgb(r, g, b)', field="color")
    if len(colours) not in (1, len(images)):
        raise ClientError(
            422, f"{len(images)} images and {len(colours)} colours; send one colour for all, or one per image"
        )
    if size not in SIZES:
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


# ---------------------------------------------------------------------------------------------------
# The API key, a dependency of every path it protects.


def api_key() -> str | None:
    """Return the key clients must send (POLYCOLOR_API_KEY), or None when the service is open."""
    return os.environ.get("POLYCOLOR_API_KEY") or None


def require_key(request: Request) -> None:
    """Refuse the request (401) unless it carries ``Authorization: Bearer <key>``, when a key is set."""
    key = api_key()
    given = request.headers.get("authorization", "")
    if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise ClientError(
            401, "missing or wrong API key; send Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"}
        )


Authorized = Annotated[None, Depends(require_key)]


# ---------------------------------------------------------------------------------------------------
# The app: its errors, and its OpenAPI schema (with the key's security scheme only where a key is set).


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def make_app(on_refusal=lambda err: None) -> FastAPI:
    """Return the FastAPI app with its error handlers; ``on_refusal(ClientError)`` sees every 4xx (for the metrics)."""
    app = FastAPIOffline(
        title="polycolor",
        description="Colour polygon outlines by colour name.",
        redoc_url=None,
        static_url="/docs/assets",
    )
    app.state.on_refusal = on_refusal

    @app.exception_handler(ClientError)
    async def refused(request: Request, err: ClientError) -> JSONResponse:
        request.app.state.on_refusal(err)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {
            404: f"no such path {request.url.path!r}; see /docs",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }
        return error(
            exc.status_code, messages.get(exc.status_code, str(exc.detail)), headers=exc.headers
        )  # 405 keeps Allow

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, "request does not match the documented form; see /docs")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error(500, "internal error; the request was not processed")

    default_openapi = app.openapi

    def openapi() -> dict:
        schema = copy.deepcopy(default_openapi())  # FastAPI caches its schema: the key's scheme is added to a copy
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ErrorBody, ItemAnswer):
            components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        if api_key():
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path in ("/colorize", "/colors"):
                for operation in schema["paths"].get(path, {}).values():
                    operation["security"] = [{"bearer": []}]
        return schema

    app.openapi = openapi
    return app
