#!/usr/bin/env bash
# VAR-d30 on one GPU: vanilla against amskv at batch 64/128/256 (random weights, bf16). Writes one JSON.
# Usage: scripts/bench-gpu.sh [OUT.json] [extra `amskv bench gpu` flags, e.g. --tiny --device cpu]
# OUT.json defaults to out/bench/gpu.json (git-ignored); pass docs/benchmarks/gpu.json to replace the committed one.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out/bench/gpu.json}"
shift || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 python -m amskv_tools.cli bench gpu --json "$out" --out-dir "$(dirname "$out")" --no-plots "$@"
