#!/usr/bin/env bash
# Start the MLflow tracking server on this (head) node, bound to the cluster-private address only, with a login.
#
#   start_mlflow.sh --store DIR --artifacts URI [--credentials FILE] [--host IP] [--port 5000] [--workers N]
#   start_mlflow.sh --print-uri [--host IP] [--port 5000]    print http://<private IP>:<port> and exit
#   start_mlflow.sh --stop                                   stop the server this script started
#   start_mlflow.sh --dry-run --store DIR --artifacts URI    check the inputs, print the `mlflow server` command
#
# Backend store: $MLFLOW_BACKEND_URI when set (PostgreSQL, e.g. postgresql://mlflow@db.internal:5432/mlflow with the
# password in ~/.pgpass, never on a command line), otherwise SQLite at DIR/mlflow.db; DIR is on shared storage so the
# runs outlive the head node. SQLite allows one writer, so the server then runs one worker process (several
# processes writing one SQLite file fail with "database is locked"); PostgreSQL gets 4 unless --workers says.
# Artifacts: URI (s3://bucket/prefix, or an absolute path on shared storage), proxied by the server
# (--serve-artifacts), so clients need no S3 access of their own.
#
# Login: MLflow's own auth app (`mlflow server --app-name basic-auth`). Every request but /health needs a user name
# and password (HTTP basic auth); users and their permissions live in the auth database: $MLFLOW_AUTH_DATABASE_URI
# when set, otherwise SQLite at DIR/basic_auth.db. Users without a grant may read everything (default_permission
# READ); whoever creates an experiment or a registered model may manage it. The admin user is created on the first
# start from, in this order:
#   - MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD in the environment (both, or neither);
#   - the credentials FILE (--credentials, default ~/.mlflow/credentials): MLflow's client credentials file,
#       [mlflow]
#       mlflow_tracking_username = mdlda
#       mlflow_tracking_password = <at least 12 characters>
#     readable by its owner only (chmod 600). The same file lets MLflow clients on this machine log in.
# Neither there: the script stops with a message saying what to create. Passwords never reach a command line or a
# file this script writes; the server gets them through its environment. Later starts find the admin in the auth
# database and ignore the password (change it with MLflow's update-password API, then update the file).
#
# The address: --host, else $MLFLOW_HOST, else the first address of `hostname -I` (the primary private interface
# on EC2 and on most servers). Wildcard addresses (0.0.0.0, ::) are refused: the server speaks plain HTTP, so the
# passwords cross the network in clear text; the cluster reaches it on the private address
# (MLFLOW_TRACKING_URI=http://<that address>:5000); people reach it through an SSH tunnel (cluster/tunnel.sh).
#
# Idempotent: when the pid file names a live MLflow server, nothing is started. Log, pid file, the URI (read by
# cluster/tunnel.sh), the auth app's config (basic_auth.ini, no secrets in it) and the key MLflow signs its sign-up
# form with (flask_secret_key, made once, owner-only) are in $MLFLOW_RUN_DIR (default ~/.mdlda/mlflow), on the
# node's own disk.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
die() { echo "start_mlflow.sh: $*" >&2; exit 1; }

store="" artifacts="" host="${MLFLOW_HOST:-}" port=5000 workers="${MLFLOW_WORKERS:-}" mode=start
credentials="$HOME/.mlflow/credentials"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --store) store="$2"; shift 2 ;;
    --artifacts) artifacts="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --credentials) credentials="$2"; shift 2 ;;
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
  0.0.0.0|::|"[::]"|\*)
    die "refusing to bind $host (every interface): the passwords cross plain HTTP, keep it on a private address" ;;
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

stop_group() {
  # SIGTERM to the server's process group (the CLI forwards it to uvicorn), SIGKILL if it lingers past 15 s.
  local pid="$1"
  kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 30); do
    kill -0 -- "-$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
}

if [[ "$mode" == stop ]]; then
  if pid="$(running_pid)"; then
    stop_group "$pid"
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

# --- the login ------------------------------------------------------------------------------------------------
if [[ -n "${MLFLOW_AUTH_DATABASE_URI:-}" ]]; then
  auth_db="$MLFLOW_AUTH_DATABASE_URI"
elif [[ -n "$store" ]]; then
  [[ "$store" == /* ]] || die "--store must be an absolute path, got $store"
  auth_db="sqlite:///$store/basic_auth.db"
else
  die "the auth app needs a user database: set MLFLOW_AUTH_DATABASE_URI (e.g. a second PostgreSQL database) or" \
    "pass --store DIR for SQLite at DIR/basic_auth.db"
fi

read_credentials() {
  # The admin's user name and password, one per line, from the environment or the credentials file.
  if [[ -n "${MLFLOW_AUTH_ADMIN_USERNAME:-}${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]]; then
    [[ -n "${MLFLOW_AUTH_ADMIN_USERNAME:-}" && -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]] \
      || die "set both MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD, or neither (then $credentials)"
    printf '%s\n%s\n' "$MLFLOW_AUTH_ADMIN_USERNAME" "$MLFLOW_AUTH_ADMIN_PASSWORD"
    return
  fi
  [[ -f "$credentials" ]] || die "no admin credentials: $credentials does not exist and MLFLOW_AUTH_ADMIN_USERNAME /" \
    "MLFLOW_AUTH_ADMIN_PASSWORD are not set. Create it (chmod 600) with the lines" \
    "'[mlflow]', 'mlflow_tracking_username = NAME', 'mlflow_tracking_password = PASSWORD' (cluster/README.md)"
  local perms
  perms="$(stat -c %a "$credentials")"
  [[ "$perms" =~ ^[0-7]?[0-7]00$ ]] || die "$credentials is readable by others (mode $perms): chmod 600 $credentials"
  # configparser, as MLflow's client reads the same file: both see the same password.
  python3 - "$credentials" <<'EOF'
import configparser
import sys

path = sys.argv[1]
config = configparser.ConfigParser()
try:
    config.read(path)
    section = config["mlflow"]
    values = [section.get("mlflow_tracking_username"), section.get("mlflow_tracking_password")]
except (configparser.Error, KeyError) as exc:
    sys.exit(f"start_mlflow.sh: {path} is not an MLflow credentials file ({type(exc).__name__}: {exc})")
missing = [k for k, v in zip(("mlflow_tracking_username", "mlflow_tracking_password"), values) if not v]
if missing:
    sys.exit(f"start_mlflow.sh: {path} has no {' or '.join(missing)} in its [mlflow] section")
print(*values, sep="\n")
EOF
}
creds="$(read_credentials)" || exit 1
admin_user="${creds%%$'\n'*}"
admin_password="${creds#*$'\n'}"
(( ${#admin_password} >= 12 )) || die "the admin password must have at least 12 characters (MLflow's rule)"

auth_ini="$run_dir/basic_auth.ini"
secret_file="$run_dir/flask_secret_key"

# Host headers: this address (the cluster) and localhost (SSH tunnels), on any port.
allowed_hosts="$host,$host:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
cmd=(mlflow server
  --backend-store-uri "$backend"
  --artifacts-destination "$artifacts"
  --serve-artifacts
  --host "$host"
  --port "$port"
  --workers "$workers"
  --allowed-hosts "$allowed_hosts"
  --app-name basic-auth)
if [[ "$mode" == dry-run ]]; then
  printf 'MLFLOW_AUTH_CONFIG_PATH=%q ' "$auth_ini"
  printf '%q ' "${cmd[@]}"
  echo
  echo "login: admin user $admin_user, users and permissions in ${auth_db%%:*} ($auth_db)"
  exit 0
fi

command -v mlflow >/dev/null || die "mlflow is not on PATH (activate the project's venv)"
[[ -z "$store" ]] || mkdir -p "$store"  # the SQLite database(s)
[[ "$artifacts" == *://* ]] || mkdir -p "$artifacts"
mkdir -p "$run_dir"
chmod 700 "$run_dir"
# The auth app's config: where its users live and what a user without a grant may do. No password in it.
cat > "$auth_ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $auth_db
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
  if [[ ! -s "$secret_file" ]]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secret_file")
  fi
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$secret_file")"
fi
# Through the environment, not the command line (`ps` shows command lines to every user of the node).
export MLFLOW_AUTH_CONFIG_PATH="$auth_ini" MLFLOW_FLASK_SERVER_SECRET_KEY
export MLFLOW_AUTH_ADMIN_USERNAME="$admin_user" MLFLOW_AUTH_ADMIN_PASSWORD="$admin_password"
# No job runner: mdlda runs no MLflow server jobs (GenAI evaluation), and the runner is one more process that
# writes to the database, which SQLite allows only one of.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
echo "$(date -u +%FT%TZ) starting MLflow at $uri (backend ${backend%%:*}, $workers worker(s), artifacts $artifacts," \
  "login: basic-auth, admin $admin_user, users in ${auth_db%%:*})" >> "$log_file"
# setsid: the server outlives this shell (and the SSH session `ray up` runs it in), in its own process group.
setsid nohup "${cmd[@]}" >> "$log_file" 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$pid_file"
echo "$uri" > "$run_dir/uri"

# Wait until it answers (a fresh SQLite database takes a few seconds to migrate).
for _ in $(seq 1 $((2 * ${MLFLOW_START_TIMEOUT_S:-90}))); do
  if curl -fsS -o /dev/null "$uri/health" 2>/dev/null; then
    echo "MLflow server running (pid $pid) at $uri with a login (admin $admin_user); log: $log_file"
    exit 0
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
echo "start_mlflow.sh: the MLflow server did not come up at $uri; last lines of $log_file:" >&2
tail -n 20 "$log_file" >&2
stop_group "$pid"
rm -f "$pid_file"
exit 1
