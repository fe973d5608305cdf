"""`amskv` console script: one sub-command per module.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only to build the parser, so every command stays cheap to list.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from amskv.commands.common import DefaultsHelpFormatter

# (name, module) in the order `amskv --help` lists them.
COMMANDS: list[tuple[str, str]] = [
    ("generate", "amskv.commands.generate"),
    ("memory", "amskv.commands.memory"),
    ("analyze", "amskv.commands.analyze"),
    ("serve", "server.cli"),
    ("train-demo", "amskv.demo.train"),
    ("eval-quality", "amskv.demo.quality_cli"),
    ("bench", "amskv.bench.cli"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amskv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # only a command whose own module is absent is skipped
            if not (module_name == exc.name or module_name.startswith(f"{exc.name}.")):
                raise
            continue
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=DefaultsHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ValueError as exc:  # bad input: a checkpoint that does not load, a label out of range, ...
        print(f"amskv {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
