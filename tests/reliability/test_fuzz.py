"""Fuzz every operation of the server's own OpenAPI document with schemathesis: never a 500.

Valid and invalid bodies both come from the schema (schemathesis' positive and negative modes). A
generated request may legitimately get 503/504 (a tiny timeout_ms), but never 500, and every
error carries the envelope. Bounded: RELIABILITY_FUZZ_EXAMPLES examples per operation (default 60),
no shrinking, a fixed seed; the server allows 4 images per request so valid bodies stay cheap.
"""
from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from tests.reliability.conftest import env_int

pytestmark = pytest.mark.slow  # starts a real server process (about 5 s each on two cores); tests/README.md

EXAMPLES = env_int("RELIABILITY_FUZZ_EXAMPLES", 60)
DOCUMENTED = {200, 404, 405, 413, 415, 422, 503, 504}
OPENAI_DOCUMENTED = DOCUMENTED - {422} | {400}  # OpenAI's Images API answers invalid requests with 400
OUTCOMES: Counter = Counter()  # (method path, status) -> count, for the summary test below


@pytest.fixture
def fuzz_schema(small_server):
    """schemathesis resolves the schema from this fixture when the test runs (after the server started)."""
    return schemathesis.openapi.from_url(f"{small_server.base}/openapi.json")


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_500(case):
    response = case.call(timeout=60)
    OUTCOMES[(case.operation.label, response.status_code)] += 1
    assert response.status_code != 500, f"{case.operation.label} -> 500: {response.text[:500]}"
    documented = OPENAI_DOCUMENTED if case.operation.path == "/v1/images/generations" else DOCUMENTED
    assert response.status_code in documented, f"{case.operation.label} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400 and case.operation.path != "/readyz":
        error = response.json()["error"]
        assert error["message"] and error["code"], error
    if response.status_code == 200 and case.operation.method.upper() == "POST":
        media = response.headers["content-type"]
        media = media[0] if isinstance(media, list) else media  # schemathesis keeps every header value
        if media.startswith("text/event-stream"):  # stream: true; a failure mid-stream is an error event
            assert response.text.startswith("event: ") and "event: error" not in response.text, response.text[-500:]
            return
        magic = {"image/png": b"\x89PNG", "application/zip": b"PK"}.get(media)
        assert response.content.startswith(magic) if magic else len(response.json()["data"]) >= 1, media


def test_fuzzing_reached_every_operation_with_valid_and_invalid_requests():
    """Guards against a fuzz run that silently generated nothing (e.g. an unreachable schema)."""
    print("fuzz outcomes:", dict(sorted(OUTCOMES.items())))
    operations = {label for label, _ in OUTCOMES}
    assert "POST /v1/generate" in operations and len(operations) >= 5, OUTCOMES
    generate = {status: n for (label, status), n in OUTCOMES.items() if label == "POST /v1/generate"}
    assert generate.get(200, 0) > 0 and generate.get(422, 0) > 0, generate
    assert sum(generate.values()) >= EXAMPLES // 2, generate
