#!/usr/bin/env bash
# Submit the mdlda chain (or any mdlda command) to the Ray cluster as a Ray job.
#
#   cluster/submit.sh --config tune_spaces/FILE.yaml [--data DIR] [--workdir DIR] [--gpus N] [options] [-- ARGS]
#       runs `mdlda run --config FILE --data DIR --workdir DIR ARGS` on the cluster
#   cluster/submit.sh --entrypoint [options] -- COMMAND...
#       runs COMMAND instead (e.g. `mdlda prepare maestro --root ... --out ...`)
#
# Options:
#   --data DIR         dataset root on the cluster's shared storage (default $MDLDA_SHARED/data)
#   --workdir DIR      chain workdir on the shared storage (default $MDLDA_SHARED/work); rerunning with the same
#                      workdir resumes
#   --gpus N           first scale the cluster up to N GPUs and wait for them (cluster/wait_for_gpus.py); needed
#                      when GPU workers autoscale from 0 and the stage sizes its trials from the cluster
#   --mlflow-uri URI   MLFLOW_TRACKING_URI for every process of the job (default: the cluster's own, set on each
#                      node at `ray start`: http://<head private IP>:5000)
#   --address URL      Ray dashboard / job API (default $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265, i.e.
#                      through `ray dashboard ray_cluster.yaml` port forwarding)
#   --id ID            submission id (default mdlda-<UTC time>)
#   --follow           stream the job's logs after submitting
#   --dry-run          print the `ray job submit` command instead of running it
# $MDLDA_SHARED defaults to /mnt/mdlda (ray_cluster.yaml); cluster/onprem.yaml uses /mnt/shared/mdlda.
# Run from anywhere: the repository root is uploaded as the job's working directory (without .venv, .git, work
# folders), so the job runs the code you have checked out. Token auth: RAY_AUTH_MODE=token unless you set it.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
die() { echo "submit.sh: $*" >&2; exit 1; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared="${MDLDA_SHARED:-/mnt/mdlda}"
config="" data="$shared/data" workdir="$shared/work" gpus=0 mlflow_uri="" entrypoint_mode=0
address="${RAY_DASHBOARD_ADDRESS:-http://127.0.0.1:8265}" job_id="mdlda-$(date -u +%Y%m%d-%H%M%S)"
follow=0 dry_run=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --mlflow-uri) mlflow_uri="$2"; shift 2 ;;
    --address) address="$2"; shift 2 ;;
    --id) job_id="$2"; shift 2 ;;
    --entrypoint) entrypoint_mode=1; shift ;;
    --follow) follow=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "submit.sh: unknown option $1" >&2; usage 2 ;;
  esac
done
[[ "$gpus" =~ ^[0-9]+$ ]] || die "--gpus takes a whole number, got $gpus"

if [[ $entrypoint_mode == 1 ]]; then
  [[ -z "$config" ]] || die "--entrypoint runs the command after --; leave out --config"
  [[ ${#extra[@]} -gt 0 ]] || die "--entrypoint needs a command after --"
  command=("${extra[@]}")
else
  [[ -n "$config" ]] || die "--config is required (a chain config in tune_spaces/); see --help"
  # The job runs in the uploaded repository root, so the config must be inside it, given relative to it.
  [[ -f "$config" ]] || die "config $config not found"
  config_abs="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
  [[ "$config_abs" == "$repo"/* ]] || die "config $config is outside the repository $repo (only it is uploaded)"
  config="${config_abs#"$repo"/}"
  [[ "$data" == /* && "$workdir" == /* ]] || die "--data and --workdir must be absolute paths on the cluster"
  command=(mdlda run --config "$config" --data "$data" --workdir "$workdir" "${extra[@]}")
fi
if [[ "$gpus" -gt 0 ]]; then
  command=(python cluster/wait_for_gpus.py --gpus "$gpus" -- "${command[@]}")
fi

# Runtime environment: what not to upload, and the tracking URI when overridden.
runtime_env="$(python3 - "$mlflow_uri" <<'EOF'
import json, sys
env = {"excludes": [".git", ".venv", "venv", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info",
                    "demo_work", "work", "runs", "results", "mlruns", "mlartifacts", "*.db"]}
if sys.argv[1]:
    env["env_vars"] = {"MLFLOW_TRACKING_URI": sys.argv[1]}
print(json.dumps(env))
EOF
)"

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && ! -f "$token_file" ]]; then
  die "RAY_AUTH_MODE=token but no token: the cluster's token is ~/.ray/auth_token (ray get-auth-token --generate)"
fi

submit=(ray job submit --address "$address" --submission-id "$job_id" --no-wait
        --working-dir "$repo" --runtime-env-json "$runtime_env" -- "${command[@]}")
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${submit[@]}"
  echo
  exit 0
fi

"${submit[@]}"
cat <<EOF

Submitted job $job_id to $address
  follow:   ray job logs -f --address $address $job_id
  status:   ray job status --address $address $job_id
  stop:     ray job stop --address $address $job_id
  (RAY_AUTH_MODE=$RAY_AUTH_MODE must be set for these, as here)
  dashboard: $address   MLflow: cluster/tunnel.sh, then http://localhost:5000
EOF
if [[ $follow == 1 ]]; then
  ray job logs -f --address "$address" "$job_id"
fi
