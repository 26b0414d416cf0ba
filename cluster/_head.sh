# shellcheck shell=bash disable=SC2034  # sets variables for the scripts that source it
# Sourced by tunnel.sh and fetch_results.sh (not run): how to reach the head node of a running cluster over SSH,
# with the user and key of the cluster YAML and the address `ray get-head-ip` reports (public on AWS, head_ip on
# premises). Sets HEAD_IP, SSH_USER, SSH_KEY and SSH_OPTS.

head_init() {
  local cfg="$1"
  [[ -f "$cfg" ]] || { echo "no cluster config $cfg" >&2; return 1; }
  command -v ray >/dev/null || { echo "ray is not on PATH (pip install 'ray[default]==2.60.*' boto3)" >&2; return 1; }
  HEAD_IP="$(ray get-head-ip "$cfg" 2>/dev/null | tail -n 1)"
  [[ "$HEAD_IP" =~ ^[0-9a-fA-F.:]+$ ]] || { echo "no running head node for $cfg (ray up $cfg)" >&2; return 1; }
  local auth
  auth="$("${PYTHON:-python3}" - "$cfg" <<'EOF'
import os, sys, yaml
auth = yaml.safe_load(open(sys.argv[1])).get("auth", {})
print(auth.get("ssh_user", "ubuntu"), os.path.expanduser(auth.get("ssh_private_key", "~/.ssh/id_rsa")))
EOF
)"
  read -r SSH_USER SSH_KEY <<< "$auth"
  # Host keys as `ray up` treats them: cluster nodes are new machines at recycled addresses.
  SSH_OPTS=(-i "$SSH_KEY" -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
            -o LogLevel=ERROR -o ServerAliveInterval=30)
}
