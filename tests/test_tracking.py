"""MLflow helpers on a real SQLite store: fail-fast checks, experiment layout, the champion rule."""

from __future__ import annotations

import os
import time

import pytest


@pytest.fixture()
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    import mlflow

    mlflow.set_tracking_uri(None)


def test_the_store_is_the_environments_else_the_workdirs(clean_env, monkeypatch, tmp_path):
    import mlflow

    from mdlda.tracking import tracking_override, tracking_uri, use_tracking

    embedded = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_override() is None and tracking_uri(tmp_path) == embedded
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # set but empty: as if unset
    assert tracking_override() is None and tracking_uri(tmp_path) == embedded
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.7:5000")
    assert tracking_uri(tmp_path) == "http://10.0.0.7:5000"
    assert use_tracking(tmp_path) == mlflow.get_tracking_uri() == "http://10.0.0.7:5000"
    other = f"sqlite:///{tmp_path.resolve()}/other.db"  # an explicit URI (compare's --tracking-uri) wins
    assert use_tracking(tmp_path, other) == mlflow.get_tracking_uri() == other


def test_unreachable_server_fails_fast_with_the_fix(clean_env, monkeypatch, tmp_path):
    from mdlda.tracking import TrackingError, setup_tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(TrackingError, match="127.0.0.1:9.*tracking server"):
        setup_tracking(tmp_path, "x")
    assert time.monotonic() - start < 30


def test_embedded_store_and_artifact_location(clean_env, tmp_path):
    from mlflow.tracking import MlflowClient

    from mdlda.tracking import setup_tracking, tracking_uri

    exp_id = setup_tracking(tmp_path, "exp")
    uri = tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db" and (tmp_path / "mlflow.db").exists()
    exp = MlflowClient(uri).get_experiment(exp_id)
    assert exp.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert setup_tracking(tmp_path, "exp") == exp_id  # found again, not recreated
    assert os.environ["MLFLOW_TRACKING_URI"] == uri


def test_champion_moves_only_to_a_better_student(clean_env, tmp_path, seed_store):
    from mlflow.tracking import MlflowClient

    from mdlda.tracking import CHAMPION, move_champion_if_better, setup_tracking

    seed_store(tmp_path)
    exp_id = setup_tracking(tmp_path, "exp")
    client = MlflowClient()
    client.create_registered_model("m")
    run = client.create_run(exp_id)
    versions = [client.create_model_version("m", str(tmp_path), run.info.run_id).version for _ in range(3)]
    assert move_champion_if_better("m", versions[0], 0.5)
    assert not move_champion_if_better("m", versions[1], 0.3)
    assert client.get_model_version_by_alias("m", CHAMPION).version == versions[0]
    assert not move_champion_if_better("m", versions[1], 0.5)  # a tie does not move it
    assert move_champion_if_better("m", versions[2], 0.6)
    assert client.get_model_version_by_alias("m", CHAMPION).version == versions[2]


def _half_a_second(conn, cursor, statement, parameters, context, executemany):
    busy = "PRAGMA busy_timeout = "
    return (f"{busy}500;" if statement.startswith(busy) else statement), parameters


def test_a_locked_sqlite_store_names_the_server_command(tmp_path, monkeypatch, seed_store):
    """Another writer holds the embedded store: the error says so and shows how to start the tracking server."""
    import sqlite3

    from mlflow.tracking import MlflowClient
    from sqlalchemy import event

    from mdlda.tracking import TrackingError, setup_tracking, sqlite_guard

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    seed_store(tmp_path)
    exp = setup_tracking(tmp_path, "locked")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # MLflow gives every SQLite session a 20 s busy timeout; the error is the same after half a second
    event.listen(client._tracking_client.store.engine, "before_cursor_execute", _half_a_second, retval=True)
    other = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(TrackingError) as info, sqlite_guard(tmp_path):
            client.create_run(exp)
    finally:
        other.execute("ROLLBACK")
        other.close()
    message = str(info.value)
    assert "is locked by another writer" in message
    assert f"mlflow server --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in message
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in message
    with pytest.raises(ValueError, match="unrelated"), sqlite_guard(tmp_path):  # other errors pass through
        raise ValueError("unrelated")
