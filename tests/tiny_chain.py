"""The tiny chain config and the session's chain run, shared by the chain, lineage and sweep-operation tests."""

from __future__ import annotations

from mdlda.config import ChainConfig

TINY = {"width": 4}
TRAIN = {"max_epochs": 2, "patience": 2, "lr_milestones": [1], "device": "cpu"}
K = 2


def tiny_chain_config() -> ChainConfig:
    return ChainConfig.model_validate(
        {
            "experiment": "mdlda-test-chain",
            "data": {"eval_fraction": 0.25, "valid_fraction": 0.4},
            "teachers": {
                "name": "teachers",
                "mode": "dann",
                "num_samples": 1,
                "top_k": K,
                "scheduler": "fifo",
                "model_overrides": TINY,
                "train": TRAIN,
                # the third learning rate makes the loss explode: that trial must fail and never be selected
                "search": {
                    "lr": {"grid": [2.0e-3, 3.0e-3, 1.0e30]},
                    "adv_scale": 0.3,
                    "seed": 1,
                    "batch_size": 4,
                },
            },
            "baselines": [
                {
                    "name": "baseline-rfresnet",
                    "mode": "supervised",
                    "num_samples": 1,
                    "top_k": 1,
                    "model_overrides": TINY,
                    "train": {**TRAIN, "max_epochs": 1},
                    "search": {"lr": 2.0e-3, "batch_size": 4},
                }
            ],
            "pseudolabel": {"num_segments": 4, "seed": 0, "batch_size": 4},
            "student": {"model_overrides": TINY, "train": {**TRAIN, "lr": 2.0e-3, "batch_size": 4}},
        }
    )


def own_ray_process(prefix: str, since: float = 0.0):
    """The newest process under this test session whose command line starts with ``prefix`` (e.g. a Ray worker
    "ray::RayTrainWorker") and that started after ``since`` (a ``time.time()``), else None. Only this process's own
    tree: the session's Ray (its raylet is a child of this process), never another Ray on the same machine; with
    ``since``, never a worker an earlier test left exiting."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.create_time() >= since and " ".join(p.cmdline()).startswith(prefix):
                found.append((p.create_time(), p))
        except psutil.Error:
            continue
    return max(found, key=lambda f: f[0])[1] if found else None
