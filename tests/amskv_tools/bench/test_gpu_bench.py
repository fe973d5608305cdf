"""The GPU script end to end on the CPU at toy size, so that a GPU run is never its first run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from amskv_tools.bench.gpu_sections import SKIPPED, Box, invariance_supported, run_section

pytestmark = pytest.mark.slow  # every test here takes ~5 s or more on two cores

REPO = Path(__file__).resolve().parents[3]
SECTIONS = ("max_batch", "throughput", "invariance", "scheduling", "compile")


@pytest.fixture(scope="module")
def gpu_json(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    done = subprocess.run(["bash", str(REPO / "scripts" / "bench-gpu.sh"), str(out), "--tiny", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out.parent / "gpu.md").read_text().startswith("# Benchmark: gpu")
    return json.loads(out.read_text())


def test_every_section_ran_and_says_the_gpu_figures_are_not_measured(gpu_json: dict) -> None:
    assert gpu_json["suite"] == "gpu" and gpu_json["device"] == "cpu"
    assert gpu_json["gpu_figures"].startswith("not measured")
    assert "partial" not in gpu_json  # the finished report replaced the per-section partial JSON
    for name in SECTIONS:  # the toy run fits every box: nothing may be skipped for time
        section = gpu_json[name]
        assert section["status"] in ("ok", "unsupported"), (name, section["status"])
        assert section["budget_s"] > 0 and section["section_s"] >= 0


def test_throughput_rows_and_the_cached_k_probe(gpu_json: dict) -> None:
    rows = gpu_json["rows"]
    assert {(r["policy"], r["batch"]) for r in rows} == {(p, b) for p in ("vanilla", "amskv default") for b in (1, 2)}
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 and r["rounds"] >= 1 for r in rows)
    cast, autocast = gpu_json["cached_k"]
    assert (cast["k_dtype"], cast["k_element_size"]) == ("bfloat16", 2)
    assert (autocast["k_dtype"], autocast["k_element_size"]) == ("float32", 4)


def test_max_batch_amskv_pool_holds_more_images_than_vanilla(gpu_json: dict) -> None:
    policies = gpu_json["max_batch"]["policies"]
    vanilla, amskv = policies["vanilla"], policies["amskv default"]
    # the toy CPU budget is set to three AMS-KV images; vanilla's larger cache fits two
    assert (vanilla["pool_images"], amskv["pool_images"]) == (2, 3)
    assert vanilla["bytes_per_image"] > amskv["bytes_per_image"]
    assert vanilla["full_pool_batch"]["status"] == amskv["full_pool_batch"]["status"] == "ok"
    # the CPU has no device memory to exhaust: vanilla runs AMS-KV's largest batch (a GPU may answer OOM)
    asked = gpu_json["max_batch"]["first_at_last_max"]
    assert (asked["policy"], asked["batch"], asked["status"]) == ("vanilla", 3, "ok") and asked["seconds"] > 0


def test_invariance_modes(gpu_json: dict) -> None:
    inv = gpu_json["invariance"]
    if not invariance_supported():
        assert inv["status"] == "unsupported"
        return
    assert set(inv["modes"]) == {"off", "auto", "tiles"} and inv["batch"] == 2
    for mode, row in inv["modes"].items():
        assert row["status"] == "ok" and row["images_per_s"] > 0, mode
    # the engine's promise: auto and tiles keep an image bit-identical alone and in a batch
    assert inv["modes"]["auto"]["bit_identical"] is True and inv["modes"]["tiles"]["bit_identical"] is True


def test_compile_and_scheduling(gpu_json: dict) -> None:
    comp = gpu_json["compile"]
    assert comp["backend"] == "aot_eager" and comp["status"] == "ok"
    assert comp["off"]["images_per_s"] > 0 and comp["on"]["images_per_s"] > 0 and comp["on_vs_off"] > 0
    assert comp["on"]["tokens_equal_eager"] is True  # aot_eager runs the same kernels: any difference is a bug
    sched = gpu_json["scheduling"]  # static against continuous, the same arrivals, both answered in full
    assert sched["static"]["requests"] == sched["continuous"]["requests"] == 3
    assert sched["images_per_s_ratio"] > 0


def test_a_section_without_time_is_skipped_and_says_so() -> None:
    assert run_section(0.0, lambda box: {"never": "run"}) == {"status": SKIPPED, "budget_s": 0.0, "section_s": 0.0}
    box = Box(10.0)
    assert box.fits(1.0) and not box.fits(11.0)
