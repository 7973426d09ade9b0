"""polycolor.api: the HTTP contract read field by field (no Ray), and declared in the OpenAPI schema."""

import base64
import json

import pytest

from polycolor import api
from polycolor.api import ClientError, parse_json

PNG = base64.b64decode(api.SQUARE)


@pytest.mark.parametrize(
    "body, status, message, field",
    [
        (b'{"image": ', 400, "body is not valid JSON", None),
        (b"[" * 20000 + b"]" * 20000, 400, "body is JSON nested too deeply", None),
        (b'"just a string"', 422, "JSON body must be an object", None),
        (
            b'{"image": "%s", "color": ' % api.SQUARE.encode() + b"9" * 5000 + b"}",
            422,
            'field "color" is not valid',
            "color",
        ),
        (json.dumps({"image": api.SQUARE, "color": None}).encode(), 422, 'field "color" is missing', "color"),
        (json.dumps({"image": api.SQUARE, "color": {"r": 1}}).encode(), 422, 'field "color" is not valid', "color"),
        (
            json.dumps({"image": 12, "color": "red"}).encode(),
            422,
            'field "image" is not valid; expected a base64 string',
            None,
        ),
        (json.dumps({"color": "red"}).encode(), 422, 'field "image" is missing', None),
        (
            json.dumps({"image": api.SQUARE, "color": "red", "size": ["original"]}).encode(),
            422,
            'field "size" is not valid',
            None,
        ),
        (
            json.dumps({"image": api.SQUARE, "color": "red", "extra": 1}).encode(),
            422,
            'field "extra" is not known',
            None,
        ),
        (json.dumps({"image": api.SQUARE, "color": "red", "colour": "blue"}).encode(), 422, "not both", "color"),
        (
            json.dumps({"image": [api.SQUARE] * 17, "color": "red"}).encode(),
            413,
            "17 images in one request; the limit is 16",
            None,
        ),
        (json.dumps({"image": [api.SQUARE] * 2, "color": ["red"] * 3}).encode(), 422, "2 images and 3 colours", None),
        (json.dumps({"image": "!!!", "color": "red"}).encode(), 400, 'field "image" is not valid base64', None),
    ],
)
def test_a_json_body_is_refused_naming_its_field(body, status, message, field):
    """S1, S2: any JSON value in any field (numbers of any size, nulls, lists, objects) is a 4xx naming the field."""
    with pytest.raises(ClientError) as refused:
        parse_json(body, max_images=16)
    assert refused.value.status == status and message in refused.value.message and refused.value.field == field


def test_a_good_json_body_reads_one_or_several_images():
    one = parse_json(json.dumps({"image": api.SQUARE, "colour": "teal", "size": "original"}).encode(), 16)
    assert (one.images, one.colours, one.original, one.many) == ([PNG], ["teal"], True, False)
    several = parse_json(json.dumps({"image": [api.SQUARE, "%%%"], "color": ["red", "blue"]}).encode(), 16)
    assert (
        several.images[0] == PNG and isinstance(several.images[1], ClientError) and several.many
    )  # a bad item fails alone


def test_the_schema_declares_every_body_and_status(monkeypatch):
    """S8: the schema declares both request bodies of /colorize, every status with its body shape, and the API key
    as a security scheme exactly when the service has one."""
    from polycolor.serve import app

    monkeypatch.delenv("POLYCOLOR_API_KEY", raising=False)
    spec = app.openapi()
    body = spec["paths"]["/colorize"]["post"]["requestBody"]["content"]
    assert (
        body["multipart/form-data"]["schema"]["required"] == ["image"]
        and body["application/json"]["example"]["color"] == "teal"
    )
    assert {"400", "401", "408", "413", "415", "422", "429", "500", "503"} <= set(
        spec["paths"]["/colorize"]["post"]["responses"]
    )
    assert "securitySchemes" not in spec["components"]
    monkeypatch.setenv("POLYCOLOR_API_KEY", "k")
    keyed = app.openapi()
    assert keyed["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert (
        keyed["paths"]["/colorize"]["post"]["security"] == [{"bearer": []}]
        and "security" not in keyed["paths"]["/healthz"]["get"]
    )
