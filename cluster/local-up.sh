#!/usr/bin/env bash
# Start a one-machine cluster: a Ray head (dashboard + job API) and an MLflow tracking server, both
# bound to 127.0.0.1. Running it again while they are up changes nothing. Pid files under the data
# directory let cluster/local-down.sh stop exactly these processes and nothing else on the machine.
#
# Settings (environment variables):
#   LIMPQ_CLUSTER_DIR      data directory: MLflow database and artifacts, logs, pid files (runs/cluster)
#   LIMPQ_RAY_PORT         Ray GCS port (6379)
#   LIMPQ_DASHBOARD_PORT   Ray dashboard and job submission API port (8265)
#   LIMPQ_MLFLOW_PORT      MLflow tracking server port (5000)
#   LIMPQ_NUM_CPUS         logical CPUs Ray offers (default: the core count, at least 4, so that on a
#                          2-core machine Train workers still leave CPUs for Ray Data)
#   LIMPQ_RAY_TEMP_DIR     Ray's session/log root (/tmp/limpq-ray-<uid>-<port>); a private root keeps
#                          other `ray.init()` calls on this machine from joining this cluster
#   LIMPQ_RAY_EXTRA_ARGS   more `ray start` flags, e.g. "--ray-client-server-port 10002"
#   LIMPQ_MLFLOW_WORKERS   MLflow server worker processes (1)
#   LIMPQ_START_TIMEOUT    seconds to wait for each server to answer (180)
#   RAY_AUTH_MODE          token (default) or disabled; RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH choose the
#                          token, default ~/.ray/auth_token (generated when missing)
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=cluster/common.sh
source "$REPO_DIR/cluster/common.sh"

RAY_PORT="${LIMPQ_RAY_PORT:-6379}"
DASHBOARD_PORT="${LIMPQ_DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${LIMPQ_MLFLOW_PORT:-5000}"
CORES="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
NUM_CPUS="${LIMPQ_NUM_CPUS:-$((CORES > 4 ? CORES : 4))}"
RAY_TEMP_DIR="${LIMPQ_RAY_TEMP_DIR:-/tmp/limpq-ray-$(id -u)-$RAY_PORT}"
MLFLOW_WORKERS="${LIMPQ_MLFLOW_WORKERS:-1}"
START_TIMEOUT="${LIMPQ_START_TIMEOUT:-180}"
HOST=127.0.0.1
DASHBOARD_URL="http://$HOST:$DASHBOARD_PORT"
MLFLOW_URI="http://$HOST:$MLFLOW_PORT"

# The project's venv goes first on PATH: Ray jobs inherit this PATH, so `python jobs/...` in a
# submitted entrypoint is the interpreter that has the project installed.
if [[ -x "$REPO_DIR/.venv/bin/ray" ]]; then
    export PATH="$REPO_DIR/.venv/bin:$PATH"
fi
PYTHON="$(command -v python || command -v python3)"
mkdir -p "$DATA_DIR"

# wait_for URL PID LOG NAME: poll URL until it answers 200, fail early if PID dies.
wait_for() {
    local url="$1" pid="$2" log="$3" name="$4" deadline=$((SECONDS + START_TIMEOUT))
    until "$PYTHON" - "$url" <<'EOF' 2>/dev/null
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=3).status == 200 else 1)
EOF
    do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "local-up: $name exited during start-up; last lines of $log:" >&2
            tail -n 30 "$log" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "local-up: $name did not answer at $url within ${START_TIMEOUT}s; see $log" >&2
            return 1
        fi
        sleep 1
    done
}

# require_free_port PORT SETTING: a port held by another program would make the health checks
# answer for a server that is not ours.
require_free_port() {
    if ! "$PYTHON" -c 'import socket, sys; socket.create_server(("127.0.0.1", int(sys.argv[1]))).close()' "$1" 2>/dev/null; then
        echo "local-up: port $1 is in use by another program; choose another with $2" >&2
        exit 1
    fi
}

# abandon PIDFILE: stop a server that failed to come up, so a rerun starts from scratch.
abandon() {
    kill -TERM -- "-$(cat "$1")" 2>/dev/null || true
    rm -f "$1"
    exit 1
}

# start_detached PIDFILE LOG CMD...: run CMD in its own process group (pgid = pid), so that
# local-down.sh can stop it together with every child it spawned.
start_detached() {
    local pidfile="$1" log="$2"
    shift 2
    if command -v setsid >/dev/null; then
        nohup setsid "$@" >"$log" 2>&1 </dev/null &
    else
        set -m
        nohup "$@" >"$log" 2>&1 </dev/null &
        set +m
    fi
    echo $! >"$pidfile"
}

# ---------------------------------------------------------------------------------- token auth
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
TOKEN_NOTE="off (RAY_AUTH_MODE=$RAY_AUTH_MODE)"
if [[ "$RAY_AUTH_MODE" == token ]]; then
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        TOKEN_NOTE="on (token from RAY_AUTH_TOKEN)"
    else
        TOKEN_FILE="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
        if [[ ! -s "$TOKEN_FILE" ]]; then
            mkdir -p "$(dirname "$TOKEN_FILE")"
            (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$TOKEN_FILE")
            echo "local-up: generated a Ray auth token in $TOKEN_FILE"
        fi
        TOKEN_NOTE="on (token file $TOKEN_FILE)"
    fi
fi

# ---------------------------------------------------------------------------------- MLflow
MLFLOW_PID_FILE="$DATA_DIR/mlflow.pid"
if running "$MLFLOW_PID_FILE" mlflow; then
    echo "MLflow already running (pid $(cat "$MLFLOW_PID_FILE"))"
else
    require_free_port "$MLFLOW_PORT" LIMPQ_MLFLOW_PORT
    mkdir -p "$DATA_DIR/mlartifacts"
    # Only loopback Host headers: MLflow's default also admits private-network names, which this
    # loopback-only server never needs (DNS-rebinding protection).
    # The server's job runner (GenAI features, several extra processes) is off unless asked for.
    start_detached "$MLFLOW_PID_FILE" "$DATA_DIR/mlflow.log" \
        env MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" mlflow server \
        --backend-store-uri "sqlite:///$DATA_DIR/mlflow.db" \
        --artifacts-destination "$DATA_DIR/mlartifacts" \
        --host "$HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
        --allowed-hosts "localhost,localhost:$MLFLOW_PORT,$HOST,$HOST:$MLFLOW_PORT"
    wait_for "$MLFLOW_URI/health" "$(cat "$MLFLOW_PID_FILE")" "$DATA_DIR/mlflow.log" "MLflow server" ||
        abandon "$MLFLOW_PID_FILE"
fi

# ---------------------------------------------------------------------------------- Ray
RAY_PID_FILE="$DATA_DIR/ray.pid"
if running "$RAY_PID_FILE" ray; then
    echo "Ray already running (pid $(cat "$RAY_PID_FILE"))"
else
    require_free_port "$RAY_PORT" LIMPQ_RAY_PORT
    require_free_port "$DASHBOARD_PORT" LIMPQ_DASHBOARD_PORT
    # `ray start --block` stays in the foreground of its process group and, on SIGTERM, shuts down
    # the processes of this node only; `ray stop` would kill every Ray on the machine.
    # Jobs inherit MLFLOW_TRACKING_URI, so a plain `ray job submit` logs to this server.
    # shellcheck disable=SC2086
    start_detached "$RAY_PID_FILE" "$DATA_DIR/ray.log" \
        env MLFLOW_TRACKING_URI="$MLFLOW_URI" ray start --head --block \
        --port "$RAY_PORT" \
        --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" \
        --num-cpus "$NUM_CPUS" --temp-dir "$RAY_TEMP_DIR" --disable-usage-stats \
        ${LIMPQ_RAY_EXTRA_ARGS:-}
    wait_for "$DASHBOARD_URL/api/gcs_healthz" "$(cat "$RAY_PID_FILE")" "$DATA_DIR/ray.log" "Ray head" ||
        abandon "$RAY_PID_FILE"
fi

# ---------------------------------------------------------------------------------- addresses
{
    echo "# source this file to submit jobs to the local cluster"
    echo "export RAY_API_SERVER_ADDRESS=$DASHBOARD_URL"
    echo "export MLFLOW_TRACKING_URI=$MLFLOW_URI"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"; fi
} >"$DATA_DIR/env.sh"

cat <<EOF
Ray dashboard and job API: $DASHBOARD_URL   (token authentication: $TOKEN_NOTE)
Ray cluster address:       $HOST:$RAY_PORT   ($NUM_CPUS logical CPUs, logs under $RAY_TEMP_DIR)
MLflow tracking server:    $MLFLOW_URI   (store $DATA_DIR/mlflow.db, artifacts $DATA_DIR/mlartifacts)
Submit a job:   source $DATA_DIR/env.sh && ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/demo.yaml
Stop:           ${LIMPQ_CLUSTER_DIR:+LIMPQ_CLUSTER_DIR=$DATA_DIR }$REPO_DIR/cluster/local-down.sh
EOF
