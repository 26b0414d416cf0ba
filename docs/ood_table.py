"""How the OOD table of docs/serving.md is measured: a registered model's window distances on its chain's data and
on inputs unlike it.

    python docs/ood_table.py --workdir WORK [--model models:/mdlda-student@champion]

``WORK`` is a chain's workdir (its MLflow store and ``shards/midlevel``). The model is loaded as `mdlda predict`
loads it (:func:`mdlda.served.load_served_with_ood`, its ``ood.json``). The Mid-level shards' splits are scored
segment by segment; the synthetic inputs (white noise at two amplitudes, silence, a 440 Hz sine; 45 s each) are
written as WAV files and go through :func:`mdlda.predict.predict_recording`, the path of `mdlda predict`. Prints
a Markdown table: windows, the share above the threshold, the median and the range of the distance.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

SECONDS = 45.0


def synthetic(seconds: float = SECONDS) -> dict[str, np.ndarray]:
    from mdlda.params import SAMPLE_RATE

    n = int(seconds * SAMPLE_RATE)
    rng = np.random.default_rng(0)
    t = np.arange(n) / SAMPLE_RATE
    return {
        "white noise, amplitude 0.3": 0.3 * rng.uniform(-1, 1, n),
        "white noise, full scale": rng.uniform(-1, 1, n),
        "silence": np.zeros(n),
        "440 Hz sine, amplitude 0.5": 0.5 * np.sin(2 * np.pi * 440 * t),
    }


def shard_scores(model, stats, shards: Path) -> dict[str, np.ndarray]:
    """Distances of every Mid-level segment, by split (read with pyarrow: no Ray)."""
    import pyarrow.parquet as pq
    import torch

    from mdlda.manifest import DATA_DIR
    from mdlda.params import PCM_SCALE
    from mdlda.pcm import numpy_batch

    batch = numpy_batch(pq.read_table(shards / DATA_DIR, columns=["split", "audio"]))
    out = {}
    for split in ("train", "valid", "test", "piano_test"):
        audio = batch["audio"][batch["split"] == split]
        scores = []
        with torch.no_grad():
            for i in range(0, len(audio), 8):
                _, feats = model.rate_and_embed(torch.from_numpy(audio[i : i + 8].astype(np.float32) / PCM_SCALE))
                scores.append(stats.score(feats.numpy()))
        if scores:
            out[f"Mid-level {split} segments"] = np.concatenate(scores)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--model", default="models:/mdlda-student@champion")
    args = p.parse_args()
    import soundfile as sf
    import torch

    from mdlda.params import SAMPLE_RATE
    from mdlda.predict import predict_recording
    from mdlda.served import load_served_with_ood
    from mdlda.tracking import use_tracking

    torch.set_num_threads(1)
    use_tracking(args.workdir)
    model, stats = load_served_with_ood(args.model)
    if stats is None:
        raise SystemExit(f"{args.model} carries no OOD statistics")
    rows = shard_scores(model, stats, args.workdir / "shards" / "midlevel")
    with tempfile.TemporaryDirectory() as tmp:
        for name, x in synthetic().items():
            path = Path(tmp) / "input.wav"
            sf.write(path, x.astype(np.float32), SAMPLE_RATE, subtype="FLOAT")
            rows[name] = predict_recording(model, path, ood=stats).ood_score.to_numpy()
    print(f"{args.model}: threshold {stats.threshold:.2f} ({stats.quantile:.0%} quantile of {stats.n} segments, "
          f"{stats.source})\n")  # fmt: skip
    print("| input | windows | above the threshold | median distance | range |")
    print("|---|---:|---:|---:|---|")
    for name, s in rows.items():
        flagged = stats.flag(s)
        print(
            f"| {name} | {len(s)} | {int(flagged.sum())} ({flagged.mean():.0%}) | {np.median(s):.2f} | "
            f"{s.min():.2f} .. {s.max():.2f} |"
        )


if __name__ == "__main__":
    main()
