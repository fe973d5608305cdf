"""The two CPU benchmark scripts (amskv_tools/bench/invariance_cpu.py, engine_cpu.py) at their toy sizes:
they run, write their JSON and Markdown to the folder given, and report every variant. No timings are
asserted: the figures are measurements, reported in docs/benchmarks.md."""
from __future__ import annotations

import pytest
import json

from amskv_tools.bench import engine_cpu, invariance_cpu

pytestmark = pytest.mark.slow  # every test here takes ~5 s or more on two cores


def test_invariance_benchmark_reports_every_row_count_and_the_phi_convolution(tmp_path, capsys):
    assert invariance_cpu.main(["--tiny", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "invariance_cpu.json").read_text())
    assert [row["M"] for row in data["gemm"]] == list(invariance_cpu.TINY_ROWS)
    assert all(row[key] > 0 for row in data["gemm"] for key in ("plain_s", "chosen_s", "tiles_s"))
    assert set(data["forms"]) == set(invariance_cpu.token_shapes(engine_cpu.VAR_PRESETS["demo"].var))
    assert [row["batch"] for row in data["phi"]] == [1, 4]
    assert "| M | plain F.linear ms |" in (tmp_path / "invariance_cpu.md").read_text()
    printed = capsys.readouterr().out
    assert json.loads(printed.strip().splitlines()[-1])["preset"] == "demo"


def test_engine_benchmark_runs_an_exported_commit_and_this_tree_side_by_side(tmp_path):
    # HEAD stands in for the old commit: it always exists in a checkout, and the export path is the same
    assert engine_cpu.main(["--tiny", "--out-dir", str(tmp_path), "--old-commit", "HEAD"]) == 0
    data = json.loads((tmp_path / "engine_cpu.json").read_text())
    rows = {row["variant"]: row for row in data["rows"]}
    assert list(rows) == list(engine_cpu.VARIANTS)
    assert "engine_cpu_scratch/tree-HEAD" in rows["old"]["code"]  # the old variant ran the exported code
    assert all(str(engine_cpu.REPO) in rows[name]["code"] for name in ("tiles", "auto", "off"))
    assert rows["off"]["invariance"].startswith("off") and rows["auto"]["invariance"].startswith("auto")
    assert rows["old"]["vs_first"] == 1.0 and all(len(row["runs"]) == 1 for row in rows.values())
    assert "| engine | invariance |" in (tmp_path / "engine_cpu.md").read_text()
