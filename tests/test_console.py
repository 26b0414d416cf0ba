"""The console of a command: mdlda's lines once each, what other libraries print in <workdir>/logs/libraries.log.

The output is captured as a user's log file or CI would capture it (not a terminal): every event is one line,
printed once, and none of the lines Ray, Tune and MLflow print reaches it.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from mdlda.console import command_console, sweep_table

# what Ray, Ray Data, Tune and MLflow print on a normal run (issue 16), none of which may reach the console
FOREIGN = [
    r"Started a local Ray instance",
    r"Connect(ing|ed) to (existing )?Ray cluster",
    r"View the dashboard",
    r"Progress bars disabled",
    r"execution finished",
    r"\(raylet\)",
    r"core_worker",
    r"Configuration for experiment",
    r"View detailed results here",
    r"TensorBoard",
    r"performance bottleneck",
    r"Creating initial MLflow database tables",
    r"Successfully registered model",
    r"Wrote the latest version",
    r"INFO:mdlda",
    r"Warning|UserWarning|DeprecationWarning",
    r"/tmp/ray",
]


def _foreign(text: str) -> list[str]:
    return [p for p in FOREIGN if re.search(p, text)]


def _once(text: str, pattern: str) -> bool:
    return len(re.findall(pattern, text, flags=re.M)) == 1


def test_the_live_sweep_table_shows_every_trial_with_totals():
    view = {
        "kind": "sweep",
        "name": "teachers-1a2b",
        "totals": "1/2 done, 1 running | elapsed 10s | ETA ~5s",
        "rows": [
            {"trial": "00000", "state": "finished", "epoch": 2, "last": 0.41, "best": 0.43, "samples_per_s": 12.5,
             "data_wait": 0.1},
            {"trial": "00001", "state": "running", "epoch": None, "last": None, "best": None},
        ],
    }  # fmt: skip
    out = io.StringIO()
    Console(file=out, width=100, force_terminal=True, color_system=None).print(sweep_table(view))
    text = out.getvalue()
    for cell in ("sweep teachers-1a2b", "00000", "finished", "0.410", "0.430", "12.5", "10%", "00001", "running"):
        assert cell in text, text
    assert "ETA ~5s" in text


@pytest.mark.slow
def test_a_sweep_prints_each_event_once_as_one_line_and_keeps_tunes_output_in_the_log(ray_local, tmp_path):
    from ray import tune

    from pipelines.progress import SweepProgress

    def trainable(config):
        if config["lr"] > 1:
            raise ValueError("the loss became NaN at epoch 1")
        for epoch in range(2):
            tune.report({"valid_r_mean": 0.1 * (epoch + 1), "samples_per_s": 10.0, "data_wait_fraction": 0.5})

    out = io.StringIO()
    console = Console(file=out, width=100)  # not a terminal: one line per event
    root = logging.StreamHandler(out)  # a root handler (`ray job submit`, basicConfig) must not print a line twice
    logging.getLogger().addHandler(root)
    try:
        with command_console(console, tmp_path / "work") as logs:
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"cpu": 0.5}),
                param_space={"lr": tune.grid_search([0.1, 10.0])},
                run_config=tune.RunConfig(
                    name="console-sweep",
                    storage_path=str(tmp_path / "ray_results"),
                    callbacks=[SweepProgress(total=2, name="sweep-x", max_epochs=2)],
                    verbose=0,
                ),
            )
            tuner.fit()
    finally:
        logging.getLogger().removeHandler(root)
    text = out.getvalue()
    assert not _foreign(text), (_foreign(text), text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    events = [ln for ln in lines if ln.startswith("sweep-x: ")]
    assert len(events) == len(set(events)), text  # never twice
    assert _once(text, r"^sweep-x: trial 00000 started \|"), text
    assert _once(text, r"^sweep-x: trial 00000 epoch 1: valid r 0\.100 \(best 0\.100\), 10\.0 samples/s"), text
    assert _once(text, r"^sweep-x: trial 00000 epoch 2: valid r 0\.200 \(best 0\.200\)"), text
    assert _once(text, r"^sweep-x: trial 00000 finished after 2 epoch\(s\)"), text
    assert _once(text, r"^sweep-x: trial 00001 failed after 0 epoch\(s\)"), text
    assert _once(text, r"^warning: trial 00001 failed \(ValueError: the loss became NaN at epoch 1\): it is not "), text
    assert _once(text, r"^warning: trial 00000 waited for data 50% of an epoch"), text
    assert _once(text, r"^sweep-x: sweep done in .*: 1 trial\(s\) finished, 1 failed or lost; best valid r 0\.2"), text
    assert str(tmp_path / "ray_results" / "console-sweep") in text  # where the failed trial's traceback is
    assert all(line.startswith(("sweep-x: ", "warning: ", "logs: ")) for line in lines), text
    # Tune's own output was written, into the library log
    assert "View detailed results here" in (logs / "libraries.log").read_text()
    assert "sweep-x: trial 00000 epoch 2" in (logs / "mdlda.log").read_text()


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``mdlda ARGS`` in a new process (its output captured: not a terminal), on the session's Ray and this code."""
    import ray

    import mdlda

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(
        RAY_ADDRESS=ray.get_runtime_context().gcs_address,  # joining the session's Ray: no second Ray on the CPUs
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(Path(mdlda.__file__).resolve().parents[1]),
        COLUMNS="200",
    )
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_prepare_prints_its_bar_and_table_once_and_ray_only_into_the_log(ray_local, demo_root, tmp_path):
    work = tmp_path / "work"
    res = _cli(["prepare", "midlevel", "--root", str(demo_root / "midlevel"), "--out", str(work / "shards" / "ml")],
               tmp_path)  # fmt: skip
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    assert not _foreign(text), (_foreign(text), text)
    assert _once(text, rf"^logs: {re.escape(str(work / 'logs'))}/ "), text  # says where the logs are
    assert _once(text, r"^prepare midlevel .* 48/48 files .* files/s"), text  # the bar's last state, with its rate
    assert _once(text, r"midlevel shards -> "), text
    assert res.stderr == "", res.stderr
    library_log = (work / "logs" / "libraries.log").read_text()
    assert re.search(r"Connect(ing|ed) to (existing )?Ray cluster", library_log), library_log  # Ray spoke, there
    assert "Progress bars disabled" in library_log


def test_on_a_terminal_events_update_one_live_table_and_warnings_print_once(tmp_path):
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    log = logging.getLogger("mdlda.sweep")
    rows = [{"trial": "00000", "state": "running", "epoch": 1, "last": 0.25, "best": 0.25}]
    view = {"kind": "sweep", "name": "sweep-t", "rows": rows, "totals": "0/1 done, 1 running"}
    with command_console(console, tmp_path, verbose=True):
        log.info("sweep-t: trial 00000 epoch 1: valid r 0.250", extra={"view": view})
        for _ in range(2):
            log.warning("trial 00000 waited for data 50%s of an epoch", "%")
        log.info("sweep-t: sweep done", extra={"view": {**view, "rows": [{**rows[0], "state": "finished"}],
                                                         "final": True}})  # fmt: skip
        log.info("a record for mdlda.log only")
    text = out.getvalue()
    assert "sweep sweep-t" in text and "finished" in text and "0.250" in text, text  # the table, as it ended
    assert "sweep-t: trial 00000 epoch 1" not in text  # a terminal shows the table, not the lines
    assert text.count("warning: trial 00000 waited for data 50% of an epoch") == 1, text
    assert "a record for mdlda.log only" not in text
    assert "a record for mdlda.log only" in (tmp_path / "logs" / "mdlda.log").read_text()
