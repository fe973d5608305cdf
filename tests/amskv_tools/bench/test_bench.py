"""Every `amskv bench` suite at its tiny size: it runs and writes valid JSON, Markdown and plots."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amskv_tools.bench import attention, gpu, memory, quality, scheduling
from amskv_tools.cli import main

REPO = Path(__file__).resolve().parents[3]


def run_cli(tmp_path: Path, suite: str, *extra: str) -> dict:
    out = tmp_path / f"{suite}.json"
    assert main(["bench", suite, "--tiny", "--out-dir", str(tmp_path), "--json", str(out), *extra]) == 0
    data = json.loads(out.read_text())
    md = (tmp_path / f"{suite}.md").read_text()
    assert data["suite"] == suite and md.startswith(f"# Benchmark: {suite}")
    for png in data["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def test_memory_suite_measured_bytes_equal_the_arithmetic(tmp_path):
    data = run_cli(tmp_path, "memory")
    assert len(data["measured"]) == 2 * len(memory.POLICIES)
    assert all(row["match"] for row in data["measured"]), data["measured"]
    assert len(data["plots"]) == 2
    assert "| amskv aggressive |" in (tmp_path / "memory.md").read_text()


def test_memory_headline_at_d30():
    """The presets' exact shares at d30 (docs/benchmarks.md): chosen by quality, so these are reported, not targets."""
    rows = memory.policy_table(("d30",), ("bf16",))
    by = {r["policy"]: r for r in rows}
    assert by["vanilla"]["stored_vs_vanilla"] == 1.0
    # float64 ratios of byte counts, the same on every CPU: rel 1e-12
    assert by["amskv default"]["stored_vs_vanilla"] == pytest.approx(274 / 680, rel=1e-12)  # no profile: all expand
    assert by["amskv-static, 25 % demanding"]["stored_vs_vanilla"] == pytest.approx(
        (8 * 274 + 22 * 174) / (30 * 680), rel=1e-12)
    assert by["amskv aggressive"]["stored_vs_vanilla"] == by["sink"]["stored_vs_vanilla"] == pytest.approx(
        174 / 680, rel=1e-12)
    batches = {b["policy"]: b["max_batch"] for b in memory.batch_table(rows)}
    for gib in ("40", "60", "80"):
        assert batches["full"][gib] < batches["amskv-static, 25 % demanding"][gib] < batches["amskv aggressive"][gib]
    fits = {b["policy"]: b["fits"]["80"] for b in memory.batch_table(rows)}
    assert not fits["vanilla"]["256"] and fits["amskv-static, 25 % demanding"]["256"]


def test_activation_estimate_grows_with_batch_budget():
    cfg = memory.VAR_PRESETS["d30"].var
    phases = memory.activation_phases(cfg, torch.bfloat16)
    assert phases["head_phase"] == 2 * 256 * 4096 * 4 * 3 + 2 * 256 * 1920 * 4 * 2
    assert memory.fit_batch(10 * 2**30, 2 * 2**30, 2**30) == 8
    assert memory.fit_batch(2**30, 2 * 2**30, 2**20) == 0


def test_attention_shapes_follow_the_policy():
    cfg = memory.VAR_PRESETS["d16"].var
    vanilla = attention.policy_shapes(cfg, "vanilla", {})
    cumulative = [1, 5, 14, 30, 55, 91, 155, 255, 424, 680]
    assert vanilla == {(t, k): cfg.depth for t, k in zip(cfg.scale_tokens, cumulative)}
    aggressive = attention.policy_shapes(cfg, "amskv", {"preset": "aggressive"})
    # at most c_max = 174 kept tokens besides the current scale: the condensed 5 and the 13x13 scale
    assert max(k - q for q, k in aggressive) == 5 + 169


def test_attention_suite(tmp_path):
    data = run_cli(tmp_path, "attention")
    rows = {r["policy"]: r for r in data["attention"]}
    assert rows["vanilla"]["time_vs_vanilla"] == 1.0 and rows["full"]["flops_vs_vanilla"] == 1.0
    assert rows["amskv aggressive"]["flops_vs_vanilla"] < 1.0
    assert {e["policy"] for e in data["end_to_end"]} == {p[0] for p in attention.E2E_POLICIES}
    assert all(e["seconds"] > 0 for e in data["end_to_end"])


def test_throughput_suite_budget_binds(tmp_path):
    data = run_cli(tmp_path, "throughput")
    assert data["largest_batch"]["full"] == 1 and data["largest_batch"]["amskv aggressive"] == 2
    capped = [r for r in data["rows"] if r["policy"] == "full" and r["requested_batch"] == 2]
    assert capped[0]["capped"] and capped[0]["kv_bytes"] <= data["budget_bytes"]
    assert all(r["kv_bytes"] <= data["budget_bytes"] for r in data["rows"])


@pytest.mark.slow
def test_server_suite_through_http(tmp_path):
    data = run_cli(tmp_path, "server", "--no-plots")
    for policy in ("full", "amskv"):
        row = data["policies"][policy]
        assert row["overhead"]["http_images_per_s"] > 0
        assert row["saturation"]["errors"] == 0 and row["saturation"]["batches"] > 0
        assert row["saturation"]["max_batch_admissible"] == row["engine_max_batch"]
    assert data["policies"]["amskv"]["engine_max_batch"] > data["policies"]["full"]["engine_max_batch"]


def test_quality_reports_missing_then_renders(tmp_path):
    missing = quality.run_suite(results=tmp_path / "absent.json")
    assert missing.data["status"] == "missing" and "absent" in missing.markdown
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": [{"policy": "full", "fid": 3.1}, {"policy": "amskv", "fid": 3.2}]}))
    table = quality.run_suite(results=results)
    assert table.data["status"] == "ok" and "| amskv | 3.2 |" in table.markdown


def test_scheduling_suite_tiny_replays_the_same_arrivals_against_both_schedulers():
    report = scheduling.run_suite(tiny=True, rounds=2)
    (model,) = report.data["models"]
    (row,) = model["rows"]
    assert model["static_capacity_images_per_s"] > 0 and row["load"] == 0.5
    assert row["static_requests"] == row["continuous_requests"] == 2 * 6  # two segments of 6 requests each
    for mode in ("static", "continuous"):
        assert 0 < row[f"{mode}_ttfp_p50_s"] <= row[f"{mode}_latency_p50_s"]
        assert row[f"{mode}_mean_images_per_step"] >= 1
    assert "| demo | 0.5 |" in report.markdown


def test_poisson_arrivals_are_reproducible_and_at_the_asked_rate():
    plan = scheduling.arrivals(10.0, 2000, seed=3)
    assert plan == scheduling.arrivals(10.0, 2000, seed=3)
    assert 180 < plan[-1][0] < 220  # 2000 arrivals at 10/s: 200 s, within 5 standard deviations (4.5 s)
    assert {k for _, k in plan} == set(scheduling.REQUEST_IMAGES)


def test_gpu_variant_records_oom_instead_of_crashing():
    class OutOfMemoryEngine:  # stands in for a batch the device cannot hold
        device = torch.device("cpu")
        num_classes = 10

        def generate(self, labels, seeds, params):
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert gpu.run_variant(OutOfMemoryEngine(), 256, None) == {"status": "OOM"}


def test_gpu_script_is_valid_bash():
    script = REPO / "scripts" / "bench-gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "bench gpu" in script.read_text()


def test_results_go_to_a_scratch_folder_unless_docs_are_asked_for(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a checkout's root: docs/benchmarks/ must stay as committed
    assert main(["bench", "memory", "--tiny", "--no-measure", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "out" / "bench" / "memory.json").is_file() and "out/bench/memory.json" in printed
    assert not (tmp_path / "docs").exists()
    assert main(["bench", "memory", "--tiny", "--no-measure", "--no-plots", "--update-docs"]) == 0
    assert (tmp_path / "docs" / "benchmarks" / "memory.md").is_file()
    with pytest.raises(SystemExit):
        main(["bench", "memory", "--update-docs", "--out-dir", str(tmp_path)])
    assert "/out/" in (REPO / ".gitignore").read_text().split()


def test_bench_is_registered():
    out = subprocess.run([sys.executable, "-m", "amskv_tools.cli", "bench", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0 and "memory" in out.stdout and "--tiny" in out.stdout


@pytest.mark.parametrize("suite", ["nope"])
def test_unknown_suite_is_rejected(suite):
    with pytest.raises(SystemExit):
        main(["bench", suite])
