"""Hostile and malformed requests: each gets a 4xx whose error envelope names the problem.

In process (tests/fakes.py): the whole app with its middleware and the demo model behind fastapi's
TestClient; no socket is needed to show a status and a body. tests/server/test_contract.py already
covers the plain range errors (cfg_scale 25, seed 2**32, n 0, an unknown field, a declared
Content-Length over the limit); this file covers what a fuzzer or a broken client sends: huge and deep
bodies, non-finite numbers, huge integers, unicode junk, non-UTF-8 bytes, other media types and
non-object JSON.
"""
from __future__ import annotations

import pytest

from server import metrics
from tests.fakes import counter, in_process_app
from tests.reliability.conftest import SMALL_LIMITS

JSON = {"content-type": "application/json"}


def chunks(data: bytes, size: int = 4096):
    """A body without Content-Length (chunked transfer), so only the streaming limit can stop it."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.fixture(scope="module")
def api():
    """The small limits of the reliability suite, at most 4 images per request; no test changes its state."""
    limits = {name.removeprefix("AMSKV_").lower(): int(value) for name, value in SMALL_LIMITS.items()}
    with in_process_app(**{**limits, "max_images_per_request": 4}) as client:
        yield client


# name: (request keyword arguments, status, error code, param, words the message must contain)
CASES = {
    "10,000 labels": (dict(json={"class_labels": [1] * 10_000}), 422, "invalid_value", "class_labels",
                      ["at most 256"]),
    "over the size limit, chunked": (
        dict(content=chunks(b'{"class_labels": [' + b"1, " * 30_000 + b'1]}'), headers=JSON),
        413, "body_too_large", "body", ["65536"]),
    "cfg_scale NaN": (dict(content=b'{"class_labels": [1], "cfg_scale": NaN}', headers=JSON),
                      422, "invalid_value", "cfg_scale", ["finite"]),
    "cfg_scale Infinity": (dict(content=b'{"class_labels": [1], "cfg_scale": Infinity}', headers=JSON),
                           422, "invalid_value", "cfg_scale", ["finite"]),
    "cfg_scale -Infinity": (dict(content=b'{"class_labels": [1], "cfg_scale": -Infinity}', headers=JSON),
                            422, "invalid_value", "cfg_scale", ["finite"]),
    "cfg_scale 1e999": (dict(content=b'{"class_labels": [1], "cfg_scale": 1e999}', headers=JSON),
                        422, "invalid_value", "cfg_scale", ["finite"]),
    "cfg_scale negative": (dict(json={"class_labels": [1], "cfg_scale": -0.5}), 422, "invalid_value", "cfg_scale",
                           ["greater than or equal to 0"]),
    "cfg_scale as a string": (dict(json={"class_labels": [1], "cfg_scale": "4"}), 422, "invalid_value",
                              "cfg_scale", ["number"]),
    "seed negative": (dict(json={"class_labels": [1], "seed": -7}), 422, "invalid_value", "seed", ["0"]),
    "seed 2**64": (dict(json={"class_labels": [1], "seed": 2**64}), 422, "invalid_value", "seed", ["4294967295"]),
    "seed 10**40": (dict(json={"class_labels": [1], "seed": 10**40}), 422, "invalid_value", "seed",
                    ["4294967295"]),
    "seed with 5000 digits": (dict(content=b'{"class_labels": [1], "seed": ' + b"9" * 5000 + b"}", headers=JSON),
                              422, "invalid_value", "body", ["not valid JSON", "digits"]),
    "seed as a float": (dict(json={"class_labels": [1], "seed": 1.5}), 422, "invalid_value", "seed", ["integer"]),
    "unknown class name": (dict(json={"class_labels": [1, "eleven"]}), 422, "unknown_class_label",
                           "class_labels[1]", ["eleven"]),
    "unicode junk": (dict(json={"class_labels": ["\u2603\u200b\U0001f642\u202e"]}), 422, "unknown_class_label",
                     "class_labels[0]", ["unknown class name"]),
    "NUL character": (dict(json={"class_labels": ["\u0000"]}), 422, "unknown_class_label", "class_labels[0]",
                      ["unknown class name"]),
    "lone surrogate": (dict(content=b'{"class_labels": ["\\ud800"]}', headers=JSON), 422, "unknown_class_label",
                       "class_labels[0]", ["unknown class name"]),
    "empty class name": (dict(json={"class_labels": [""]}), 422, "unknown_class_label", "class_labels[0]",
                         ["unknown class name"]),
    "huge class index": (dict(json={"class_labels": [10**40]}), 422, "unknown_class_label", "class_labels[0]",
                         ["out of range"]),
    "boolean label": (dict(json={"class_labels": [True]}), 422, "invalid_value", "class_labels[0]",
                      ["integer or a string"]),
    "null label": (dict(json={"class_labels": [None]}), 422, "invalid_value", "class_labels[0]",
                   ["integer or a string"]),
    "nested label": (dict(json={"class_labels": [[1]]}), 422, "invalid_value", "class_labels[0]",
                     ["integer or a string"]),
    "labels not a list": (dict(json={"class_labels": "seven"}), 422, "invalid_value", "class_labels", ["list"]),
    "invalid UTF-8": (dict(content=b'{"class_labels": ["\xff\xfe"]}', headers=JSON), 422, "invalid_value", "body",
                      ["not valid JSON", "utf-8"]),
    "nesting 20,000 deep": (dict(content=b"[" * 20_000 + b"]" * 20_000, headers=JSON), 422, "invalid_value",
                            "body", ["not valid JSON", "nesting"]),
    "trailing garbage": (dict(content=b'{"class_labels": [1]} xyz', headers=JSON), 422, "invalid_value", "body",
                         ["not valid JSON"]),
    "JSON array body": (dict(json=[1, 2]), 422, "invalid_value", "body", ["object"]),
    "JSON null body": (dict(content=b"null", headers=JSON), 422, "invalid_value", "body", ["object"]),
    "empty body, JSON type": (dict(content=b"", headers=JSON), 422, "invalid_value", "body", ["required"]),
    "empty body, no type": (dict(), 422, "invalid_value", "body", ["required"]),
    "whitespace body": (dict(content=b"  \n ", headers=JSON), 422, "invalid_value", "body", ["not valid JSON"]),
    "text/plain": (dict(content=b'{"class_labels": [1]}', headers={"content-type": "text/plain"}), 415,
                   "unsupported_media_type", "Content-Type", ["text/plain"]),
    "form encoded": (dict(data={"class_labels": "1"}), 415, "unsupported_media_type", "Content-Type",
                     ["application/x-www-form-urlencoded"]),
    "multipart": (dict(files={"file": b"{}"}), 415, "unsupported_media_type", "Content-Type", ["multipart/form-data"]),
    "application/xml": (dict(content=b"<labels/>", headers={"content-type": "application/xml"}), 415,
                        "unsupported_media_type", "Content-Type", ["application/xml"]),
    "non-ASCII content type": (dict(content=b"{}", headers={"content-type": "\u2603/json".encode()}), 415,
                               "unsupported_media_type", "Content-Type", ["application/json"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_gets_a_4xx_naming_the_problem(api, name):
    kwargs, status, code, param, words = CASES[name]
    response = api.post("/v1/generate", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word.lower() in error["message"].lower(), error
    assert "Traceback" not in response.text


def test_wrong_method_and_unknown_path_use_the_error_envelope(api):
    wrong_method = api.get("/v1/generate")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    unknown = api.post("/v2/generate", json={"class_labels": [1]})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


def test_server_stays_ready_and_serves_after_bad_input(api):
    before = counter(metrics.REJECTED, reason="invalid")
    api.post("/v1/generate", content=b"\xff" * 100, headers=JSON)
    assert counter(metrics.REJECTED, reason="invalid") == before + 1  # not even UTF-8: invalid, like any other
    assert api.get("/readyz").status_code == 200
    good = api.post("/v1/generate", json={"class_labels": ["three"], "seed": 1})
    assert good.status_code == 200 and len(good.json()["data"]) == 1
