"""amskv: class-conditional image generation with VAR, its KV cache managed by AMS-KV.

Generate images, price and analyse the KV cache, serve the HTTP API, train and evaluate the bundled MNIST
models, and run the benchmarks. One sub-command per module: each command module exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only to build the parser, so every
command stays cheap to list.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from amskv_tools.commands.common import DefaultsHelpFormatter

# (name, module) in the order `amskv --help` lists them.
COMMANDS: list[tuple[str, str]] = [
    ("generate", "amskv_tools.commands.generate"),
    ("memory", "amskv_tools.commands.memory"),
    ("analyze", "amskv_tools.commands.analyze"),
    ("serve", "server.cli"),
    ("train-demo", "amskv_tools.demo.train"),
    ("eval-quality", "amskv_tools.demo.quality_cli"),
    ("bench", "amskv_tools.bench.cli"),
]


DESCRIPTION = ("Class-conditional image generation with VAR (next-scale prediction), its KV cache managed by "
               "AMS-KV: generate images, price and analyse the KV cache, serve the HTTP API, train and evaluate "
               "the bundled MNIST models, benchmark.")


def package_version() -> str:
    try:
        return version("amskv")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amskv", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
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
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that left (`| head`) shows here, not at exit
        return code
    except ValueError as exc:  # bad input: a checkpoint that does not load, a label out of range, ...
        print(f"amskv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of stdout closed it (`amskv memory --json | head`): stop quietly, as `cat` does. stdout
        # goes to /dev/null so the interpreter's final flush cannot raise again; 141 = 128 + SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
