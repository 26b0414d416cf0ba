#!/usr/bin/env bash
# Forward the MLflow tracking server and the Ray dashboard of a running cluster to this machine, over SSH.
#
#   cluster/tunnel.sh [CLUSTER_YAML] [--mlflow-port 5000] [--dashboard-port 8265]
#
# Then: MLflow UI at http://localhost:5000, the Ray dashboard and job API at http://localhost:8265 (what
# cluster/submit.sh talks to). Ctrl-C closes both. CLUSTER_YAML defaults to ray_cluster.yaml.
# Why not `ray dashboard`: it forwards to the head's localhost, where the dashboard listens but MLflow does not
# (the server is bound to the head's private address only, see start_mlflow.sh). `ray dashboard ray_cluster.yaml`
# still works for the dashboard alone.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
cfg=ray_cluster.yaml mlflow_port=5000 dashboard_port=8265
while [[ $# -gt 0 ]]; do
  case "$1" in
    --mlflow-port) mlflow_port="$2"; shift 2 ;;
    --dashboard-port) dashboard_port="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    -*) echo "tunnel.sh: unknown option $1" >&2; usage 2 ;;
    *) cfg="$1"; shift ;;
  esac
done

# shellcheck source=cluster/_head.sh
source "$(dirname "${BASH_SOURCE[0]}")/_head.sh"
head_init "$cfg"

# The address the server is bound to, as start_mlflow.sh recorded it on the head.
uri="$(ray exec "$cfg" 'cat ~/.mdlda/mlflow/uri' 2>/dev/null | tr -d '\r' | grep -E '^http://' | tail -n 1 || true)"
[[ -n "$uri" ]] || { echo "tunnel.sh: no MLflow server recorded on the head (~/.mdlda/mlflow/uri); start it with" \
  "ray exec $cfg 'bash ~/mdlda-cluster/start_mlflow.sh --store ... --artifacts ...'" >&2; exit 1; }
mlflow_target="${uri#http://}"

echo "MLflow UI:      http://localhost:$mlflow_port   (-> $mlflow_target on the head; login: ~/.mlflow/credentials)"
echo "Ray dashboard:  http://localhost:$dashboard_port   (token: ray get-auth-token)"
echo "Ctrl-C to close."
exec ssh "${SSH_OPTS[@]}" -N \
  -L "$mlflow_port:$mlflow_target" \
  -L "$dashboard_port:127.0.0.1:8265" \
  "$SSH_USER@$HEAD_IP"
