#!/usr/bin/env bash
# Two `amskv serve` replicas behind HAProxy on this machine, without Docker: the set-up tests/ops/test_balancer.py
# tests, to try by hand (kill one replica, watch the other take over).
#
#   scripts/two-replicas.sh                 # balancer on 127.0.0.1:8000, replicas on 8001 and 8002
#   BALANCER_PORT=9000 REPLICA_PORTS="9001 9002" scripts/two-replicas.sh
#   python scripts/loadgen.py --url http://127.0.0.1:8000 --requests 200 --concurrency 16   # in another shell
#
# Needs haproxy (`apt-get install haproxy`) and the package installed (`pip install -e .`). Every AMSKV_*
# variable set in the environment reaches both replicas; by default each gets half of the CPU threads and the
# bundled demo model. Ctrl-C (or SIGTERM) to this script stops all three: the replicas drain first. A replica
# that exits on its own (killed, or SIGTERM'd to try a rolling restart) is only reported: the balancer and the
# other replica keep serving. The script ends when the balancer exits or no replica is left. Logs go to $LOG_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

BALANCER_PORT="${BALANCER_PORT:-8000}"
read -r -a PORTS <<< "${REPLICA_PORTS:-8001 8002}"
PYTHON="${PYTHON:-python3}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t amskv-replicas.XXXXXX)}"
mkdir -p "$LOG_DIR"
# A replica given SIGTERM answers /readyz 503 this long before its drain refuses work: the balancer (checks every
# 1 s, fall 2) takes it out first, since a 503 is not retried on the other replica.
export AMSKV_DRAIN_NOTICE_S="${AMSKV_DRAIN_NOTICE_S:-3}"
export AMSKV_TORCH_THREADS="${AMSKV_TORCH_THREADS:-$(( $(nproc) / ${#PORTS[@]} > 0 ? $(nproc) / ${#PORTS[@]} : 1 ))}"

command -v haproxy >/dev/null || { echo "haproxy not found; apt-get install haproxy" >&2; exit 2; }

pids=()
stop_all() {  # stop_all STATUS: every process still running gets SIGTERM (replicas drain), then exit STATUS
    trap - INT TERM EXIT
    echo "stopping (replicas drain first) ..."
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    echo "logs: $LOG_DIR"
    exit "$1"
}
trap 'stop_all 0' INT TERM
trap 'stop_all $?' EXIT

servers=()
for i in "${!PORTS[@]}"; do
    port="${PORTS[$i]}"
    "$PYTHON" -m server.cli --host 127.0.0.1 --port "$port" > "$LOG_DIR/replica-$i.log" 2>&1 &
    pids+=($!)
    servers+=(--server "api-$i=127.0.0.1:$port")
    echo "replica api-$i: pid $! on http://127.0.0.1:$port (log $LOG_DIR/replica-$i.log)"
done

"$PYTHON" scripts/haproxy_config.py --bind "127.0.0.1:$BALANCER_PORT" "${servers[@]}" > "$LOG_DIR/haproxy.cfg"
haproxy -c -q -f "$LOG_DIR/haproxy.cfg"

for i in "${!PORTS[@]}"; do
    until "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
            "http://127.0.0.1:${PORTS[$i]}/readyz" 2>/dev/null; do
        kill -0 "${pids[$i]}" 2>/dev/null || { echo "replica api-$i exited; see $LOG_DIR/replica-$i.log" >&2; exit 1; }
        sleep 1
    done
    echo "replica api-$i ready"
done

haproxy -db -f "$LOG_DIR/haproxy.cfg" > "$LOG_DIR/haproxy.log" 2>&1 &
balancer_pid=$!
pids+=("$balancer_pid")
echo "balancer: pid $balancer_pid on http://127.0.0.1:$BALANCER_PORT (request log $LOG_DIR/haproxy.log); Ctrl-C stops everything"

# Supervise: one replica exiting is what the balancer is for, so it is reported and the rest keep running.
# Only the balancer's exit, or the last replica's, ends the script (through the EXIT trap).
running=("${pids[@]:0:${#PORTS[@]}}")
while :; do
    exited=""
    status=0
    wait -n -p exited "$balancer_pid" "${running[@]}" || status=$?
    [ -n "$exited" ] || continue  # a signal interrupted the wait; its trap runs stop_all
    if [ "$exited" = "$balancer_pid" ]; then
        echo "the balancer exited (status $status); see $LOG_DIR/haproxy.log" >&2
        exit 1
    fi
    left=()
    for pid in "${running[@]}"; do [ "$pid" = "$exited" ] || left+=("$pid"); done
    running=("${left[@]}")
    echo "replica pid $exited exited (status $status); the balancer routes around it (${#running[@]} left)"
    if [ "${#running[@]}" -eq 0 ]; then
        echo "no replica left" >&2
        exit 1
    fi
done
