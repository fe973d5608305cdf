"""`amskv --help`: every command shows every default; one default KV policy for the CLI and the server."""
from __future__ import annotations

import argparse
import re

import pytest

from amskv_tools.cli import COMMANDS, build_parser
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


def test_version_and_a_description_of_the_product(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert re.fullmatch(r"amskv \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    description = build_parser().description
    assert "VAR" in description and "AMS-KV" in description and "module" not in description


def test_device_defaults_to_auto_in_every_command_that_takes_it():
    taking = {}
    for command, parser in subparsers().items():
        for action in parser._actions:
            if "--device" in action.option_strings:
                taking[command] = action.default
    # serve's flag has no argparse default (flags must not override AMSKV_DEVICE): Settings' default applies
    assert taking.pop("serve") is None and Settings.model_fields["device"].default == "auto"
    assert {"generate", "analyze", "eval-quality"} <= set(taking)
    assert set(taking.values()) == {"auto"}, taking


def test_a_reader_that_closes_early_ends_the_command_quietly():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "amskv_tools.cli", "memory", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head` does once it has its lines (here before the first one)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_the_readme_names_every_bench_suite():
    from amskv_tools.bench.cli import SUITES
    from tests.conftest import REPO

    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `amskv bench"))
    assert [suite for suite in SUITES if f"`{suite}`" not in row] == []
