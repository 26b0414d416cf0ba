"""Training throughput of one DANN step on this machine: samples/s, FLOPs, GFLOP/s and peak RSS.

    python bench/train_step.py [--model rfresnet] [--width 128] [--steps 3] [--batch 8]
                               [--channels-last] [--bf16] [--compile]

The step is the training loop's own DANN step (``mdlda.steps.run_step`` on a ``DomainPair``: per-domain passes,
docs/method.md): ``--batch`` source and ``--batch`` target 15-s clips (random audio, so the front end is included)
go through ``forward_features`` in two separate calls, the regression head runs on source features only (MSE), the
domain head on both through gradient reversal; Adam on model + domain head. The GPU settings of ``TrainConfig``
can be switched on to see what they cost on this CPU: ``--channels-last`` (NHWC), ``--bf16`` (autocast of the
network, front end fp32; on a CPU only fast with AMX / AVX512-BF16), ``--compile`` (``torch.compile`` of each block;
the counted first step then includes the compilation).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one whole step (forward + backward; it
counts convolutions and matmuls, including the front end's filterbank matmul, but not the STFT, element-wise
ops or the optimizer). The counted step doubles as warm-up; the timed steps follow.

"CPU use" is process CPU time over wall time in the timed steps: well below the thread count means other
processes shared the cores, so samples/s is pessimistic; "samples/s if uncontended" scales it by the missing
CPU share. Under heavy oversubscription that estimate is unreliable too (spinning OpenMP threads burn CPU time
without progress): trust a run whose CPU use is close to the thread count. Peak RSS is the process high-water
mark (``ru_maxrss``), so it includes Python and torch.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from mdlda.adapt import DomainHead, dann_lambda
from mdlda.devices import compile_network
from mdlda.domain_pair import DomainPair
from mdlda.models import create_model
from mdlda.params import NUM_FEATURES, SEGMENT_SAMPLES
from mdlda.precision import Precision, optimizer_step
from mdlda.steps import run_step


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rfresnet", help="registered model name")
    p.add_argument("--width", type=int, default=128, help="model width (base channels)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps after the counted warm-up step")
    p.add_argument("--batch", type=int, default=8, help="clips per domain per step (source and target each)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--channels-last", action="store_true", help="TrainConfig.channels_last: NHWC weights and maps")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the network (mixed_precision[_cpu])")
    p.add_argument("--compile", action="store_true", help="TrainConfig.compile: torch.compile each block")
    return p.parse_args()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rss_start = psutil.Process().memory_info().rss / 2**20

    model = create_model(args.model, width=args.width).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        compile_network(model)
    head = DomainHead(in_dim=model.embed_dim)
    pair = DomainPair(model, head, bn_stats="both")
    precision = Precision(args.bf16, torch.device("cpu"), on_cpu=True)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3)
    b = args.batch
    batch = {
        "audio": 0.1 * torch.randn(b, SEGMENT_SAMPLES),  # (B, 330750)
        "target_audio": 0.1 * torch.randn(b, SEGMENT_SAMPLES),  # (B, 330750)
        "labels": torch.rand(b, NUM_FEATURES),  # (B, 7) on the 0..1 label scale
    }
    adv_lambda = dann_lambda(5, scale=0.3)

    def step() -> float:
        with precision.autocast():
            out = run_step("dann", pair, batch, adv_lambda)  # BN normalises over source, then over target
        optimizer_step(out.loss, opt, precision)
        return out.losses["loss"]

    with FlopCounterMode(display=False) as counter:
        step()
    step_flops = counter.get_total_flops()
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fwd_counter:
        model(batch["audio"][:1])
    fwd_flops = fwd_counter.get_total_flops()
    model.train()

    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    t_step = statistics.median(times)
    # CPU seconds per wall second; below the thread count means other processes took the cores
    busy = sum(cpu_times) / sum(times)
    samples = 2 * b

    rows = [
        ("model", f"{args.model} width {args.width}"),
        ("settings", f"channels_last={args.channels_last}, bf16={args.bf16}, compile={args.compile}"),
        ("parameters", f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f} M"),
        ("torch threads", str(torch.get_num_threads())),
        ("batch", f"{b} source + {b} target"),
        (
            "step time (median)",
            f"{t_step:.2f} s over {len(times)} steps ({', '.join(f'{t:.2f}' for t in times)})",
        ),
        ("training samples/s", f"{samples / t_step:.2f}"),
        ("forward GFLOP/sample", f"{fwd_flops / 1e9:.2f}"),
        ("fwd+bwd GFLOP/sample", f"{step_flops / samples / 1e9:.2f}"),
        ("achieved GFLOP/s", f"{step_flops / t_step / 1e9:.1f}"),
        ("CPU use (cores busy)", f"{busy:.2f} of {torch.get_num_threads()} threads"),
        ("GFLOP per CPU-second", f"{step_flops * len(times) / sum(cpu_times) / 1e9:.1f}"),
        ("samples/s if uncontended", f"{samples / t_step * torch.get_num_threads() / busy:.2f} (estimate)"),
        ("RSS after import", f"{rss_start:.0f} MB"),
        ("peak RSS", f"{peak_rss_mb():.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
