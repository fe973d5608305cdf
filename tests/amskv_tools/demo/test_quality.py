"""eval-quality on the shipped demo model: full scores itself perfectly, a thin cache loses fidelity."""
import json

import pytest

from amskv_tools.cli import main
from amskv_tools.demo.quality import evaluate, sample
from amskv.engine import Engine
from amskv.sampling import SamplingParams


@pytest.fixture(scope="module")
def demo_engine():
    return Engine.load(policy="full")


def test_full_against_itself_is_identical(demo_engine):
    report, reference = evaluate(demo_engine, n=40, seed=0, cfg=3.0)
    assert report.token_agreement["overall"] == 1.0
    assert report.to_dict()["psnr_vs_full"] is None  # identical images: infinite PSNR
    assert report.accuracy >= 0.9  # the shipped model draws the requested digit
    assert report.stored_fraction_of_vanilla < 1.0  # full does not store the last scale
    assert reference.images.shape == (40, 32, 32, 1)


def test_a_thin_cache_loses_fidelity_and_bytes(demo_engine):
    params = SamplingParams(cfg=3.0, top_k=0, top_p=0.0)
    reference = sample(demo_engine, 40, 0, params)
    thin, _ = evaluate(demo_engine.with_policy("window", {"window": 0}), n=40, seed=0, cfg=3.0, reference=reference)
    sink, _ = evaluate(demo_engine.with_policy("sink", {"sink": 2, "window": 1}), n=40, seed=0, cfg=3.0,
                       reference=reference)
    assert thin.token_agreement["overall"] < sink.token_agreement["overall"] < 1.0
    assert thin.psnr_vs_full < sink.psnr_vs_full
    assert thin.kv_peak_stored_bytes_per_image < sink.kv_peak_stored_bytes_per_image


def test_cli_json_keys(capsys):
    assert main(["eval-quality", "--policy", "amskv", "--n", "20", "--seed", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "fd", "token_agreement", "psnr_vs_full", "kv_bytes_per_image"):
        assert key in data
    assert 0 < data["kv_bytes_per_image"] and 0 <= data["accuracy"] <= 1
