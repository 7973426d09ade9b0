"""polycolor.client against the real service on the session's Ray: answers, refusals, the key, and retries."""

import asyncio
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from polycolor.client import AsyncClient, Client, Retry, ServiceError
from polycolor.predict import Colorizer

pytestmark = pytest.mark.timeout(300)


def test_answers_match_the_in_process_colorizer(server, outline):
    colorizer = Colorizer.from_checkpoint(server["checkpoint"], device="cpu")
    picture = Image.open(io.BytesIO(outline))
    with Client(server["url"]) as client:
        one = client.colorize(outline, "teal")
        many = client.colorize_many([picture, b"junk", outline], ["teal", "red", "no such colour"])
        sized = client.colorize(picture.resize((300, 200)), "teal", original_size=True)
    assert np.array_equal(np.asarray(one), np.asarray(colorizer.colorize(picture, "teal")))
    assert np.array_equal(np.asarray(many[0]), np.asarray(one)) and sized.size == (300, 200)
    assert isinstance(many[1], ServiceError) and many[1].status == 422
    assert isinstance(many[2], ServiceError) and many[2].field == "color" and "no such colour" in many[2].message


def test_a_refusal_is_raised_at_once_naming_its_field(server, outline):
    """A 4xx that retrying cannot cure (an unknown colour) is raised on the first answer, not retried."""
    seen = []
    with Client(server["url"]) as client:
        client.http.event_hooks["response"].append(seen.append)
        with pytest.raises(ServiceError) as refused:
            client.colorize(outline, "redd")
    assert (
        refused.value.status == 422 and refused.value.field == "color" and "did you mean 'red'" in refused.value.message
    )
    assert len(seen) == 1


def test_the_api_key_is_sent(server, outline):
    with Client(f"{server['url']}/keyed", api_key="s3cret") as client:
        assert client.colorize(outline, "red").size == (128, 128)
        assert client.colors()["conditioning"] == "concat"
    with Client(f"{server['url']}/keyed", api_key="wrong") as client, pytest.raises(ServiceError) as refused:
        client.colorize(outline, "red")
    assert refused.value.status == 401


def test_503s_are_retried_until_every_request_succeeds(server, outline):
    """L1, L5 from the client's side: 24 requests at once at a service with one slot and one queue place get 503s
    from Serve, and the client's backoff gets every one answered."""
    big = Image.open(io.BytesIO(outline)).resize((512, 512))
    statuses = []

    async def fire():
        async with AsyncClient(
            f"{server['url']}/tight", retry=Retry(tries=30, backoff_s=0.05, max_backoff_s=1.0)
        ) as client:
            client.http.event_hooks["response"].append(
                lambda answer: statuses.append(answer.status_code) or asyncio.sleep(0)
            )
            return await asyncio.gather(*(client.colorize(big, "red") for _ in range(24)))

    answers = asyncio.run(fire())
    assert len(answers) == 24 and all(a.size == (128, 128) for a in answers)
    assert 503 in statuses  # the retries were needed


def test_the_wait_honours_retry_after():
    retry = Retry(backoff_s=0.01, max_backoff_s=0.02)
    asked = httpx.Response(429, headers={"retry-after": "2"})
    assert retry.wait(0, asked) == 2.0
    assert 0 <= retry.wait(5, httpx.Response(503)) <= 0.02 and 0 <= retry.wait(0, None) <= 0.01
