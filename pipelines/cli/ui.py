"""`mdlda ui`: the MLflow UI on a workdir's embedded store, bound to 127.0.0.1. :func:`register` adds the command
to the Typer app; the UI is MLflow's own (``python -m mlflow ui``), started with the store URI and artifact root
that :mod:`mdlda.tracking` uses for that workdir, so nobody has to type the absolute SQLite URI.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import typer

HOST = "127.0.0.1"  # never on all interfaces: the embedded store has no authentication


def ui_command(workdir: Path, port: int) -> tuple[list[str], str]:
    """The ``mlflow ui`` command line for ``workdir``'s store (or ``MLFLOW_TRACKING_URI``'s non-HTTP store) and
    the store URI it serves."""
    from mdlda.tracking import tracking_override, tracking_uri

    workdir = Path(workdir).resolve()
    uri = tracking_uri(workdir)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    if not tracking_override():  # the embedded store: its artifacts sit beside it
        cmd += ["--default-artifact-root", (workdir / "mlartifacts").as_uri()]
    cmd += ["--host", HOST, "--port", str(port), "--workers", "1"]
    return cmd, uri


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def ui(
    workdir: Path = typer.Option(
        Path("work"),
        help="Workdir whose embedded MLflow store (mlflow.db + mlartifacts/) to browse; with MLFLOW_TRACKING_URI "
        "set, that store instead.",
    ),
    port: int = typer.Option(5000, min=1, max=65535, help="Port on 127.0.0.1 to serve the UI on."),
) -> None:
    """Open the MLflow UI (runs, metrics, the model registry) on the workdir's store, on 127.0.0.1 only.

    Prints the URL and serves until Ctrl-C. For a tracking server (MLFLOW_TRACKING_URI=http...) it only prints
    that server's address: its UI is already there.
    """
    from mdlda.tracking import tracking_override
    from pipelines.cli.common import console, fail

    env_uri = tracking_override() or ""
    if env_uri.startswith(("http://", "https://")):
        console.print(f"MLFLOW_TRACKING_URI points at a tracking server; its UI: {env_uri}", soft_wrap=True)
        return
    if not env_uri and not (Path(workdir) / "mlflow.db").is_file():
        fail(
            f"{Path(workdir) / 'mlflow.db'} does not exist: {workdir} holds no MLflow store yet. Pass the --workdir "
            "of a chain (`mdlda run` or any stage writes the store there)."
        )
    if not _port_free(port):
        fail(f"port {port} on {HOST} is in use (another `mdlda ui` or MLflow server?): pass another --port")
    cmd, uri = ui_command(workdir, port)
    console.print(f"MLflow UI on {uri}: http://{HOST}:{port}  (Ctrl-C stops it)", soft_wrap=True)
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return
    if code:
        fail(f"the MLflow UI exited with code {code} (its messages are above)")


def register(app: typer.Typer) -> None:
    """Add `ui` to ``app``."""
    app.command("ui")(ui)
