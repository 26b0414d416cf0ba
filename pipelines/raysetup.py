"""Connecting to Ray: the cluster when there is one, a local Ray otherwise."""

from __future__ import annotations

import os

import ray

from mdlda.logs import cap_ray_logs


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> dict:
    """Start or join Ray once per process and return the cluster resources.

    ``address=None`` joins a running cluster when ``RAY_ADDRESS`` is set (e.g. under ``ray job submit``) and
    starts a local Ray otherwise; ``"auto"`` insists on a running cluster.
    """
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            cap_ray_logs()  # the local Ray this starts rotates its log files (mdlda/logs.py)
        kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": not quiet}
        if address is None and num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(address=address, **kwargs)
    ctx = ray.data.DataContext.get_current()
    # batches in the same order on every run: a seeded trial is reproducible (the local shuffle is seeded)
    ctx.execution_options.preserve_order = True
    # Parquet through Ray Data's V1 datasource unless RAY_DATA_USE_DATASOURCE_V2 says otherwise: V2 (Ray 2.60's
    # default) lists the files in a task of its own before the read, ~1.2 s more per read on 2 CPUs whatever its
    # size (bench/README.md, parquet_read.py), and a chain makes a few dozen reads
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        ctx.use_datasource_v2 = False
    if quiet:
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    return ray.cluster_resources()
