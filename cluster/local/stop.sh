#!/usr/bin/env bash
# Stop what cluster/local/start.sh started (same settings). Safe to run twice.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${DMOERM_STATE_DIR:-$REPO/.scratch/cluster-local}"
VENV="${DMOERM_VENV:-$REPO/.venv}"
[ -x "$VENV/bin/python" ] && PATH="$VENV/bin:$PATH"

# Running = exists and is not a zombie (a container's init may never reap them).
running() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }

pid_file="$STATE/mlflow.pid"
if [ -f "$pid_file" ] && running "$(cat "$pid_file")"; then
  pid="$(cat "$pid_file")"
  echo "mlflow: stopping process group $pid"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do running "$pid" || break; sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
else
  echo "mlflow: not running"
fi
rm -f "$pid_file"

pids_file="$STATE/ray.pids"
if [ -s "$pids_file" ]; then
  # End only this instance's processes: the pids start.sh recorded and their children (the raylet's
  # agents and workers, which outlive it otherwise).
  pids=""
  for pid in $(cat "$pids_file"); do
    if running "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q ray; then
      pids="$pids $pid $(pgrep -P "$pid" | tr '\n' ' ' || true)"
    fi
  done
  pids="$(echo $pids)"  # squeeze blanks
  if [ -n "$pids" ]; then
    echo "ray: stopping pids $pids"
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 25); do  # agents may ignore SIGTERM once the raylet is gone: SIGKILL after 5 s
      alive=""
      for pid in $pids; do running "$pid" && alive="$alive $pid"; done
      [ -z "$alive" ] && break
      sleep 0.2
    done
    [ -n "$alive" ] && kill -KILL $alive 2>/dev/null || true
  else
    echo "ray: not running"
  fi
else
  echo "ray: nothing recorded in $STATE (not started by start.sh; \`ray stop\` ends every Ray instance)"
fi
rm -f "$pids_file"
