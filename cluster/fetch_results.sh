#!/usr/bin/env bash
# Copy a chain's results from the cluster's shared storage to this machine.
#
#   cluster/fetch_results.sh [--cluster ray_cluster.yaml] [--workdir /mnt/mdlda/work] [--to results] [--all]
#
# Copies the workdir (reports, metrics, the Tune experiment folders that ExperimentAnalysis / Tuner.restore read)
# from the head node with rsync over SSH, leaving out Parquet shards and trial checkpoints unless --all: the
# registered models are in MLflow, and the shards can be rebuilt. Rerunning copies only what changed.
# The models and runs themselves: open the tracking server through cluster/tunnel.sh (http://localhost:5000), and
# point local clients at it, e.g.
#   MLFLOW_TRACKING_URI=http://localhost:5000 mlflow artifacts download -u models:/mdlda-student@champion -d student
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
cfg=ray_cluster.yaml workdir="${MDLDA_SHARED:-/mnt/mdlda}/work" to=results all=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster) cfg="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --to) to="$2"; shift 2 ;;
    --all) all=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "fetch_results.sh: unknown option $1" >&2; usage 2 ;;
  esac
done
[[ "$workdir" == /* ]] || { echo "fetch_results.sh: --workdir must be the absolute path on the cluster" >&2; exit 1; }

# shellcheck source=cluster/_head.sh
source "$(dirname "${BASH_SOURCE[0]}")/_head.sh"
head_init "$cfg"

excludes=()
if [[ $all == 0 ]]; then
  excludes=(--exclude '*.parquet' --exclude 'checkpoint_*/' --exclude '.prepare/')
fi
mkdir -p "$to"
echo "fetching $SSH_USER@$HEAD_IP:$workdir/ -> $to/"
rsync -az --partial --info=progress2 "${excludes[@]}" -e "ssh ${SSH_OPTS[*]}" \
  "$SSH_USER@$HEAD_IP:$workdir/" "$to/"
echo
echo "Done: $to/. For the MLflow UI run cluster/tunnel.sh $cfg, then open http://localhost:5000."
