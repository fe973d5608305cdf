"""The OpenAI Images API in process, driven by the official `openai` Python client over fastapi's TestClient
(an httpx client): what the client sends and parses is the contract; no socket is needed to show it."""
from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from amskv_tools.demo.classifier import load_classifier, predict
from tests.fakes import API_LIMITS, in_process_app

SEED = 7


@pytest.fixture(scope="module")
def api():
    with in_process_app(**API_LIMITS) as client:
        client.model = client.get("/v1/models").json()["data"][0]["id"]
        yield client


@pytest.fixture(scope="module")
def client(api):
    with openai.OpenAI(base_url=f"{str(api.base_url).rstrip('/')}/v1", api_key="unused", max_retries=0, timeout=120,
                       http_client=api) as made:
        yield made


def png(b64: str) -> np.ndarray:
    raw = base64.b64decode(b64)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(raw)))


def test_images_generate_returns_pngs_of_the_prompted_class(api, client):
    result = client.images.generate(model=api.model, prompt="seven", n=2, response_format="b64_json",
                                    extra_body={"seed": SEED})
    assert isinstance(result.created, int) and len(result.data) == 2
    images = [png(item.b64_json) for item in result.data]
    assert all(image.shape == (32, 32) for image in images)
    assert [item.revised_prompt for item in result.data] == ["seven", "seven"]
    digits = predict(load_classifier(), torch.from_numpy(np.stack(images)[..., None]))
    assert digits.tolist() == [7, 7]  # the shipped MNIST classifier reads both as sevens


def test_streamed_partial_images_then_the_completed_image_equal_to_the_plain_one(api, client):
    plain = client.images.generate(model=api.model, prompt="seven", n=1, response_format="b64_json",
                                   extra_body={"seed": SEED})
    events = list(client.images.generate(model=api.model, prompt="seven", n=1, response_format="b64_json",
                                         stream=True, partial_images=3, extra_body={"seed": SEED}))
    types = [event.type for event in events]
    assert types == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:-1]] == [0, 1, 2]
    for event in events[:-1]:
        assert png(event.b64_json).shape == (32, 32) and event.size == "32x32" and event.output_format == "png"
    completed = events[-1]
    assert completed.b64_json == plain.data[0].b64_json  # the same PNG bytes
    assert completed.usage.output_tokens > 0 and completed.usage.total_tokens == completed.usage.output_tokens


def test_a_prompt_by_index_gives_the_same_image_as_by_name(api, client):
    by_index = client.images.generate(model=api.model, prompt="7", response_format="b64_json",
                                      extra_body={"seed": SEED})
    by_name = client.images.generate(model=api.model, prompt="seven", response_format="b64_json",
                                     extra_body={"seed": SEED})
    assert by_index.data[0].b64_json == by_name.data[0].b64_json


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"response_format": "url"}, "response_format", "invalid_value"),
    ({"size": "1024x1024"}, "size", "invalid_value"),
    ({"prompt": "a photo of a cat"}, "prompt", "unknown_class_label"),
    ({"model": "dall-e-3"}, "model", "model_not_found"),
    ({"n": 0}, "n", "invalid_value"),
    ({"n": 17}, "n", "too_many_images"),  # over max_images_per_request
    ({"stream": True, "partial_images": 99}, "partial_images", "invalid_value"),
    ({"partial_images": 1}, "partial_images", "invalid_value"),  # partial images need stream: true
    ({"extra_body": {"colour": "red"}}, "colour", "invalid_value"),  # an unknown field
])
def test_invalid_requests_get_openai_400s_naming_the_field(api, client, fields, param, code):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**{"model": api.model, "prompt": "seven", **fields})
    assert caught.value.status_code == 400
    error = caught.value.body
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert error["message"]
    if param == "response_format":
        assert "b64_json" in error["message"]
    if param == "size":
        assert "32x32" in error["message"]
