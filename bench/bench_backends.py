"""Separation speed and peak memory of each backend (torch, onnxruntime, openvino).

For each model of bench_separation.py (HDemucs 81de367c config, Demucs 9357e12e config,
HTDemucs 955717e8 config; random weights) and each backend: seconds per second of audio
of `apply_model` (shifts=1, overlap 0.25, as the `demucs` command) and the peak resident
memory during it, each run in a fresh process, the backends alternating, each side's
minimum of `--repeats`; then the ratios to the torch backend. The graphs are exported once
into `--cache` before timing (the `demucs` command does the same into ~/.cache).

    python bench/bench_backends.py [--seconds 20] [--threads 2] [--repeats 3]
        [--segment SECONDS] [--models hdemucs demucs htdemucs]
        [--backends torch onnxruntime openvino]

`--segment` sets the chunk length of the models without a length limit (the v3 ones, 44 s
by default; an HTDemucs keeps its 7.8 s): graphs run on whole chunks, so a track shorter
than a chunk costs a whole chunk with the ONNX backends (docs/onnx.md).
Not measured here: the original v3 (`demucs==3.0.6`) side by side, see bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODELS = ("hdemucs", "demucs", "htdemucs")
BACKENDS = ("torch", "onnxruntime", "openvino")


def peak_reset() -> None:
    """Start a new peak of resident memory (Linux: VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepared(name: str, backend: str, segment: tp.Optional[float]) -> tp.Any:
    """The model `name` with its segment, or its runners (exported into the cache)."""
    from bench_separation import build  # the models as bench_separation.py builds them

    from demucs.backends import runnable
    model: tp.Any = build(name).eval()
    if segment is not None and getattr(model, "max_allowed_segment", None) is None:
        model.segment = segment
    return runnable(model, backend, log=lambda line: print(line, file=sys.stderr))


def measure(name: str, backend: str, seconds: float, segment: tp.Optional[float]
            ) -> tp.Dict[str, float]:
    """One separation of `seconds` of noise: seconds per second, peak memory (MB)."""
    from demucs.apply import apply_model
    model = prepared(name, backend, segment)
    mix = torch.randn(1, 2, int(seconds * 44100))
    random.seed(0)
    peak_reset()
    begin = time.perf_counter()
    apply_model(model, mix, shifts=1, split=True, overlap=0.25)
    elapsed = time.perf_counter() - begin
    return {"s_per_s": elapsed / seconds, "peak_mb": peak_mb()}


def run_child(args: argparse.Namespace, name: str, backend: str) -> tp.Dict[str, float]:
    """`measure` in a fresh process (its own peak memory, no warm caches)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, backend,
               "--seconds", str(args.seconds), "--threads", str(args.threads)]
    if args.segment is not None:
        command += ["--segment", str(args.segment)]
    env = {**os.environ, "DEMUCS_ONNX_CACHE": str(args.cache), "OMP_NUM_THREADS":
           str(args.threads)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} {backend} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(name: str, results: tp.Dict[str, tp.List[tp.Dict[str, float]]]) -> None:
    base = min(r["s_per_s"] for r in results["torch"]) if "torch" in results else None
    base_mb = min(r["peak_mb"] for r in results["torch"]) if "torch" in results else None
    for backend, runs in results.items():
        speed = min(r["s_per_s"] for r in runs)
        memory = min(r["peak_mb"] for r in runs)
        times = ", ".join(f"{run['s_per_s']:.3f}" for run in runs)
        line = f"{name:8s} {backend:11s} {speed:.3f} s/s  peak {memory:.0f} MB  (runs: {times})"
        if base is not None and base_mb is not None and backend != "torch":
            line += f"  time x{speed / base:.2f}, memory x{memory / base_mb:.2f} of torch"
        print(line, flush=True)


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segment", type=float)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--cache", type=Path, default=HERE / "results" / "onnx_cache")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "BACKEND"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        name, backend = args.child
        print(json.dumps(measure(name, backend, args.seconds, args.segment)))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, {args.seconds:g} s of audio, "
          f"minimum of {args.repeats} alternating runs")
    for name in args.models:
        for backend in args.backends:  # the exports, once, untimed
            os.environ["DEMUCS_ONNX_CACHE"] = str(args.cache)
            prepared(name, backend, args.segment)
        results: tp.Dict[str, tp.List[tp.Dict[str, float]]] = {b: [] for b in args.backends}
        for _ in range(args.repeats):
            for backend in args.backends:
                results[backend].append(run_child(args, name, backend))
        report(name, results)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
