"""Peak memory of `mdlda predict` on a long vs a short recording: streaming (what predict does) vs decoding the whole
file and stacking every window (what it did before).

    python bench/predict_memory.py [--long-min 20] [--short-min 2] [--hop 15] [--width 4] [--sr 44100]

Two generated mono WAVs (noise + tones at ``--sr``, written block by block) are predicted in a fresh process each,
once with :func:`mdlda.predict.predict_recording` (streaming) and once the old way (``mdlda.audio.load`` of the whole
file, ``mdlda.predict.windows`` stacking every window, batches of 8 through the model). The model is a real RF-ResNet
of ``--width`` with random weights (memory does not depend on the weights). Peak RSS is the child's high-water mark
(``ru_maxrss``), so it includes Python, numpy and torch; the target is RSS(long) / RSS(short) <= 1.5x for streaming.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_wav(path: Path, minutes: float, sr: int, seed: int = 0) -> None:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    n, block = int(minutes * 60 * sr), sr * 10
    with sf.SoundFile(str(path), "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        for i in range(0, n, block):
            t = np.arange(i, min(i + block, n)) / sr
            f.write((0.2 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32))


def child(mode: str, path: str, hop: float, width: int) -> None:
    import torch

    from mdlda.models import create_model
    from mdlda.tracking import RatingModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = RatingModel(create_model("rfresnet", width=width)).eval()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "stream":
        from mdlda.predict import predict_recording

        n = len(predict_recording(model, path, hop_s=hop, batch_size=8))
    else:
        from mdlda.audio import load
        from mdlda.predict import windows

        _, w = windows(load(path), hop, 5.0, path)
        with torch.no_grad():
            preds = [model(torch.from_numpy(w[i : i + 8])).numpy() for i in range(0, len(w), 8)]
        n = len(np.concatenate(preds))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"windows": n, "peak_mb": peak / 1024, "base_mb": base / 1024, "s": time.perf_counter() - start}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long-min", type=float, default=20.0)
    p.add_argument("--short-min", type=float, default=2.0)
    p.add_argument("--hop", type=float, default=15.0, help="seconds between window starts")
    p.add_argument("--width", type=int, default=4, help="RF-ResNet width")
    p.add_argument("--sr", type=int, default=44_100, help="sample rate of the generated files (resampled to 22.05k)")
    p.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.hop, args.width)
        return
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    results = {}
    with tempfile.TemporaryDirectory() as d:
        files = {}
        for name, minutes in (("short", args.short_min), ("long", args.long_min)):
            files[name] = Path(d) / f"{name}.wav"
            write_wav(files[name], minutes, args.sr)
        for mode in ("stream", "whole"):
            for name, path in files.items():
                cmd = [sys.executable, __file__, "--hop", str(args.hop), "--width", str(args.width)]
                out = subprocess.run([*cmd, "--child", mode, str(path)], capture_output=True, text=True, check=True)
                results[(mode, name)] = json.loads(out.stdout.strip().splitlines()[-1])
    minutes = {"short": args.short_min, "long": args.long_min}
    print("\n| mode | file | windows | peak RSS MB | RSS before predicting MB | wall s |")
    print("|---|---|---:|---:|---:|---:|")
    for (mode, name), r in results.items():
        print(
            f"| {mode} | {minutes[name]:g} min | {r['windows']} | {r['peak_mb']:.0f} | {r['base_mb']:.0f} | "
            f"{r['s']:.1f} |"
        )
    for mode in ("stream", "whole"):
        ratio = results[(mode, "long")]["peak_mb"] / results[(mode, "short")]["peak_mb"]
        print(f"{mode}: peak RSS long / short = {ratio:.2f}x" + (" (target <= 1.5x)" if mode == "stream" else ""))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
