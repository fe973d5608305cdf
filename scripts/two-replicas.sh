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
# bundled demo model. Ctrl-C (or SIGTERM) stops all three: the replicas drain first. Logs go to $LOG_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

BALANCER_PORT="${BALANCER_PORT:-8000}"
read -r -a PORTS <<< "${REPLICA_PORTS:-8001 8002}"
PYTHON="${PYTHON:-python3}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t amskv-replicas.XXXXXX)}"
mkdir -p "$LOG_DIR"
export AMSKV_TORCH_THREADS="${AMSKV_TORCH_THREADS:-$(( $(nproc) / ${#PORTS[@]} > 0 ? $(nproc) / ${#PORTS[@]} : 1 ))}"

command -v haproxy >/dev/null || { echo "haproxy not found; apt-get install haproxy" >&2; exit 2; }

pids=()
stop_all() {
    trap - INT TERM EXIT
    echo "stopping (replicas drain first) ..."
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    echo "logs: $LOG_DIR"
    exit 0
}
trap stop_all INT TERM EXIT

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
pids+=($!)
echo "balancer: http://127.0.0.1:$BALANCER_PORT (request log $LOG_DIR/haproxy.log); Ctrl-C stops everything"
wait -n "${pids[@]}" || true
echo "a process exited; see $LOG_DIR"
