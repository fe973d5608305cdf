"""The playground page in a real browser: Debian's Chromium, driven by Playwright, on a live `amskv serve`.

Playwright drives the system Chromium (`executable_path`); `playwright install` is never run (it downloads
a browser). The test saves the page's screenshot under its tmp_path; with `AMSKV_UPDATE_DOCS=1` it also
copies it to docs/playground.png (the README shows it), so a plain run leaves the working tree clean:

    AMSKV_UPDATE_DOCS=1 python -m pytest -q tests/server/test_playground.py
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
from contextlib import contextmanager
from html.parser import HTMLParser

import httpx
import numpy as np
import pytest
from PIL import Image

from amskv.naming import image_file_name
from tests.server.test_api import REPO, SERVER_ENV, Server  # the same real-server harness
from tests.tools import find_tool

pytestmark = pytest.mark.slow  # starts a real server process (about 5 s each on two cores); tests/README.md

DOC_SCREENSHOT = REPO / "docs" / "playground.png"  # rewritten only with AMSKV_UPDATE_DOCS=1
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EXTERNAL = re.compile(r"(?:https?:)?//[a-z0-9.-]+", re.IGNORECASE)


@contextmanager
def chromium_page(tmp_path, width: int = 1100, height: int = 760, requests: list[str] | None = None):
    """A page in Debian's Chromium (Playwright with ``executable_path``), closed on exit; the URLs it requests
    are appended to ``requests`` when given."""
    chromium = find_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": width, "height": height})
        try:
            page = browser.new_page()
            if requests is not None:
                page.on("request", lambda request: requests.append(request.url))
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("playground"), SERVER_ENV)
    yield srv
    srv.stop()


class References(HTMLParser):
    """Every src/href in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_the_page_and_its_assets_load_nothing_from_an_external_url(server):
    page = httpx.get(f"{server.base}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = References()
    refs.feed(page.text)
    assert "/static/playground.js" in refs.urls and "/static/playground.css" in refs.urls
    for url in refs.urls:
        assert url.startswith(("/", "data:")) and not url.startswith("//"), url
        if url.startswith("/static/"):
            asset = httpx.get(f"{server.base}{url}")
            assert asset.status_code == 200
            assert not EXTERNAL.search(asset.text), f"{url} names an external URL"
    assert not EXTERNAL.search(page.text)


def data_url_png(src: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src[len(prefix):]))))


def test_two_images_refine_scale_by_scale_and_render_in_chromium(server, tmp_path):
    screenshot = tmp_path / "playground.png"
    card = httpx.get(f"{server.base}/v1/models").json()["data"][0]
    requests: list[str] = []
    with chromium_page(tmp_path, requests=requests) as page:
        page.goto(f"{server.base}/")
        page.wait_for_function("document.querySelectorAll('#class-chips button').length === 10")
        kv = card["kv_cache"]
        assert page.inner_text("#kv-bytes") == f"{kv['bytes_per_image'] / 2**20:.2f} MiB"
        assert page.inner_text("#kv-vanilla") == f"{kv['vanilla_bytes_per_image'] / 2**20:.2f} MiB"
        page.fill("#classes", "seven, 3")
        page.fill("#n", "1")
        page.fill("#seed", "21")
        page.click("#generate")
        page.wait_for_function("document.body.dataset.done", timeout=120_000)
        assert page.evaluate("document.body.dataset.done") == "true", page.inner_text("#error")
        log = page.evaluate("window.amskvPreviewLog")
        finals = page.eval_on_selector_all("img.final[data-final='true']", "els => els.map(e => e.src)")
        downloads = page.eval_on_selector_all("a.download", "els => els.map(e => e.download)")
        rendered = page.eval_on_selector_all(
            "img.final", "els => els.map(e => e.complete && e.naturalWidth)")
        batch = page.inner_text("#batch-images")
        assert page.inner_text("#queue-requests").isdigit()
        page.screenshot(path=str(screenshot), full_page=True)

    for index in (0, 1):
        order = [entry["scale"] for entry in log if entry["index"] == index]
        assert order == sorted(order) and order[0] == 0 and len(order) == len(set(order)) >= 2
    assert len(finals) == 2 and rendered == [32, 32]
    for src in finals:
        assert data_url_png(src).shape == (32, 32)
    assert downloads == [image_file_name(0, 7, 21), image_file_name(1, 3, 22)]  # the CLI's and the zip's names
    plain = httpx.post(f"{server.base}/v1/generate", json={"class_labels": [7, 3], "seed": 21}, timeout=120).json()
    assert [f.split(",", 1)[1] for f in finals] == [d["b64_json"] for d in plain["data"]]
    assert int(batch) >= 1
    external = [url for url in requests if not url.startswith((server.base, "data:"))]
    assert external == []
    assert Image.open(screenshot).size[0] >= 1000
    if os.environ.get("AMSKV_UPDATE_DOCS") == "1":
        shutil.copyfile(screenshot, DOC_SCREENSHOT)


def test_a_phone_wide_page_is_no_wider_than_the_screen(server, tmp_path):
    with chromium_page(tmp_path, 390, 844) as page:
        page.goto(f"{server.base}/")
        page.wait_for_function("document.querySelectorAll('#class-chips button').length === 10")
        before = page.evaluate("document.scrollingElement.scrollWidth")
        page.fill("#classes", "3")
        page.fill("#n", "1")
        page.click("#generate")
        page.wait_for_function("document.body.dataset.done", timeout=120_000)
        after = page.evaluate("document.scrollingElement.scrollWidth")  # with an image card shown
    assert before <= 390 and after <= 390, (before, after)


def test_a_submit_the_browser_blocks_clears_the_previous_error(server, tmp_path):
    with chromium_page(tmp_path) as page:
        page.goto(f"{server.base}/")
        page.wait_for_function("document.querySelectorAll('#class-chips button').length === 10")
        page.fill("#classes", "no-such-class")
        page.click("#generate")
        page.wait_for_function("document.body.dataset.done === 'failed'", timeout=60_000)
        assert page.is_visible("#error") and "no-such-class" in page.inner_text("#error")
        page.fill("#classes", "3")
        page.fill("#n", "99")  # above the field's max: the browser refuses to submit, no request is sent
        page.click("#generate")
        page.wait_for_function("document.getElementById('error').hidden", timeout=5_000)
        state = page.inner_text("#state")
    assert state == ""
