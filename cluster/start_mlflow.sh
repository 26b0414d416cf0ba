#!/usr/bin/env bash
# Start the MLflow tracking server on this (head) node, bound to the cluster-private address only.
#
#   start_mlflow.sh --store DIR --artifacts URI [--host IP] [--port 5000] [--workers N]
#   start_mlflow.sh --print-uri [--host IP] [--port 5000]    print http://<private IP>:<port> and exit
#   start_mlflow.sh --stop                                   stop the server this script started
#   start_mlflow.sh --dry-run --store DIR --artifacts URI    print the `mlflow server` command, start nothing
#
# Backend store: $MLFLOW_BACKEND_URI when set (PostgreSQL, e.g. postgresql://mlflow@db.internal:5432/mlflow with the
# password in ~/.pgpass, never on a command line), otherwise SQLite at DIR/mlflow.db; DIR is on shared storage so the
# runs outlive the head node. SQLite allows one writer, so the server then runs one worker process (several
# processes writing one SQLite file fail with "database is locked"); PostgreSQL gets 4 unless --workers says.
# Artifacts: URI (s3://bucket/prefix, or an absolute path on shared storage), proxied by the server
# (--serve-artifacts), so clients need no S3 access of their own.
#
# The address: --host, else $MLFLOW_HOST, else the first address of `hostname -I` (the primary private interface
# on EC2 and on most servers). Wildcard addresses (0.0.0.0, ::) are refused: the server has no authentication, and
# the cluster reaches it on the private address (MLFLOW_TRACKING_URI=http://<that address>:5000); people reach it
# through an SSH tunnel (cluster/tunnel.sh).
#
# Idempotent: when the pid file names a live MLflow server, nothing is started. Log, pid file and the URI (read by
# cluster/tunnel.sh) are in $MLFLOW_RUN_DIR (default ~/.mdlda/mlflow), on the node's own disk.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
die() { echo "start_mlflow.sh: $*" >&2; exit 1; }

store="" artifacts="" host="${MLFLOW_HOST:-}" port=5000 workers="${MLFLOW_WORKERS:-}" mode=start
while [[ $# -gt 0 ]]; do
  case "$1" in
    --store) store="$2"; shift 2 ;;
    --artifacts) artifacts="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --print-uri) mode=print-uri; shift ;;
    --stop) mode=stop; shift ;;
    --dry-run) mode=dry-run; shift ;;
    -h|--help) usage 0 ;;
    *) echo "start_mlflow.sh: unknown option $1" >&2; usage 2 ;;
  esac
done

run_dir="${MLFLOW_RUN_DIR:-$HOME/.mdlda/mlflow}"
pid_file="$run_dir/server.pid"
log_file="$run_dir/server.log"

if [[ -z "$host" ]]; then
  host="$(hostname -I 2>/dev/null | awk '{print $1}')"
fi
[[ -n "$host" ]] || die "could not detect this node's private address; pass --host"
case "$host" in
  0.0.0.0|::|"[::]"|\*) die "refusing to bind $host (every interface): the server has no authentication" ;;
esac
uri="http://$host:$port"

if [[ "$mode" == print-uri ]]; then
  echo "$uri"
  exit 0
fi

running_pid() {
  # The pid in the pid file, if that process is alive and is an MLflow server.
  [[ -f "$pid_file" ]] || return 1
  local pid
  pid="$(cat "$pid_file")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && grep -qa mlflow "/proc/$pid/cmdline" 2>/dev/null \
    && echo "$pid"
}

if [[ "$mode" == stop ]]; then
  if pid="$(running_pid)"; then
    kill -- "-$pid" 2>/dev/null || kill "$pid"
    rm -f "$pid_file"
    echo "stopped MLflow server (pid $pid)"
  else
    echo "no MLflow server started by this script is running"
  fi
  exit 0
fi

if [[ "$mode" == start ]] && pid="$(running_pid)"; then
  echo "MLflow server already running (pid $pid) at $(cat "$run_dir/uri" 2>/dev/null || echo "$uri"); log: $log_file"
  exit 0
fi

[[ -n "$artifacts" ]] || die "--artifacts is required (s3://bucket/prefix or an absolute path on shared storage)"
if [[ -n "${MLFLOW_BACKEND_URI:-}" ]]; then
  backend="$MLFLOW_BACKEND_URI"
  default_workers=4
else
  [[ -n "$store" ]] || die "--store DIR is required for the SQLite backend (or set MLFLOW_BACKEND_URI)"
  [[ "$store" == /* ]] || die "--store must be an absolute path, got $store"
  backend="sqlite:///$store/mlflow.db"
  default_workers=1
fi
workers="${workers:-$default_workers}"
if [[ "$backend" == sqlite:* && "$workers" != 1 ]]; then
  die "SQLite allows one writer: --workers must be 1 (use PostgreSQL via MLFLOW_BACKEND_URI for more)"
fi
if [[ "$artifacts" != *://* && "$artifacts" != /* ]]; then
  die "--artifacts must be a URI or an absolute path, got $artifacts"
fi
# Host headers: this address (the cluster) and localhost (SSH tunnels), on any port.
allowed_hosts="$host,$host:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
cmd=(mlflow server
  --backend-store-uri "$backend"
  --artifacts-destination "$artifacts"
  --serve-artifacts
  --host "$host"
  --port "$port"
  --workers "$workers"
  --allowed-hosts "$allowed_hosts")
if [[ "$mode" == dry-run ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

command -v mlflow >/dev/null || die "mlflow is not on PATH (activate the project's venv)"
[[ -z "$store" || -n "${MLFLOW_BACKEND_URI:-}" ]] || mkdir -p "$store"
[[ "$artifacts" == *://* ]] || mkdir -p "$artifacts"
mkdir -p "$run_dir"
echo "$(date -u +%FT%TZ) starting MLflow at $uri (backend ${backend%%:*}, $workers worker(s), artifacts $artifacts)" \
  >> "$log_file"
# setsid: the server outlives this shell (and the SSH session `ray up` runs it in), in its own process group.
setsid nohup "${cmd[@]}" >> "$log_file" 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$pid_file"
echo "$uri" > "$run_dir/uri"

# Wait until it answers (a fresh SQLite database takes a few seconds to migrate).
for _ in $(seq 1 $((2 * ${MLFLOW_START_TIMEOUT_S:-90}))); do
  if curl -fsS -o /dev/null "$uri/health" 2>/dev/null; then
    echo "MLflow server running (pid $pid) at $uri; log: $log_file"
    exit 0
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
echo "start_mlflow.sh: the MLflow server did not come up at $uri; last lines of $log_file:" >&2
tail -n 20 "$log_file" >&2
kill "$pid" 2>/dev/null || true
rm -f "$pid_file"
exit 1
