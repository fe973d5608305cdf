#!/usr/bin/env bash
# VAR-d30 on one GPU: vanilla against amskv at batch 64/128/256 (random weights, bf16). Writes one JSON.
# Usage: bench/gpu.sh [OUT.json] [extra `amskv bench gpu` flags, e.g. --tiny --device cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/benchmarks/gpu.json}"
shift || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 python -m amskv.cli bench gpu --json "$out" --out-dir "$(dirname "$out")" --no-plots "$@"
