"""`amskv bench SUITE`: run one benchmark suite and write SUITE.json, SUITE.md and PNG plots.

They go to out/bench/ (git-ignored) unless --out-dir says otherwise; only --update-docs replaces the
committed results in docs/benchmarks/.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from amskv_tools.bench.common import DEFAULT_OUT_DIR, DOCS_OUT_DIR, pin_threads, write_report

HELP = "run a benchmark suite (memory, attention, throughput, server, quality, gpu, previews, scheduling); writes JSON, Markdown, PNG"

# suite -> module with run_suite(**options) -> Report
SUITES = {
    "memory": "amskv_tools.bench.memory",
    "attention": "amskv_tools.bench.attention",
    "throughput": "amskv_tools.bench.throughput",
    "server": "amskv_tools.bench.server",
    "quality": "amskv_tools.bench.quality",
    "gpu": "amskv_tools.bench.gpu",
    "previews": "amskv_tools.bench.previews",
    "scheduling": "amskv_tools.bench.scheduling",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=sorted(SUITES), help="which benchmark to run")
    parser.add_argument("--json", metavar="OUT", help="JSON path (default: OUT_DIR/SUITE.json)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR), help="where SUITE.json, SUITE.md and the PNGs go")
    where.add_argument("--update-docs", action="store_true",
                       help=f"write to {DOCS_OUT_DIR}/, replacing the committed results (run from the repository root)")
    parser.add_argument("--tiny", action="store_true", help="smallest sizes, for tests and smoke runs")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (suite default when omitted)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: shared cores)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-measure", action="store_true", help="memory: arithmetic only, no CPU generation")
    parser.add_argument("--device", default="auto", help="gpu suite: cuda, cpu or auto")
    parser.add_argument("--port", type=int, default=0, help="server suite: port to bind (0 = a free one)")


def suite_options(args: argparse.Namespace) -> dict:
    """Only the options each suite understands."""
    opts: dict = {"tiny": args.tiny}
    if args.suite in ("attention", "throughput", "server", "gpu", "previews", "scheduling") and args.rounds:
        opts["rounds"] = args.rounds
    if args.suite == "memory":
        opts["measure"] = not args.no_measure
    if args.suite == "gpu":  # a killed run leaves its finished sections in the JSON (amskv_tools.bench.gpu)
        opts["device"] = args.device
        opts["partial_json"] = args.json or str(Path(DOCS_OUT_DIR if args.update_docs else args.out_dir) / "gpu.json")
    if args.suite == "server":
        opts["port"] = args.port
    return opts


def run(args: argparse.Namespace) -> int:
    pin_threads(args.threads)
    module = importlib.import_module(SUITES[args.suite])
    report = module.run_suite(**suite_options(args))
    out_dir = DOCS_OUT_DIR if args.update_docs else args.out_dir
    written = write_report(report, out_dir, args.json, plots=not args.no_plots)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    if report.notes:
        print("\n".join(f"note: {n}" for n in report.notes[:3]), file=sys.stderr)
    return 0
