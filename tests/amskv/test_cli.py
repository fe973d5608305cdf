"""`amskv --help`: every command shows every default; one default KV policy for the CLI and the server."""
from __future__ import annotations

import argparse
import re

import pytest

from amskv.cli import COMMANDS, build_parser
from amskv.kvcache.policy import DEFAULT_POLICY
from server.settings import Settings


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", [name for name, _ in COMMANDS])
def test_help_shows_every_default(command):
    parser = subparsers()[command]
    text = " ".join(parser.format_help().split())  # undo the line wrapping
    for action in parser._actions:
        if action.default in (None, argparse.SUPPRESS) or action.default is False or action.default == []:
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has a default but no help"
        assert re.search(rf"\(default: {re.escape(str(action.default))}\)", text), \
            f"{command} --help does not show the default of {action.option_strings or action.dest}"


def test_generate_memory_eval_quality_and_serve_share_one_default_policy():
    parsers = subparsers()
    assert DEFAULT_POLICY == "amskv-static"
    for command in ("generate", "memory", "eval-quality"):
        assert parsers[command].parse_args(["--classes", "1", "--out", "x"] if command == "generate" else []
                                           ).policy == DEFAULT_POLICY, command
    assert Settings.model_fields["policy"].default == DEFAULT_POLICY
    serve_help = " ".join(parsers["serve"].format_help().split())
    assert f"(AMSKV_POLICY; default: {DEFAULT_POLICY})" in serve_help
    assert "(AMSKV_PORT; default: 8000)" in serve_help
