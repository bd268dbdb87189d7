#!/usr/bin/env bash
# Stop the Ray head and MLflow server that cluster/local-up.sh started (same LIMPQ_CLUSTER_DIR),
# using its pid files: other Ray clusters and MLflow servers on this machine are left alone.
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

# wait_gone PGID SECONDS: wait until no process of the group is left.
wait_gone() {
    local pgid="$1" waited=0
    while group_alive "$pgid" && ((waited < $2 * 10)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    ! group_alive "$pgid"
}

# stop PIDFILE WORD NAME: SIGTERM the leader (Ray's `ray start --block` then shuts its node down),
# then whatever is left of its process group, then SIGKILL the group.
stop() {
    local pidfile="$1" word="$2" name="$3" pid
    if ! running "$pidfile" "$word"; then
        echo "$name not running"
        rm -f "$pidfile"
        return 0
    fi
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$STOP_TIMEOUT"; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        if ! wait_gone "$pid" 10; then
            echo "local-down: $name did not stop in time; killing its processes" >&2
            kill -KILL -- "-$pid" 2>/dev/null || true
            wait_gone "$pid" 10 || true
        fi
    fi
    rm -f "$pidfile"
    echo "$name stopped"
}

stop "$DATA_DIR/ray.pid" ray "Ray"
stop "$DATA_DIR/mlflow.pid" mlflow "MLflow"
