"""`amskv serve` with a checkpoint and no profile: calibrated at start-up, cached for the restart; the KV
budget binds the batches the server runs."""
from __future__ import annotations

import httpx
import pytest

from tests.server.test_api import REPO, Server, post

pytestmark = pytest.mark.slow  # starts a real server process (about 5 s each on two cores); tests/README.md

GOLDEN = REPO / "tests" / "golden"


def model_card(srv: Server) -> dict:
    return httpx.get(f"{srv.base}/v1/models", timeout=10).json()["data"][0]


def test_calibrated_at_start_cached_after_restart_and_the_budget_binds(tmp_path):
    env = {"AMSKV_VAR_CHECKPOINT": str(GOLDEN / "tiny_var.pth"), "AMSKV_VAE_CHECKPOINT": str(GOLDEN / "vae.pth"),
           "AMSKV_KV_PROFILE_CACHE_DIR": str(tmp_path / "profiles"), "AMSKV_MAX_BATCH": "8",
           "AMSKV_MAX_QUEUE_DELAY_MS": "200"}
    first = Server(tmp_path, env)
    try:
        kv = model_card(first)["kv_cache"]
        assert kv["profile_source"] == "calibrated" and kv["policy"] == "amskv-static"
        assert isinstance(kv["demanding_layers"], list) and len(kv["demanding_layers"]) == 1
        assert kv["bytes_per_image"] < kv["vanilla_bytes_per_image"]
        assert first.metric('amskv_kv_profile_info{source="calibrated"}') == 1
        assert first.metric("amskv_kv_profile_demanding_layers") == 1
        assert "profile calibrated" in first.log.read_text()
    finally:
        first.stop()
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1

    budget_gib = 3.5 * kv["bytes_per_image"] / 2**30  # room for 3 images' KV
    second = Server(tmp_path, {**env, "AMSKV_KV_BUDGET_GIB": repr(budget_gib)})
    try:
        card = model_card(second)
        assert card["kv_cache"]["profile_source"] == "cached"
        assert card["kv_cache"]["demanding_layers"] == kv["demanding_layers"]
        assert card["max_batch"] == 3
        assert second.metric("amskv_kv_cache_reserved_bytes") == 3 * kv["bytes_per_image"]
        response = post(second.base, {"class_labels": [1], "n": 7, "seed": 3})
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert usage["batch_images"] <= 3 and usage["batches"] >= 3
    finally:
        second.stop()
