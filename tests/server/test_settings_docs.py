"""The settings tables in README.md and docs/deploy.md list every `server.settings.Settings` field with its default.

A row is `| `AMSKV_<FIELD>` | default | meaning |`. The default cell starts with the value in backticks
(`60`, `auto`, `{}`, `false`), compared by type with the field's default (so `60` matches 60.0), or with
"unset" for a field whose default is None (what unset means follows in the cell). A field added to Settings
without a row, a row left for a removed field, or a default changed on one side fails here.
"""
from __future__ import annotations

import json
import re

import pytest

from server.settings import Settings
from tests.server.test_api import REPO

TABLES = [REPO / "README.md", REPO / "docs" / "deploy.md"]
ROW = re.compile(r"^\| `(AMSKV_[A-Z0-9_]+)` \| ([^|]*) \|")


def table_rows(path) -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = ROW.match(line)
        if match:
            assert match[1] not in rows, f"{path.name}: {match[1]} has two rows"
            rows[match[1]] = match[2].strip()
    return rows


def documented_default_matches(cell: str, default) -> bool:
    if default is None:
        return cell.startswith("unset")
    value = re.match(r"`([^`]*)`", cell)
    if value is None:
        return False
    text = value[1]
    if isinstance(default, bool):
        return text == str(default).lower()
    if isinstance(default, (int, float)):
        try:
            return float(text) == default
        except ValueError:
            return False
    if isinstance(default, dict):
        return json.loads(text) == default
    return text == str(default)


def field_defaults() -> dict[str, object]:
    return {f"AMSKV_{name.upper()}": field.get_default(call_default_factory=True)
            for name, field in Settings.model_fields.items()}


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_every_setting_is_documented_with_its_default(path):
    rows, defaults = table_rows(path), field_defaults()
    assert sorted(set(defaults) - set(rows)) == [], f"{path.name} lacks these settings"
    assert sorted(set(rows) - set(defaults)) == [], f"{path.name} documents settings that do not exist"
    wrong = {name: (rows[name], default) for name, default in defaults.items()
             if not documented_default_matches(rows[name], default)}
    assert wrong == {}, f"{path.name}: documented default vs Settings default"


def test_the_default_parser_tells_values_apart():
    assert documented_default_matches("`60` | x", 60.0) and not documented_default_matches("`30`", 60.0)
    assert documented_default_matches("`false`", False) and not documented_default_matches("`0`", False)
    assert documented_default_matches("`{}`", {}) and documented_default_matches("unset: torch default", None)
    assert not documented_default_matches("`auto`", None) and not documented_default_matches("auto", "auto")
