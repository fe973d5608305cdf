"""`amskv bench previews` at its tiny size: every mix of streamed rows runs, and previews were decoded."""
from __future__ import annotations

import json

from amskv_tools.cli import main


def test_previews_suite_times_every_mix_of_streamed_rows(tmp_path):
    out = tmp_path / "previews.json"
    assert main(["bench", "previews", "--tiny", "--out-dir", str(tmp_path), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["suite"] == "previews"
    rows = data["data"]["rows"] if "data" in data else data["rows"]
    assert [(r["batch"], r["streamed_rows"]) for r in rows] == [(2, 0), (2, 1), (2, 2)]
    assert all(r["images_per_s"] > 0 for r in rows) and rows[0]["relative_throughput"] == 1.0
    md = (tmp_path / "previews.md").read_text()
    assert md.startswith("# Benchmark: previews") and "streamed rows" in md
