#!/usr/bin/env bash
# Run the server and reliability suites N times in a row beside a busy CPU core, to catch flaky tests.
#
#   scripts/flake-check.sh [N]     (default 3)
#
# A python busy loop keeps one core loaded for the whole run (tests must not depend on an idle machine);
# it is stopped on exit, however the script ends. Prints one line per run (number, pytest's summary line,
# seconds) and a total; exits 1 if any run failed.
set -uo pipefail

runs="${1:-3}"
if ! [[ "$runs" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [N]   (N: number of runs, a positive integer)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
set -m  # job control: background jobs keep SIGINT, so pytest can be interrupted cleanly below

python3 -c 'while True: pass' &
busy=$!
tests=""
stop_all() {
  # SIGINT lets pytest run its fixture teardown, which stops the servers it started
  if [[ -n $tests ]]; then kill -INT "$tests" 2>/dev/null; wait "$tests" 2>/dev/null; fi
  kill "$busy" 2>/dev/null
  wait "$busy" 2>/dev/null
}
trap stop_all EXIT
trap 'exit 130' INT TERM

log_dir="$(mktemp -d)"
failed=0
began=$SECONDS
for ((i = 1; i <= runs; i++)); do
  start=$SECONDS
  log="$log_dir/run-$i.log"
  python -m pytest -q -p no:cacheprovider tests/server tests/reliability >"$log" 2>&1 &
  tests=$!
  if wait "$tests"; then
    status=pass
  else
    status=FAIL
    failed=$((failed + 1))
  fi
  tests=""
  summary="$(grep -E '(passed|failed|error)' "$log" | tail -n 1)"
  printf 'run %d/%d %s: %s (%d s)\n' "$i" "$runs" "$status" "${summary:-no summary line, see $log}" $((SECONDS - start))
  if [[ $status == FAIL ]]; then echo "  log: $log"; else rm -f "$log"; fi
done
printf 'total: %d of %d runs passed, %d failed, %d s\n' $((runs - failed)) "$runs" "$failed" $((SECONDS - began))
[[ $failed -eq 0 ]]
