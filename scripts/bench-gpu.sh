#!/usr/bin/env bash
# VAR-d30 on one GPU (random weights, bf16), one JSON, at most 8 minutes: the KV pool's largest batch under vanilla
# and AMS-KV, images/s at batch 64/128/256, invariance off/auto/tiles, static vs continuous scheduling, compile on/off.
# The suite stops starting work at 400 s (amskv_tools/bench/gpu.py); the timeout below is the hard stop.
# Usage: scripts/bench-gpu.sh [OUT.json] [extra `amskv bench gpu` flags, e.g. --tiny --device cpu]
# OUT.json defaults to out/bench/gpu.json (git-ignored); pass docs/benchmarks/gpu.json to replace the committed one.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out/bench/gpu.json}"
shift || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 python -m amskv_tools.cli bench gpu --json "$out" --out-dir "$(dirname "$out")" --no-plots "$@"
