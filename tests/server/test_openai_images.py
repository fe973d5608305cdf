"""The OpenAI Images API against the real server, driven by the official `openai` Python client."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from amskv_tools.demo.classifier import load_classifier, predict
from tests.server.test_api import SERVER_ENV, Server  # the same real-server harness

SEED = 7


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("openai"), SERVER_ENV)
    srv.model = httpx.get(f"{srv.base}/v1/models").json()["data"][0]["id"]
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120) as made:
        yield made


def png(b64: str) -> np.ndarray:
    raw = base64.b64decode(b64)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(raw)))


def test_images_generate_returns_pngs_of_the_prompted_class(server, client):
    result = client.images.generate(model=server.model, prompt="seven", n=2, response_format="b64_json",
                                    extra_body={"seed": SEED})
    assert isinstance(result.created, int) and len(result.data) == 2
    images = [png(item.b64_json) for item in result.data]
    assert all(image.shape == (32, 32) for image in images)
    assert [item.revised_prompt for item in result.data] == ["seven", "seven"]
    digits = predict(load_classifier(), torch.from_numpy(np.stack(images)[..., None]))
    assert digits.tolist() == [7, 7]  # the shipped MNIST classifier reads both as sevens


def test_streamed_partial_images_then_the_completed_image_equal_to_the_plain_one(server, client):
    plain = client.images.generate(model=server.model, prompt="seven", n=1, response_format="b64_json",
                                   extra_body={"seed": SEED})
    events = list(client.images.generate(model=server.model, prompt="seven", n=1, response_format="b64_json",
                                         stream=True, partial_images=3, extra_body={"seed": SEED}))
    types = [event.type for event in events]
    assert types == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:-1]] == [0, 1, 2]
    for event in events[:-1]:
        assert png(event.b64_json).shape == (32, 32) and event.size == "32x32" and event.output_format == "png"
    completed = events[-1]
    assert completed.b64_json == plain.data[0].b64_json  # the same PNG bytes
    assert completed.usage.output_tokens > 0 and completed.usage.total_tokens == completed.usage.output_tokens


def test_a_prompt_by_index_gives_the_same_image_as_by_name(server, client):
    by_index = client.images.generate(model=server.model, prompt="7", response_format="b64_json",
                                      extra_body={"seed": SEED})
    by_name = client.images.generate(model=server.model, prompt="seven", response_format="b64_json",
                                     extra_body={"seed": SEED})
    assert by_index.data[0].b64_json == by_name.data[0].b64_json


@pytest.mark.parametrize("fields, param", [
    ({"response_format": "url"}, "response_format"),
    ({"size": "1024x1024"}, "size"),
    ({"prompt": "a photo of a cat"}, "prompt"),
    ({"model": "dall-e-3"}, "model"),
    ({"n": 0}, "n"),
    ({"stream": True, "partial_images": 99}, "partial_images"),
])
def test_invalid_requests_get_openai_400s_naming_the_field(server, client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**{"model": server.model, "prompt": "seven", **fields})
    assert caught.value.status_code == 400
    error = caught.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    if param == "response_format":
        assert "b64_json" in error["message"]
    if param == "size":
        assert "32x32" in error["message"]


def test_unknown_field_is_a_400_naming_it(server):
    response = httpx.post(f"{server.base}/v1/images/generations", json={"prompt": "seven", "colour": "red"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "colour"
