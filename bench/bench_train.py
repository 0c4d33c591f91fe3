"""Training step throughput and peak memory, float32 against mixed precision.

For the full-size HDemucs (81de367c config) and Demucs (9357e12e config) with random
weights, one Adam step on a batch of `--batch` examples of `--seconds` s (default 4 x 7.8
s): examples per second (best of `--steps` steps after a warm-up) and peak memory above
the start of the measurement, in float32 and bf16 autocast (the solver's `optim.amp`,
the STFT and masks staying float32) on the CPU, and on CUDA when present (bf16 and fp16).
Each measurement runs in its own process, so that peaks do not mix.

    python bench/bench_train.py [--batch 4] [--seconds 7.8] [--steps 2] [--threads 2]
        [--models hdemucs demucs] [--devices cpu cuda] [--amps float32 bf16 fp16]
        [--cuda-graph] [--profile 10]

`--profile N` profiles one more step (torch.profiler) and prints, under each line, how
many kernels it ran (operators on the CPU), the share of their time spent in copies
(dtype casts first), and the N costliest: where a step bound by kernel launches
spends them.

Run from outside the repository with another `demucs` on the path (bench/README.md), the
same figures come from that implementation.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import typing as tp
from contextlib import nullcontext
from pathlib import Path

import torch

import demucs

from bench_separation import adam, build, freed_memory_kept

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_line() -> str:
    """What decides the CPU's bf16 figures: its vector instructions as PyTorch sees them,
    whether it has bf16 dot products, and a limit set on oneDNN's instructions."""
    try:
        from demucs.utils import cpu_has_bf16
        bf16 = {True: "yes", False: "no", None: "unknown"}[cpu_has_bf16()]
    except ImportError:  # another demucs
        bf16 = "unknown"
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"CPU {torch.backends.cpu.get_cpu_capability()}, bf16 instructions: {bf16}"
            + (f", ONEDNN_MAX_CPU_ISA={limit}" if limit else ""))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_copy(name: str) -> bool:
    """Whether a profiled operator (CPU) or kernel (CUDA) copies a tensor, converting
    its dtype or not (CUDA runs both as one copy kernel)."""
    return name in ("aten::_to_copy", "aten::copy_") or "copy_kernel" in name


def profile_summary(step: tp.Callable[[], None], device: str, top: int) -> list[str]:
    """One profiled `step`: the number of kernels (CUDA) or operators (CPU), the share
    of their time in copies and casts, and the `top` costliest."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
    if cuda:
        rows = [(event.self_device_time_total, event.count, event.key)
                for event in prof.key_averages() if event.device_type == DeviceType.CUDA]
    else:
        rows = [(event.self_cpu_time_total, event.count, event.key)
                for event in prof.key_averages() if event.self_cpu_time_total > 0
                and not event.key.startswith(("Optimizer.", "autograd::", "ProfilerStep"))]
    total = sum(spent for spent, _, _ in rows) or 1.
    copies = sum(spent for spent, _, key in rows if is_copy(key))
    copy_count = sum(count for _, count, key in rows if is_copy(key))
    what = "kernels" if cuda else "operators"
    lines = [f"  {sum(count for _, count, _ in rows)} {what}, {total / 1e3:.1f} ms; copies "
             f"and casts {copy_count} ({copies / total:.0%} of the time)"]
    for spent, count, key in sorted(rows, reverse=True)[:top]:
        lines.append(f"  {spent / 1e3:8.2f} ms {count:5d}  {key[:90]}")
    return lines


def measure(name: str, amp: str, device: str, batch: int, seconds: float,
            steps: int, graph: bool = False, top: int = 0) -> dict[str, tp.Any]:
    """Seconds per step (best), examples/s and peak memory (MB) above the start; with
    `graph`, the forward and backward replayed as CUDA graphs (`optim.cuda_graph`); with
    `top`, the `profile_summary` of one more step."""
    model = build(name).to(device).train()
    optim = adam(model)
    scaler = torch.amp.GradScaler(device, enabled=amp == "fp16")
    sources = torch.randn(batch, 4, 2, int(seconds * 44100), device=device)
    cast = (torch.autocast(device, dtype=DTYPES[amp], cache_enabled=not graph)
            if amp != "float32" else nullcontext())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated() / 2 ** 20 if device == "cuda" else peak_rss_mb()
    forward: tp.Callable[[torch.Tensor], torch.Tensor] = model
    if graph:  # after `start`: the graphs' memory pool counts in the peak
        from demucs.cuda_graph import GraphedStep  # ours only
        with cast:
            forward = GraphedStep(model, sources.sum(dim=1))

    def train_step() -> None:
        with cast:
            estimate = forward(sources.sum(dim=1)).float()
            loss = torch.nn.functional.l1_loss(estimate, sources)
        optim.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optim)
        scaler.update()
        if device == "cuda":
            torch.cuda.synchronize()

    durations = []
    with freed_memory_kept():
        for _ in range(steps + 1):  # the first step warms up
            begin = time.perf_counter()
            train_step()
            durations.append(time.perf_counter() - begin)
        peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda"
                else peak_rss_mb())
        profile = profile_summary(train_step, device, top) if top else []
    step = min(durations[1:])
    return {"step": step, "examples": batch / step, "memory": peak - start,
            "profile": profile}


def run_one(args: argparse.Namespace, name: str, amp: str,
            device: str) -> tp.Optional[dict[str, tp.Any]]:
    """`measure` in a fresh process (clean peak memory); None (and the error printed) if
    that process failed."""
    command = [sys.executable, __file__, "--one", name, amp, device,
               "--batch", str(args.batch), "--seconds", str(args.seconds),
               "--steps", str(args.steps), "--threads", str(args.threads)]
    command += ["--cuda-graph"] if args.cuda_graph and device == "cuda" else []
    command += ["--profile", str(args.profile)] if args.profile else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr.strip() or "no output").splitlines()
        print(f"{name:8s} {device:4s} {amp:7s} failed: {lines[-1]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: tp.Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=7.8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["hdemucs", "demucs"])
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"],
                        default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--amps", nargs="+", choices=["float32", "bf16", "fp16"],
                        default=["float32", "bf16", "fp16"],
                        help="fp16 runs on CUDA only; the first one is the reference")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="on CUDA, replay the forward and backward as CUDA graphs")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one more step; list its N costliest kernels")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "AMP", "DEVICE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        name, amp, device = args.one
        print(json.dumps(measure(name, amp, device, args.batch, args.seconds, args.steps,
                                 args.cuda_graph, args.profile)))
        return
    runs = [(device, amp) for device in args.devices for amp in args.amps
            if not (device == "cpu" and amp == "fp16")]
    where = Path(str(demucs.__file__)).parent
    gpu = f", {torch.cuda.get_device_name()}" if "cuda" in args.devices else ""
    print(f"demucs from {where}, torch {torch.__version__}, {args.threads} threads{gpu}, "
          f"batch {args.batch} x {args.seconds} s")
    if "cpu" in args.devices:
        print(cpu_line())
    for name in args.models:
        base: dict[str, dict[str, tp.Any]] = {}
        for device, amp in runs:
            result = run_one(args, name, amp, device)
            if result is None:
                continue
            base.setdefault(device, result)
            speed = result["examples"] / base[device]["examples"]
            memory = result["memory"] / max(base[device]["memory"], 1.)
            print(f"{name:8s} {device:4s} {amp:7s} step {result['step']:6.2f} s | "
                  f"{result['examples']:6.2f} examples/s (x{speed:.2f}) | "
                  f"peak +{result['memory']:7.0f} MB (x{memory:.2f})")
            for line in result.get("profile", []):
                print(line)


if __name__ == "__main__":
    main()
