"""Peak memory of separating a long track with the 81de367c configuration.

`apply_model` (shifts 1, split, overlap 0.25, segment 44 s, random weights) on `--seconds`
of stereo noise, each length in its own process: the peak resident memory above the
memory before separating (input track and model included), against the original Demucs
v3, which peaks at about 2.7 GB above its start for 120 s on this machine type. Each
length is measured as it runs (freed memory given back to the system after each layer
and chunk, `demucs.utils.trim_heap`) and with `--keep-heap` also without that, glibc's
fragmented heap kept. `--floor` measures one forward pass on a full 44 s segment instead,
the floor set by the model's activations.

    python bench/bench_memory.py [--seconds 120 600] [--threads 2] [--keep-heap] [--floor]
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
import typing as tp

import torch

from bench_separation import build  # the 81de367c configuration

ORIGINAL_120S_MB = 2.7 * 1024
HEAPS = {"trimmed": "heap trimmed", "kept": "heap kept"}


def rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2 ** 20


def measure(seconds: float, keep_heap: bool, floor: bool = False) -> dict[str, float]:
    from demucs import apply, lean
    from demucs.apply import apply_model
    if keep_heap:
        apply.trim_heap = lean.trim_heap = lambda: None
    model = build("hdemucs").eval()
    mix = torch.randn(1, 2, int(seconds * 44100))
    random.seed(0)
    with torch.no_grad():  # warm-up on a short input: allocator pools, lazy inits
        apply_model(model, mix[..., :44100], shifts=1, split=True, overlap=0.25)
    start = current_mb()
    begin = time.perf_counter()
    if floor:
        with torch.no_grad():
            out = model(mix)
    else:
        out = apply_model(model, mix, shifts=1, split=True, overlap=0.25)
    elapsed = time.perf_counter() - begin
    output = out.numel() * out.element_size() / 2 ** 20
    return {"peak": rss_mb() - start, "output": output, "seconds": elapsed}


def run_one(seconds: float, threads: int, heap: str, floor: bool) -> dict[str, float]:
    command = [sys.executable, __file__, "--one", str(seconds), "--threads", str(threads),
               "--heap", heap] + (["--floor"] if floor else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: tp.Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[120., 600.])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--floor", action="store_true",
                        help="one forward pass on a 44 s segment instead of --seconds")
    parser.add_argument("--keep-heap", action="store_true",
                        help="also measure without giving freed memory back")
    parser.add_argument("--heap", choices=HEAPS, default="trimmed", help=argparse.SUPPRESS)
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.heap == "kept", args.floor)))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, 81de367c config, segment 44 s")
    heaps = list(HEAPS) if args.keep_heap else ["trimmed"]
    for seconds in [44.] if args.floor else args.seconds:
        for heap in heaps:
            result = run_one(seconds, args.threads, heap, args.floor)
            ratio = (f" (x{result['peak'] / ORIGINAL_120S_MB:.2f} of the original's 2.7 GB)"
                     if seconds == 120 else "")
            what = "one forward" if args.floor else "apply_model"
            print(f"{seconds:5.0f} s, {what}, {HEAPS[heap]}: peak "
                  f"+{result['peak']:6.0f} MB{ratio}, of which output {result['output']:4.0f} "
                  f"MB; {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
