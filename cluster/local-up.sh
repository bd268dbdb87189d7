#!/usr/bin/env bash
# Start a one-machine cluster: a Ray head (dashboard + job API) and an MLflow tracking server, both
# bound to 127.0.0.1, and optionally several Ray worker nodes on this machine (each its own raylet with
# its own CPUs), fixed or added on demand by Ray's autoscaler. Returns once a job can be submitted.
# Running it again while they are up changes nothing. Pid files under the data directory let
# cluster/local-down.sh stop exactly these processes and nothing else on the machine.
#
# Settings (environment variables):
#   LIMPQ_CLUSTER_DIR      data directory: MLflow database and artifacts, logs, pid files (runs/cluster)
#   LIMPQ_RAY_PORT         Ray GCS port (6379)
#   LIMPQ_DASHBOARD_PORT   Ray dashboard and job submission API port (8265)
#   LIMPQ_MLFLOW_PORT      MLflow tracking server port (5000)
#   LIMPQ_NUM_CPUS         logical CPUs Ray offers (default: the core count, at least 4, so that on a
#                          2-core machine Train workers still leave CPUs for Ray Data); with worker
#                          nodes (below) the head offers none and runs no training work
#   LIMPQ_WORKER_NODES     Ray worker nodes to start next to the head, each with its own raylet (0)
#   LIMPQ_AUTOSCALE_MAX_NODES  instead: start with no worker node and let Ray's autoscaler (its fake
#                          multi-node provider) add up to this many when tasks wait for CPUs (0: off)
#   LIMPQ_WORKER_CPUS      logical CPUs of each worker node (2)
#   LIMPQ_IDLE_TIMEOUT_MIN minutes an autoscaled node may idle before it is removed (1)
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
WORKER_NODES="${LIMPQ_WORKER_NODES:-0}"
AUTOSCALE_MAX_NODES="${LIMPQ_AUTOSCALE_MAX_NODES:-0}"
WORKER_CPUS="${LIMPQ_WORKER_CPUS:-2}"
IDLE_TIMEOUT_MIN="${LIMPQ_IDLE_TIMEOUT_MIN:-1}"
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

# free_port: a port nobody listens on now (the kernel's choice).
free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
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
if ((WORKER_NODES > 0 && AUTOSCALE_MAX_NODES > 0)); then
    echo "local-up: set LIMPQ_WORKER_NODES or LIMPQ_AUTOSCALE_MAX_NODES, not both" >&2
    exit 1
fi
HEAD_CPUS="$NUM_CPUS"
# RAY_ADDRESS in every Ray process: Ray's own helpers that look the cluster up (Train's placement
# group cleaner asks the state API) then find this one even when others run on the machine.
HEAD_ENV=(MLFLOW_TRACKING_URI="$MLFLOW_URI" RAY_ADDRESS="$HOST:$RAY_PORT")
HEAD_ARGS=()
if ((WORKER_NODES > 0 || AUTOSCALE_MAX_NODES > 0)); then
    HEAD_CPUS=0  # the head schedules, serves and runs job drivers; training goes to worker nodes
fi
if ((AUTOSCALE_MAX_NODES > 0)); then
    # Ray's fake multi-node provider: the autoscaler on the head starts and stops worker raylets on
    # this machine as a cloud provider would start and stop instances.
    "$PYTHON" - "$DATA_DIR/autoscaling.json" "$RAY_PORT" "$AUTOSCALE_MAX_NODES" "$WORKER_CPUS" "$IDLE_TIMEOUT_MIN" <<'EOF'
import json, sys
path, port, max_nodes, cpus, idle = sys.argv[1:]
config = {
    "cluster_name": "limpq-local",
    "max_workers": int(max_nodes),
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": float(idle),
    "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "head_node_type": "ray.head.default",
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "ray.worker.cpu": {"resources": {"CPU": float(cpus)}, "node_config": {},
                           "min_workers": 0, "max_workers": int(max_nodes)},
    },
    "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}
with open(path, "w") as f:
    json.dump(config, f, indent=1)
EOF
    HEAD_ENV+=(RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1)
    HEAD_ARGS+=(--autoscaling-config "$DATA_DIR/autoscaling.json")
fi

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
        env "${HEAD_ENV[@]}" ray start --head --block \
        --port "$RAY_PORT" \
        --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" \
        --num-cpus "$HEAD_CPUS" --temp-dir "$RAY_TEMP_DIR" --disable-usage-stats \
        "${HEAD_ARGS[@]}" ${LIMPQ_RAY_EXTRA_ARGS:-}
    wait_for "$DASHBOARD_URL/api/gcs_healthz" "$(cat "$RAY_PID_FILE")" "$DATA_DIR/ray.log" "Ray head" ||
        abandon "$RAY_PID_FILE"
fi

# Worker nodes: one `ray start --block` each, in its own process group with its own pid file, started
# one after the other (a raylet that cannot register within Ray's fixed 30 s gives up, which happens
# on a loaded machine when several start at once; it is then tried again). The dashboard agent's HTTP
# port is fixed by default (52365), so every node gets a free one.
start_worker_node() {
    local node="$1" pidfile="$DATA_DIR/ray-worker-$1.pid" log="$DATA_DIR/ray-worker-$1.log" attempt pid
    for attempt in 1 2 3; do
        start_detached "$pidfile" "$log" \
            env MLFLOW_TRACKING_URI="$MLFLOW_URI" RAY_ADDRESS="$HOST:$RAY_PORT" \
            ray start --block --address "$HOST:$RAY_PORT" \
            --num-cpus "$WORKER_CPUS" --dashboard-agent-listen-port "$(free_port)" --disable-usage-stats
        pid="$(cat "$pidfile")"
        until grep -q "Ray runtime started" "$log" 2>/dev/null || ! kill -0 "$pid" 2>/dev/null; do
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            return 0
        fi
        kill -TERM -- "-$pid" 2>/dev/null || true
        echo "local-up: Ray worker node $node failed to start (attempt $attempt): $(tail -n 1 "$log")" >&2
    done
    rm -f "$pidfile"
    return 1
}
for ((node = 1; node <= WORKER_NODES; node++)); do
    if running "$DATA_DIR/ray-worker-$node.pid" ray; then
        echo "Ray worker node $node already running (pid $(cat "$DATA_DIR/ray-worker-$node.pid"))"
    else
        start_worker_node "$node" || exit 1
    fi
done

# Ready when every worker node has registered and a job can actually be submitted: the head's job
# agent registers some seconds after the dashboard answers, and until then a submission fails with
# "No available agent to submit job". A no-op job (shell `true`) is submitted, awaited and deleted.
if ! "$PYTHON" - "$DASHBOARD_URL" "$((WORKER_NODES + 1))" "$START_TIMEOUT" <<'EOF'
import sys, time, uuid

from ray.job_submission import JobStatus, JobSubmissionClient

url, nodes, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
problem = "no answer"
while time.monotonic() < deadline:
    try:
        import ray.util.state

        alive = [n for n in ray.util.state.list_nodes(address=url, filters=[("state", "=", "ALIVE")])]
        if len(alive) < nodes:
            problem = f"{len(alive)} of {nodes} Ray nodes registered"
            time.sleep(1)
            continue
        client = JobSubmissionClient(url)
        job = client.submit_job(entrypoint="true", submission_id=f"limpq-ready-check-{uuid.uuid4().hex[:8]}")
        while not client.get_job_status(job).is_terminal():
            time.sleep(0.5)
        status = client.get_job_status(job)
        client.delete_job(job)
        if status == JobStatus.SUCCEEDED:
            sys.exit(0)
        problem = f"the no-op job ended {status}"
    except Exception as error:  # the job API answers with errors until the job agent registers
        problem = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    time.sleep(1)
print(f"local-up: the Ray job API at {url} does not accept jobs after {timeout:.0f}s ({problem}); "
      f"see the logs under the Ray temp dir", file=sys.stderr)
sys.exit(1)
EOF
then
    exit 1
fi

# ---------------------------------------------------------------------------------- addresses
{
    echo "# source this file to submit jobs to the local cluster"
    echo "export RAY_API_SERVER_ADDRESS=$DASHBOARD_URL"
    echo "export MLFLOW_TRACKING_URI=$MLFLOW_URI"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"; fi
} >"$DATA_DIR/env.sh"

nodes_note() {
    if ((WORKER_NODES > 0)); then
        echo "head with 0 CPUs + $WORKER_NODES worker nodes x $WORKER_CPUS CPUs"
    elif ((AUTOSCALE_MAX_NODES > 0)); then
        echo "head with 0 CPUs + 0 to $AUTOSCALE_MAX_NODES autoscaled worker nodes x $WORKER_CPUS CPUs"
    else
        echo "$NUM_CPUS logical CPUs"
    fi
}

cat <<EOF
Ray dashboard and job API: $DASHBOARD_URL   (token authentication: $TOKEN_NOTE)
Ray cluster address:       $HOST:$RAY_PORT   ($(nodes_note), logs under $RAY_TEMP_DIR)
MLflow tracking server:    $MLFLOW_URI   (store $DATA_DIR/mlflow.db, artifacts $DATA_DIR/mlartifacts)
Submit a job:   source $DATA_DIR/env.sh && ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/demo.yaml
Stop:           ${LIMPQ_CLUSTER_DIR:+LIMPQ_CLUSTER_DIR=$DATA_DIR }$REPO_DIR/cluster/local-down.sh
EOF
