"""Shared fixtures: one local Ray per test session, and one tiny generated dataset (real on-disk formats)."""

from __future__ import annotations

import os
import shutil

# Before anything imports ray: no token auth (Ray 2.59+ turns it on for local clusters), no usage stats, quiet logs.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TUNE_RESULT_BUFFER_LENGTH", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

RAY_FIXTURES = {"ray_local", "chain", "midlevel_shards"}  # each starts the session's local Ray


def pytest_collection_modifyitems(config, items):
    """A test on a Ray fixture must be marked slow: `make test-fast` (-m "not slow") starts no Ray."""
    unmarked = [i.nodeid for i in items if RAY_FIXTURES & set(i.fixturenames) and not i.get_closest_marker("slow")]
    if unmarked:
        raise pytest.UsageError(f"tests on a local Ray without @pytest.mark.slow: {', '.join(unmarked)}")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A local 2-CPU Ray shared by every stage test of the session."""
    import ray

    from pipelines.raysetup import init_ray

    tmp = tmp_path_factory.mktemp("ray")
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=str(Path("/tmp") / f"ray_{os.getpid()}"),
            runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}},
        )
    init_ray()
    yield tmp
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, its tables made once per session: a new store runs MLflow's ~50 schema
    migrations (5 s idle, 12 s on a busy 2-CPU box), a copy of this one none. Only the Default experiment in it."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def seed_store(mlflow_db_template):
    """``seed_store(workdir)``: put an empty, migrated MLflow store at ``<workdir>/mlflow.db`` (or at ``path`` when
    it ends in .db), as if MLflow had just made it; returns that path. Stores under test that are *made* (the
    embedded store's creation, `mlflow server`'s) are left to MLflow."""

    def seed(where) -> Path:
        where = Path(where)
        db = where if where.suffix == ".db" else where / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        assert not db.exists(), db
        shutil.copyfile(mlflow_db_template, db)
        return db

    return seed


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The tiny generated demo dataset: <root>/midlevel and <root>/maestro in the real formats."""
    from mdlda.datasets import generate_demo

    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, seed=0, size="tiny")
    return root


@pytest.fixture(scope="session")
def chain(ray_local, demo_root, tmp_path_factory, seed_store):
    """The tiny chain run twice in one workdir (the second run must do no work): (first, second) ChainResults."""
    from tiny_chain import tiny_chain_config

    from pipelines.chain import run_chain

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    workdir = tmp_path_factory.mktemp("chain")
    seed_store(workdir)
    try:
        first = run_chain(tiny_chain_config(), demo_root, workdir)
        second = run_chain(tiny_chain_config(), demo_root, workdir)
        yield first, second
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="session")
def midlevel_shards(ray_local, demo_root, tmp_path_factory):
    """The tiny demo's Mid-level clips through the real prepare stage (chunks of 8 items): a PrepareResult."""
    from pipelines.prepare import PrepareConfig, prepare

    ml = demo_root / "midlevel"
    out = tmp_path_factory.mktemp("shards") / "midlevel"
    piano = str(ml / "piano_ids.csv")
    return prepare(PrepareConfig("midlevel", str(ml), str(out), piano_ids=piano, progress=False, chunk_items=8))
