"""The HTTP contract in process: the whole app (middleware, routes, worker thread, the bundled demo model)
behind fastapi's TestClient, no uvicorn and no socket. What a request's status, headers and JSON show is
checked here; test_api.py keeps the real process for what only it shows (a fresh registry, the log, signals).
"""
from __future__ import annotations

import base64
import io
import json
import re
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from amskv.classes import ClassCatalog
from amskv.config import VAR_PRESETS
from amskv.naming import image_file_name
from server import metrics
from server.schemas import GenerateRequest, ImagesGenerationRequest, ModelLimits
from tests.fakes import API_LIMITS, counter, in_process_app

@pytest.fixture(scope="module")
def api():
    with in_process_app(**API_LIMITS) as client:
        yield client


def post(api: TestClient, body: object, path: str = "/v1/generate") -> object:
    return api.post(path, json=body)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def rejected(reason: str) -> float:
    return counter(metrics.REJECTED, reason=reason)


def test_health_model_card_classes_and_docs(api):
    assert api.get("/livez").status_code == 200
    assert api.get("/readyz").json()["status"] == "READY"
    card = api.get("/v1/models").json()["data"][0]
    assert card["kv_bytes_per_image"] > 0 and 1 <= card["max_batch"] <= 4
    assert card["batch_invariance"].startswith("auto: ")  # the default, and what the check at load chose
    classes = api.get("/v1/classes").json()["data"]
    assert len(classes) == card["num_classes"]
    if card["num_classes"] == 10:
        assert classes[3]["names"][0] == "three"
    paths = api.get("/openapi.json").json()["paths"]
    assert "/v1/generate" in paths and "/generate" not in paths  # the original path works, undocumented
    # The generate bodies are validated in a dependency (server/routes/deps.py); the schema still shows them.
    for path, model in (("/v1/generate", "GenerateRequest"), ("/v1/images/generations", "ImagesGenerationRequest")):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}, body
    assert api.get("/docs").status_code == 200
    assert api.post("/_test/faults", json={"kill_worker": True}).status_code == 404


def test_docs_page_loads_its_assets_from_the_server_itself(api):
    page = api.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert len(urls) >= 4, urls  # stylesheet, icon, script, the OpenAPI document
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"/docs loads {url} from another host"
        assert api.get(url).status_code == 200, url
    assert re.search(r"https?://", page.text) is None  # nothing is fetched from elsewhere (no CDN, no validator)
    assert api.get("/redoc").status_code == 404  # its page would load a CDN script


def test_every_batch_records_the_time_of_each_scale(api):
    def counts() -> dict[str, float]:
        text = api.get("/metrics").text
        return {s.labels["scale"]: s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "amskv_scale_duration_seconds_count"}

    before = counts()
    response = post(api, {"class_labels": [3], "seed": 11})
    assert response.status_code == 200, response.text
    after = counts()
    assert set(after) == set(before) and len(after) > 1
    assert all(after[scale] - before[scale] >= 1 for scale in after)  # the batch's every scale observed once


def test_images_decode_at_the_model_resolution_in_every_format(api):
    card = api.get("/v1/models").json()["data"][0]
    side, mode = card["resolution"], "L" if card["channels"] == 1 else "RGB"

    response = post(api, {"class_labels": [1, 2], "n": 2, "seed": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == card["id"] and body["id"] == response.headers["x-request-id"]
    assert [(d["index"], d["class_label"], d["seed"]) for d in body["data"]] == \
        [(0, 1, 7), (1, 1, 8), (2, 2, 9), (3, 2, 10)]
    for item in body["data"]:
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert image.format == "PNG" and image.size == (side, side) and image.mode == mode
    assert body["usage"]["images"] == 4 and body["usage"]["inference_time_s"] > 0

    png = post(api, {"class_labels": [1], "seed": 7, "response_format": "png"})
    assert png.headers["content-type"] == "image/png"
    assert (png.headers["x-seed"], png.headers["x-class-label"]) == ("7", "1")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), decode(body["data"][0]["b64_json"]))

    archive = zipfile.ZipFile(io.BytesIO(post(api, {"class_labels": [2], "n": 2, "seed": 9,
                                                    "response_format": "zip"}).content))
    manifest = json.loads(archive.read("manifest.json"))
    files = [item["file"] for item in manifest["data"]]
    assert files == ["000_c2_s9.png", "001_c2_s10.png"] == [image_file_name(i, 2, 9 + i) for i in range(2)]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(archive.read(files[0])))),
                          decode(body["data"][2]["b64_json"]))


def test_large_request_is_split_across_batches(api):
    response = post(api, {"class_labels": ["seven"], "n": 10, "seed": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["seed"] for d in body["data"]] == list(range(5, 15))
    assert body["usage"]["batches"] == 3 and body["usage"]["batch_images"] == 4


# body, the param its 422 names, the error code, and the reason it is counted under
BAD_FIELDS = [
    ({"class_labels": [1], "cfg_scale": 25}, "cfg_scale", "invalid_value", "invalid"),
    ({"class_labels": [1], "cfg_scale": -1}, "cfg_scale", "invalid_value", "invalid"),
    ({"class_labels": [1], "seed": 2**32}, "seed", "invalid_value", "invalid"),
    ({"class_labels": [1], "seed": -1}, "seed", "invalid_value", "invalid"),
    ({"class_labels": [1], "top_p": 1.5}, "top_p", "invalid_value", "invalid"),
    ({"class_labels": [1], "n": 0}, "n", "invalid_value", "invalid"),
    ({"class_labels": [1, "no-such-class"]}, "class_labels[1]", "unknown_class_label", "invalid"),
    ({"class_labels": [1, 12345]}, "class_labels[1]", "unknown_class_label", "invalid"),
    ({"class_labels": []}, "class_labels", "invalid_value", "invalid"),
    ({"class_labels": [1], "colour": "red"}, "colour", "invalid_value", "invalid"),
    ({"class_labels": [1], "n": 17}, "n", "too_many_images", "too_many_images"),  # over max_images_per_request
    ({"class_labels": [1, 2], "response_format": "png"}, "response_format", "invalid_value", "invalid"),
    ({"class_labels": [1], "top_k": 10**9}, "top_k", "invalid_value", "invalid"),
    ({"class_labels": ["eleven"], "stream": True}, "class_labels[0]", "unknown_class_label", "invalid"),
]


@pytest.mark.parametrize(("body", "param", "code", "reason"), BAD_FIELDS)
def test_bad_fields_get_422_naming_the_field_and_are_counted_once(api, body, param, code, reason):
    before = rejected(reason)
    response = post(api, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert param.split("[")[0] in error["message"] or "class" in error["message"]
    assert rejected(reason) == before + 1


def test_a_check_against_the_model_keeps_its_words(api):
    """The checks that need the loaded model answer with their own message, not pydantic's."""
    error = post(api, {"class_labels": [1], "n": 17}).json()["error"]
    assert error["message"] == "1 labels x n=17 = 17 images; at most 16 per request"
    error = post(api, {"class_labels": [1, 2], "response_format": "png"}).json()["error"]
    assert error["message"] == ("response_format 'png' returns one image, but 2 were requested; "
                                "use b64_json or zip")
    error = post(api, {"class_labels": [4], "response_format": "zip", "stream": True}).json()["error"]
    assert (error["param"], error["message"]) == ("response_format",
                                                  "stream: images are streamed as b64_json, not 'zip'")
    vocab = VAR_PRESETS["demo"].var.vocab_size  # the in-process app serves the bundled demo model
    error = post(api, {"class_labels": [1], "top_k": vocab + 1}).json()["error"]
    assert error["message"] == f"top_k: at most the vocabulary size (allowed: 0 <= top_k <= {vocab})"
    assert post(api, {"class_labels": [1], "top_k": vocab, "seed": 3}).status_code == 200
    # top_k left at its default (900) is clamped to a smaller vocabulary, not refused
    assert vocab < 900 and post(api, {"class_labels": [1], "seed": 3}).status_code == 200


def test_nan_empty_body_wrong_type_and_oversized_body_are_refused_and_counted(api):
    nan = api.post("/generate", content=b'{"class_labels": [1], "cfg_scale": NaN}',
                   headers={"content-type": "application/json"})
    assert nan.status_code == 422 and nan.json()["error"]["param"] == "cfg_scale"
    empty = api.post("/generate")
    assert empty.status_code == 422 and empty.json()["error"]["param"] == "body"
    before = {reason: rejected(reason) for reason in ("unsupported_media_type", "body_too_large")}
    wrong = api.post("/generate", content=b"class_labels=1", headers={"content-type": "text/plain"})
    assert wrong.status_code == 415 and wrong.json()["error"]["code"] == "unsupported_media_type"
    huge = api.post("/generate", json={"class_labels": [1] * 40000})
    assert huge.status_code == 413 and "65536" in huge.json()["error"]["message"]
    chunked = api.post("/generate", content=iter([b'{"class_labels": [', b"1, " * 30000, b"1]}"]),
                       headers={"content-type": "application/json"})  # no Content-Length: counted while read
    assert chunked.status_code == 413
    assert rejected("unsupported_media_type") == before["unsupported_media_type"] + 1
    assert rejected("body_too_large") == before["body_too_large"] + 2


def test_only_the_generate_endpoints_count_refusals(api):
    before = sum(counter(metrics.REJECTED, reason=reason) for reason in metrics.REJECT_REASONS)
    assert api.post("/v1/nothing-here", json={}).status_code == 404
    assert api.get("/v1/generate").status_code == 405
    assert api.post("/v1/generate", json={"class_labels": [1], "seed": 2}).status_code == 200
    assert sum(counter(metrics.REJECTED, reason=reason) for reason in metrics.REJECT_REASONS) == before


LIMITS_IMAGENET = ModelLimits(catalog=ClassCatalog.imagenet(), model_name="var-d16", resolution=256,
                              scales=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), vocab_size=4096, max_images_per_request=256)


def test_labels_resolve_against_the_catalog_and_a_bad_one_names_its_position():
    body = GenerateRequest.model_validate({"class_labels": [207, "n01440764", "Golden Retriever", "980"]},
                                          context=LIMITS_IMAGENET)
    assert body.labels == [207, 0, 207, 980]
    for labels, param, words in (([1, "crane"], "class_labels[1]", "n02012849"),  # a bird (134) and a machine
                                 (["n99999999"], "class_labels[0]", "/v1/classes")):
        with pytest.raises(ValidationError) as caught:
            GenerateRequest.model_validate({"class_labels": labels}, context=LIMITS_IMAGENET)
        (error,) = caught.value.errors()
        assert error["ctx"]["param"] == param and error["ctx"]["code"] == "unknown_class_label"
        assert words in error["ctx"]["message"]
    prompt = ImagesGenerationRequest.model_validate({"prompt": "goldfish"}, context=LIMITS_IMAGENET)
    assert prompt.labels == [1]


def test_without_the_model_only_the_fields_are_checked():
    """FastAPI's own parse has no context: labels stay unresolved until the model's limits are given."""
    body = GenerateRequest.model_validate({"class_labels": ["no-such-class"]})
    with pytest.raises(RuntimeError, match="not validated against the model"):
        _ = body.labels
