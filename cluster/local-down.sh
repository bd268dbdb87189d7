#!/usr/bin/env bash
# Stop the Ray worker nodes, Ray head and MLflow server that cluster/local-up.sh started (same
# LIMPQ_CLUSTER_DIR), using its pid files: other Ray clusters and MLflow servers on this machine are
# left alone. Worker nodes added by the autoscaler run in the head's process group and go with it.
# The data (MLflow database, artifacts, logs) stays. Running it again when nothing is up is fine.
#
# Settings: LIMPQ_CLUSTER_DIR (runs/cluster), LIMPQ_STOP_TIMEOUT (seconds to wait for a graceful
# stop before SIGKILL, 60).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=cluster/common.sh
source "$REPO_DIR/cluster/common.sh"
STOP_TIMEOUT="${LIMPQ_STOP_TIMEOUT:-60}"

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# wait_gone TARGET SECONDS: wait until TARGET (a pid, or -PGID for a whole group) has exited.
wait_gone() {
    local target="$1" waited=0
    while kill -0 -- "$target" 2>/dev/null && ((waited < $2 * 10)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    ! kill -0 -- "$target" 2>/dev/null
}

# stop PIDFILE WORD NAME: SIGTERM the leader (Ray's `ray start --block` then shuts its node down),
# then whatever is left of its process group (e.g. autoscaled nodes), then SIGKILL the group.
stop() {
    local pidfile="$1" word="$2" name="$3" pid
    if ! running "$pidfile" "$word"; then
        echo "$name not running"
        rm -f "$pidfile"
        return 0
    fi
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    wait_gone "$pid" "$STOP_TIMEOUT" || true
    if group_alive "$pid"; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        if ! wait_gone "-$pid" 10; then
            echo "local-down: $name did not stop in time; killing its processes" >&2
            kill -KILL -- "-$pid" 2>/dev/null || true
            wait_gone "-$pid" 10 || true
        fi
    fi
    rm -f "$pidfile"
    echo "$name stopped"
}

shopt -s nullglob
for pidfile in "$DATA_DIR"/ray-worker-*.pid; do
    node="${pidfile##*/ray-worker-}"
    stop "$pidfile" ray "Ray worker node ${node%.pid}"
done
stop "$DATA_DIR/ray.pid" ray "Ray"
stop "$DATA_DIR/mlflow.pid" mlflow "MLflow"
