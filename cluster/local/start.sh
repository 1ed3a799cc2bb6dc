#!/usr/bin/env bash
# Start the embedded platform on this machine: a local Ray head and an MLflow server on SQLite with a local
# artifact folder. Everything binds to 127.0.0.1 and lives under one state dir. Safe to run twice.
#
#   cluster/local/start.sh          # then: eval "$(cluster/local/start.sh --env)" to export the addresses
#
# Settings (environment): DMOERM_STATE_DIR (default .scratch/cluster-local in the repo), RAY_NUM_CPUS
# (default: all cores), RAY_GCS_PORT (6379), RAY_DASHBOARD_PORT (8265), MLFLOW_PORT (5000),
# DMOERM_VENV (default .venv in the repo, used when present).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${DMOERM_STATE_DIR:-$REPO/.scratch/cluster-local}"
NUM_CPUS="${RAY_NUM_CPUS:-$(getconf _NPROCESSORS_ONLN)}"
GCS_PORT="${RAY_GCS_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
VENV="${DMOERM_VENV:-$REPO/.venv}"
[ -x "$VENV/bin/python" ] && PATH="$VENV/bin:$PATH"
HOST=127.0.0.1

# Ray 2.60 enables token auth by default (and writes $HOME/.ray/auth_token); this single-user instance runs
# without. Its dashboard / job API binds to 127.0.0.1, but Ray 2.60's GCS, raylet and client server still
# listen on other interfaces (measured): use it on a trusted machine or behind a firewall, with auth on any
# shared cluster.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export MLFLOW_DISABLE_TELEMETRY=true
# 2 processes / 0.5 GB instead of 10 / 2.4 GB (no server-side jobs needed here).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

mkdir -p "$STATE/ray" "$STATE/mlflow/artifacts" "$STATE/logs"

print_env() {
  echo "export RAY_ADDRESS=http://$HOST:$DASHBOARD_PORT"   # for `ray job submit`
  echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
  echo "export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT"
}
if [ "${1:-}" = "--env" ]; then print_env; exit 0; fi

# A pid file whose process runs (not a zombie: a container's init may never reap them).
alive() { [ -f "$1" ] && [ -r "/proc/$(cat "$1")/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$(cat "$1")/status"; }

answers() { python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null; }

wait_http() {  # url, seconds, log file
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    answers "$1" && return 0
    sleep 0.2
  done
  echo "not answering after $2 s: $1 (log: $3)" >&2
  tail -n 20 "$3" >&2 || true
  return 1
}

# --- Ray head -------------------------------------------------------------------------------------------
if answers "http://$HOST:$DASHBOARD_PORT/api/version"; then
  echo "ray: already running (dashboard http://$HOST:$DASHBOARD_PORT)"
else
  echo "ray: starting head ($NUM_CPUS CPUs)"
  ray start --head --node-ip-address "$HOST" --port "$GCS_PORT" --num-cpus "$NUM_CPUS" \
    --include-dashboard true --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" \
    --temp-dir "$STATE/ray" --disable-usage-stats >"$STATE/logs/ray-start.log" 2>&1 \
    || { tail -n 30 "$STATE/logs/ray-start.log" >&2; exit 1; }
  wait_http "http://$HOST:$DASHBOARD_PORT/api/version" 60 "$STATE/logs/ray-start.log"
  # The pids of this instance, for stop.sh: its daemons carry its temp dir on their command line, the
  # Ray client server its GCS port. (`ray stop` would also end every other Ray instance on the machine.)
  { pgrep -f -- "$STATE/ray/" || true; pgrep -f -- "ray.util.client.server --address=[^ ]*:$GCS_PORT " || true; } \
    >"$STATE/ray.pids"
fi

# --- MLflow server --------------------------------------------------------------------------------------
if alive "$STATE/mlflow.pid"; then
  echo "mlflow: already running (pid $(cat "$STATE/mlflow.pid"))"
else
  echo "mlflow: starting server on sqlite:///$STATE/mlflow/mlflow.db"
  # setsid: own process group, so stop.sh can end the server and its workers by this pid alone.
  setsid mlflow server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" \
    --artifacts-destination "$STATE/mlflow/artifacts" \
    >"$STATE/logs/mlflow.log" 2>&1 </dev/null &
  echo $! >"$STATE/mlflow.pid"
  wait_http "http://$HOST:$MLFLOW_PORT/health" 90 "$STATE/logs/mlflow.log"
fi

echo "state: $STATE"
echo "Ray dashboard and job API: http://$HOST:$DASHBOARD_PORT   MLflow UI: http://$HOST:$MLFLOW_PORT"
print_env
