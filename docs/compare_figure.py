"""How docs/compare.png is made: a real `mdlda compare` run on generated data, with a small trained model.

    python docs/compare_figure.py [--work /tmp/compare-figure] [--epochs 8] [--width 8]

1. ``generate_demo(size="small")``: the Mid-level-format demo clips (non-piano timbres, ratings from the knobs).
2. A width-``--width`` RF-ResNet trained supervised (source clips only, no adaptation, :func:`mdlda.training.fit`,
   one process, no Ray) for ``--epochs`` epochs and registered as ``mdlda-student@champion`` in a SQLite MLflow
   store in ``--work`` (its weights-only checkpoint, the form `mdlda compare` loads).
3. ``mdlda compare-demo`` performances (60 s) and ``mdlda compare`` on them, as a user runs it; the figure is
   copied to docs/compare.png. It shows what this small model hears, not the adapted student of a full chain.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np


def train(data: Path, width: int, epochs: int):
    import torch

    from mdlda.audio import fit_clip, load
    from mdlda.datasets.midlevel import index_midlevel
    from mdlda.models import create_model
    from mdlda.training import TrainConfig, fit

    table = index_midlevel(data / "midlevel", data / "midlevel" / "piano_ids.csv").table
    clips = {row.clip_id: fit_clip(load(row.path))[0] for row in table.itertuples(index=False)}

    def batches(split: str, epoch: int | None = None):
        rows = table[table.split == split]
        order = np.random.default_rng(epoch).permutation(len(rows)) if epoch is not None else np.arange(len(rows))
        for i in range(0, len(rows), 8):
            part = rows.iloc[order[i : i + 8]]
            yield {
                "audio": torch.from_numpy(np.stack([clips[c] for c in part.clip_id])),
                "labels": torch.tensor(np.stack(part.labels.to_list()), dtype=torch.float32),
            }

    torch.manual_seed(0)
    model = create_model("rfresnet", width=width)
    cfg = TrainConfig(device="cpu", max_epochs=epochs, lr=2e-3, lr_milestones=(epochs - 2,), patience=epochs)
    result = fit(model, lambda e: batches("train", e), lambda: batches("valid"), cfg)
    print(f"trained {result.epochs_run} epochs, best validation r_mean {result.best_score:.3f}", end=" ")
    print(f"(epoch {result.best_epoch})")
    return model.eval()


def register(model, work: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from mdlda.checkpoints import save_model
    from mdlda.tracking import CHAMPION, STUDENT_MODEL, setup_tracking

    setup_tracking(work, "compare-figure")
    ckpt = save_model(model, work / "ckpt")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(ckpt), artifact_path="model-checkpoint")
    client = MlflowClient()
    client.create_registered_model(STUDENT_MODEL)
    v = client.create_model_version(STUDENT_MODEL, f"{run.info.artifact_uri}/model-checkpoint", run.info.run_id)
    client.set_registered_model_alias(STUDENT_MODEL, CHAMPION, v.version)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/compare-figure"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=int, default=8)
    args = p.parse_args()
    import torch

    from mdlda.datasets import generate_demo

    torch.set_num_threads(1)
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    generate_demo(work / "data", seed=0, size="small")
    register(train(work / "data", args.width, args.epochs), work / "store")
    mdlda = [sys.executable, "-m", "pipelines.cli"]
    subprocess.run([*mdlda, "compare-demo", "--out", str(work / "perf")], check=True)
    perf = work / "perf"
    files = [str(perf / f"{n}.wav") for n in ("A_reference", "B_faster_detached", "C_slower")]
    out = work / "compare"
    cmd = [*mdlda, "compare", *files, "--bars", str(perf / "A_reference.bars.txt"), "--workdir", str(work / "store")]
    subprocess.run([*cmd, "--out", str(out)], check=True)
    shutil.copy(out / "compare.png", Path(__file__).resolve().parent / "compare.png")
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
