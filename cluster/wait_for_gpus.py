"""Scale an autoscaling cluster up to N GPUs, wait for them, then run a command (the job's real entrypoint).

    python cluster/wait_for_gpus.py --gpus 4 [--timeout-min 30] -- mdlda run --config ... --workdir ...

Why: with GPU workers at min_workers 0 the cluster starts with no GPU, and a stage that sizes its trials
from ``ray.cluster_resources()`` at start-up (the teacher sweep does) would see none. This asks the
autoscaler for N one-GPU bundles (``ray.autoscaler.sdk.request_resources``), waits until the GPUs have
joined, then withdraws the request, so that nodes stay only while work keeps them busy and
``idle_timeout_minutes`` removes them after the job. Then it replaces itself with the command
(``os.execvp``: same process and environment; the command's exit code is the job's).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, required=True, help="GPUs the cluster must have before the command runs.")
    parser.add_argument(
        "--timeout-min",
        type=float,
        default=30.0,
        help="Give up after this many minutes (a new GPU node boots and installs in ~5-10).",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="The command to run, after `--`.")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after `--`")

    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
    have = ray.cluster_resources().get("GPU", 0.0)
    if have < args.gpus:
        print(f"cluster has {have:g} GPU(s); asking the autoscaler for {args.gpus}", flush=True)
        request_resources(bundles=[{"GPU": 1}] * args.gpus)
        deadline = time.monotonic() + args.timeout_min * 60
        try:
            while (have := ray.cluster_resources().get("GPU", 0.0)) < args.gpus:
                if time.monotonic() > deadline:
                    sys.exit(
                        f"only {have:g} of {args.gpus} GPU(s) after {args.timeout_min:g} min: "
                        "see `ray monitor` (node setup failures, EC2 capacity or quota)"
                    )
                time.sleep(10)
        finally:
            request_resources(bundles=[])  # withdraw the request: busy nodes stay, idle ones time out
    print(f"cluster has {have:g} GPU(s); running: {' '.join(command)}", flush=True)
    ray.shutdown()
    sys.stdout.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
