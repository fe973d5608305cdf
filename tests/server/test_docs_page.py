"""/docs in a real browser: Debian's Chromium, driven by Playwright, on a live `amskv serve`.

FastAPI writes OpenAPI 3.1, which Swagger UI reads only from version 5 on; Swagger UI 4 answered "Unable to
render this definition". The page must list every operation of /openapi.json and fetch nothing from another host.
"""
from __future__ import annotations

import httpx
import pytest

from tests.server.test_api import SERVER_ENV, Server  # the same real-server harness
from tests.server.test_playground import chromium_page

pytestmark = pytest.mark.slow  # starts a real server process (about 5 s each on two cores); tests/README.md


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("docs"), SERVER_ENV)
    yield srv
    srv.stop()


def test_docs_lists_every_operation_in_chromium(server, tmp_path):
    schema = httpx.get(f"{server.base}/openapi.json").json()
    assert schema["openapi"].startswith("3.1")
    operations = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    requests: list[str] = []
    with chromium_page(tmp_path, requests=requests) as page:
        page.goto(f"{server.base}/docs")
        page.wait_for_function("document.querySelector('.opblock')"
                               " || document.body.innerText.includes('Unable to render')", timeout=60_000)
        shown = page.eval_on_selector_all(
            ".opblock", "els => els.map(e => [e.querySelector('.opblock-summary-method').innerText,"
                        " e.querySelector('.opblock-summary-path').getAttribute('data-path')])")
        text = page.inner_text("body")

    assert "Unable to render" not in text and "does not specify a valid version" not in text
    assert {(method.upper(), path) for method, path in shown} == operations
    assert any(path == "/v1/generate" for _, path in operations)
    external = [url for url in requests if not url.startswith((server.base, "data:"))]
    assert external == []
