# shellcheck shell=bash
# Shared by local-up.sh and local-down.sh (sourced, not run).

# shellcheck disable=SC2034  # used by the scripts that source this file
DATA_DIR="${LIMPQ_CLUSTER_DIR:-$REPO_DIR/runs/cluster}"

# running PIDFILE WORD: the pid in PIDFILE is alive and its command line mentions WORD (so a pid
# reused by an unrelated process after a reboot is not mistaken for ours).
running() {
    local pidfile="$1" word="$2" pid
    [[ -s "$pidfile" ]] || return 1
    pid="$(cat "$pidfile")"
    kill -0 "$pid" 2>/dev/null || return 1
    ps -p "$pid" -o args= 2>/dev/null | grep -q -- "$word"
}
