"""Peak memory of separating a long track with the 81de367c configuration.

Each length of `--seconds` is measured in its own process: the peak resident memory above
the memory before separating (model loaded and warmed up). Two ways to separate:

- `--mode command` (the default): the `demucs` command's work on one track, a 16-bit wav
  file of stereo noise written beforehand (its large buffers mapped on their own, in huge
  pages, `utils.map_large_buffers`; read by blocks, separated with shifts 1,
  split, overlap 0.25, segment 44 s, random weights, four 16-bit wav stems written as the
  chunks complete, rescaled by a second pass). Its memory does not grow with the track:
  the last line compares each length's peak with the shortest's.
- `--mode apply`: `apply_model` on a stereo noise tensor, returning the track-long output
  `(1, 4, 2, T)` (as the Python API does); the input and the output are in memory.

Each is measured as it runs (freed memory given back to the system after each layer and
chunk, `demucs.utils.trim_heap`) and with `--keep-heap` also without that, glibc's
fragmented heap kept. `--floor` measures one forward pass on a full 44 s segment instead,
the floor set by the model's activations. `--per-chunk` (command mode) also prints the peak
of each chunk above the start (Linux: the high-water mark is reset after each chunk), the
first one including the pass of the normalisation statistics.

The original Demucs v3 is not measured here: the figure printed next to 120 s (2.7 GB
above its start) comes from the project's first benchmark (committed on 2026-11-25 with
bench_separation.py's figures, on a 2-thread CPU machine of that time), another run on
another machine.

    python bench/bench_memory.py [--seconds 60 120 600] [--mode command|apply]
        [--threads 2] [--keep-heap] [--floor] [--per-chunk]
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch

from bench_separation import build  # the 81de367c configuration
from demucs.utils import map_large_buffers

ORIGINAL_120S_MB = 2.7 * 1024  # the original v3, elsewhere (see the docstring)
HEAPS = {"trimmed": "heap trimmed", "kept": "heap kept"}
MODES = {"command": "demucs command, streamed", "apply": "apply_model, track-long output"}


def rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2 ** 20


def keep_heap() -> None:
    """Freed memory stays in glibc's heap (no `trim_heap`)."""
    from demucs import apply, lean
    apply.trim_heap = lean.trim_heap = lambda: None  # type: ignore[attr-defined]


def measure(seconds: float, floor: bool = False) -> dict[str, float]:
    from demucs.apply import apply_model
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


def write_noise(path: Path, seconds: float) -> None:
    """A 16-bit stereo wav of uniform noise, written by blocks of 10 s."""
    import soundfile
    rng = np.random.default_rng(0)
    frames = int(seconds * 44100)
    with soundfile.SoundFile(str(path), "w", 44100, 2, "PCM_16") as f:
        for start in range(0, frames, 441000):
            f.write(rng.uniform(-0.5, 0.5, (min(441000, frames - start), 2)).astype(np.float32))


def vm_hwm_mb() -> float:
    """The process's resident high-water mark since it started or was last reset, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def record_chunk_peaks(start: float) -> list[float]:
    """From now, the peak above `start` (MB) of each chunk of a split, appended to the list
    returned: read after the chunk is yielded and written, then the high-water mark (and
    `ru_maxrss` with it) is reset to the current size (`/proc/self/clear_refs`)."""
    from demucs import apply
    peaks: list[float] = []
    trim = apply.trim_heap

    def after_chunk() -> None:
        peaks.append(vm_hwm_mb() - start)
        trim()
        Path("/proc/self/clear_refs").write_text("5")
    apply.trim_heap = after_chunk
    return peaks


def measure_command(seconds: float, root: Path, per_chunk: bool = False
                    ) -> dict[str, tp.Any]:
    """The `demucs` command's separation of `root/long.wav` with the package
    `root/81de367c.th`, after a warm-up on `root/short.wav`."""
    from demucs import separate
    map_large_buffers()  # as the command does first (before the package is loaded)
    args = separate.get_parser().parse_args(["-n", str(root / "81de367c.th"), "-o",
                                             str(root / "out"), str(root / "long.wav")])
    run = separate.Run.from_args(args)
    separator = separate.load_separator(run)
    separator.update_parameter(progress=False)
    random.seed(0)
    separate.separate_track(separator, root / "short.wav", run)
    start = current_mb()
    chunks = record_chunk_peaks(start) if per_chunk else []
    begin = time.perf_counter()
    separate.separate_track(separator, root / "long.wav", run)
    elapsed = time.perf_counter() - begin
    return {"peak": max([rss_mb() - start] + chunks), "output": 0., "seconds": elapsed,
            "chunks": chunks}


def run_one(seconds: float, threads: int, heap: str, floor: bool, mode: str,
            per_chunk: bool = False) -> dict[str, tp.Any]:
    command = [sys.executable, __file__, "--one", str(seconds), "--threads", str(threads),
               "--heap", heap, "--mode", mode] + (["--floor"] if floor else []) + (
               ["--per-chunk"] if per_chunk else [])
    if mode != "command" or floor:
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    from demucs.states import serialize_model
    root = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    try:  # the files are made here, so that the measured process holds none of them
        torch.save(serialize_model(build("hdemucs"), {"model": "hdemucs"}),
                   root / "81de367c.th")
        write_noise(root / "short.wav", 1.)
        write_noise(root / "long.wav", seconds)
        out = subprocess.run(command + ["--root", str(root)], check=True,
                             capture_output=True, text=True).stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return json.loads(out.strip().splitlines()[-1])


def main(argv: tp.Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[60., 120., 600.])
    parser.add_argument("--mode", choices=MODES, default="command")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--floor", action="store_true",
                        help="one forward pass on a 44 s segment instead of --seconds")
    parser.add_argument("--keep-heap", action="store_true",
                        help="also measure without giving freed memory back")
    parser.add_argument("--per-chunk", action="store_true",
                        help="command mode: also print the peak of each chunk")
    parser.add_argument("--heap", choices=HEAPS, default="trimmed", help=argparse.SUPPRESS)
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one is not None:
        if args.heap == "kept":
            keep_heap()
        result: dict[str, tp.Any] = (measure_command(args.one, args.root, args.per_chunk)
                  if args.root is not None
                  else measure(args.one, args.floor))
        print(json.dumps(result))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, 81de367c config, segment 44 s")
    heaps = list(HEAPS) if args.keep_heap else ["trimmed"]
    what = "one forward" if args.floor else MODES[args.mode]
    peaks: dict[str, list[tuple[float, float]]] = {heap: [] for heap in heaps}
    for seconds in [44.] if args.floor else args.seconds:
        for heap in heaps:
            result = run_one(seconds, args.threads, heap, args.floor, args.mode,
                             args.per_chunk)
            peaks[heap].append((seconds, result["peak"]))
            ratio = (f" (x{result['peak'] / ORIGINAL_120S_MB:.2f} of the original v3's 2.7 GB "
                     "measured elsewhere)" if seconds == 120 else "")
            output = (f", of which output {result['output']:4.0f} MB"
                      if args.mode == "apply" else "")
            print(f"{seconds:5.0f} s, {what}, {HEAPS[heap]}: peak +{result['peak']:6.0f} MB"
                  f"{ratio}{output}; {result['seconds']:.0f} s", flush=True)
            if result.get("chunks"):
                print("    chunk peaks, MB: " + " ".join(
                    f"{peak:.0f}" for peak in result["chunks"]), flush=True)
    for heap, measured in peaks.items():
        if len(measured) > 1:
            (shortest, base), others = min(measured), sorted(measured)[1:]
            print(f"{HEAPS[heap]}: peak against {shortest:.0f} s: " + ", ".join(
                f"{seconds:.0f} s x{peak / base:.3f}" for seconds, peak in others))


if __name__ == "__main__":
    main()
