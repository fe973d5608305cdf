"""Suite `quality`: the demo-model quality table per KV policy, as `amskv eval-quality` produces it.

A thin wrapper: the evaluation itself belongs to the demo-model work (`amskv eval-quality`, which writes
docs/demo-model-results.json). This suite renders that file; when it is absent it says what is missing.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from amskv_tools.bench.common import Report, md_table

RESULTS = Path("docs/demo-model-results.json")


def find_rows(data) -> list[dict]:
    """The first list of flat dicts in the results file: one row per policy (whatever the exact schema)."""
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return data
    if isinstance(data, dict):
        for key in ("rows", "policies", "results", "table"):
            if key in data:
                rows = find_rows(data[key])
                if rows:
                    return rows
        for value in data.values():
            rows = find_rows(value)
            if rows:
                return rows
    return []


def run_suite(tiny: bool = False, results: Path = RESULTS) -> Report:
    have_cli = importlib.util.find_spec("amskv_tools.demo.quality_cli") is not None
    if not results.is_file():
        missing = f"{results} is absent" + ("" if have_cli else " and `amskv eval-quality` is not installed yet")
        md = (f"No quality table yet: {missing}. Run `amskv eval-quality` (demo-model issue) once the demo "
              "weights exist, then `amskv bench quality` again.")
        return Report("quality", {"status": "missing", "results_file": str(results), "eval_quality_available": have_cli},
                      md, [], [missing])
    data = json.loads(results.read_text())
    rows = find_rows(data)
    scalar = [k for k in dict.fromkeys(k for r in rows for k in r) if all(
        not isinstance(r.get(k), (dict, list)) for r in rows)]
    md = md_table(scalar, [[r.get(k, "") for k in scalar] for r in rows]) if rows else "The results file has no table."
    return Report("quality", {"status": "ok", "results_file": str(results), "rows": rows, "source": data},
                  f"From `{results}` (written by `amskv eval-quality`):\n\n{md}", [], [])
