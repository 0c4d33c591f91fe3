"""The `demucs` command with each backend, side by side with the original Demucs.

For each model (HDemucs 81de367c config, Demucs 9357e12e config, HTDemucs 955717e8
config, as bench_separation.py builds them; random weights, saved as packages in a
`--repo` folder) the `demucs` command separates the same `--seconds` of stereo 44.1 kHz
audio (16-bit wav; default options: shifts 1, overlap 0.25, float32 stems) once per
side and repeat, the sides alternating, each in a fresh process with `--threads` threads:

- `original`: the original's own command, `demucs==3.0.6` for the v3 models and
  `demucs==4.1.0` for HTDemucs, each from a venv of its own outside the repository
  (`--setup` makes them: torch 2.13.0, the package without its dependencies, those it
  imports, and bench/baselines/torchaudio, a soundfile stand-in for torchaudio's file
  functions, which have no release for torch 2.13);
- `torch`, `onnxruntime`, `openvino`: this repository's command with `--backend`;
  with `--bf16`, also `torch bf16` and `openvino bf16` (`--precision bf16`).

Printed per side: wall seconds per second of audio (the whole command: start, model
loading, reading, separation, writing) and peak resident memory, the minimum of the
repeats, their ratios to the original, and the largest difference of its stems from the
torch backend's, over the torch stems' largest value (for bf16: the stems' SNR against
the torch backend's float32 ones). Every process seeds Python's
`random` with 0 first, so all sides draw the same random shifts. The graphs are exported
into `--cache` by an untimed first run of each side (which also warms the file cache).

    python bench/bench_backends.py --setup [--original /tmp/demucs-v3 --upstream /tmp/demucs-v4]
    python bench/bench_backends.py [--seconds 60] [--threads 2] [--repeats 3]
        [--models hdemucs demucs htdemucs] [--backends torch onnxruntime openvino]
        [--bf16] [--original /tmp/demucs-v3] [--upstream /tmp/demucs-v4] [--no-original]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

HERE = Path(__file__).resolve().parent
MODELS = ("hdemucs", "demucs", "htdemucs")
BACKENDS = ("torch", "onnxruntime", "openvino")
SIGNATURES = {"hdemucs": "81de367c", "demucs": "9357e12e", "htdemucs": "955717e8"}
ORIGINAL = {"hdemucs": "demucs==3.0.6", "demucs": "demucs==3.0.6", "htdemucs": "demucs==4.1.0"}
# What the original packages import, installed next to them without their own
# requirements (torchaudio has no release for torch 2.13; see the module doc).
BASELINE_DEPENDENCIES = ["dora-search", "diffq", "julius", "lameenc", "pyyaml", "tqdm",
                         "numpy", "soundfile", "einops", "sphn", "safetensors"]
# The command, with Python's `random` seeded first (argv: the command's arguments).
LAUNCHER = ("import random, sys; random.seed(0); sys.argv = ['demucs'] + sys.argv[1:]; "
            "from demucs.separate import main; main()")


@dataclass
class Run:
    seconds: float  # wall clock of the whole command
    peak_mb: float  # its peak resident memory


def setup(venv: Path, package: str) -> None:
    """Make the venv `venv` with `package` (the original Demucs) and what it imports."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["--no-deps", package, "openunmix"], check=True)
    subprocess.run(pip + BASELINE_DEPENDENCIES, check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    target = Path(site.stdout.strip()) / "torchaudio"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(HERE / "baselines" / "torchaudio", target)
    print(f"{venv}: {package} with torch 2.13.0 ready.")


def write_track(path: Path, seconds: float) -> None:
    """`seconds` of 16-bit stereo noise with a slow loudness swell (not a constant level)."""
    rng = np.random.default_rng(0)
    frames = int(seconds * 44100)
    envelope = 0.25 + 0.2 * np.sin(np.linspace(0, 12 * np.pi, frames))[:, None]
    audio = rng.uniform(-1, 1, (frames, 2)) * envelope
    soundfile.write(str(path), audio.astype(np.float32), 44100, subtype="PCM_16")


def write_package(name: str, repo: Path) -> None:
    """The model `name` with random weights as `SIGNATURE-CHECKSUM.th` in `repo`."""
    from bench_separation import build  # the models as bench_separation.py builds them

    from demucs.states import save_with_checksum, serialize_model
    package = serialize_model(build(name), {}, half=False)
    save_with_checksum(package, repo / f"{SIGNATURES[name]}.th")


def command(python: Path, name: str, repo: Path, out: Path, track: Path,
            options: tp.Sequence[str] = ()) -> tp.List[str]:
    return [str(python), "-c", LAUNCHER, "--repo", str(repo), "-n", SIGNATURES[name],
            "-o", str(out), "--float32", "-d", "cpu", str(track), *options]


def our_sides(args: argparse.Namespace) -> tp.Dict[str, tp.List[str]]:
    """This repository's sides: their names and their command options."""
    sides = {backend: ["--backend", backend] for backend in args.backends}
    if args.bf16:
        sides.update({f"{backend} bf16": ["--backend", backend, "--precision", "bf16"]
                      for backend in args.backends if backend != "onnxruntime"})
    return sides


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    return float(10 * np.log10((reference ** 2).sum() / ((other - reference) ** 2).sum()))


def run(argv: tp.List[str], env: tp.Dict[str, str], cwd: Path) -> Run:
    """Run `argv` in `cwd`; its wall time and peak resident memory (`wait4`'s maxrss)."""
    log = cwd / "stderr.txt"
    with open(log, "wb") as stderr:
        begin = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - begin
    code = proc.returncode = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}):\n{log.read_text()[-3000:]}")
    return Run(seconds=elapsed, peak_mb=usage.ru_maxrss / 1024)


def stems(folder: Path) -> np.ndarray:
    """The stems the command wrote under `folder` (one track), stacked in name order."""
    files = sorted(folder.rglob("*.wav"))
    if not files:
        raise SystemExit(f"No stems under {folder}.")
    return np.stack([soundfile.read(str(f), dtype="float32")[0] for f in files])


def out_name(side: str) -> str:
    return "out_" + side.replace(" ", "_")


def error_to(reference: np.ndarray, other: np.ndarray) -> float:
    """Largest difference over the reference's largest value."""
    if reference.shape != other.shape:
        return float("nan")
    return float(np.abs(reference - other).max() / np.abs(reference).max())


def bench_model(args: argparse.Namespace, name: str, work: Path) -> None:
    repo = work / "repo"
    track = work / "track.wav"
    sides: tp.Dict[str, tp.List[str]] = {}
    original = args.upstream if name == "htdemucs" else args.original
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "DEMUCS_ONNX_CACHE": str(args.cache)}
    if original is not None:
        sides["original"] = command(original / "bin" / "python", name, repo,
                                    work / "out_original", track)
    for side, options in our_sides(args).items():
        sides[side] = command(Path(sys.executable), name, repo, work / out_name(side), track,
                              options)
    # The original must not import this repository's package: run from `work`, with
    # PYTHONPATH cleared for it; ours gets the repository on its path.
    ours_env = {**env, "PYTHONPATH": str(HERE.parent)}
    # torch >= 2.6 loads with weights_only by default, which the originals' packages
    # (pickled classes) need turned off.
    theirs_env = {**{k: v for k, v in env.items() if k != "PYTHONPATH"},
                  "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    envs = {side: theirs_env if side == "original" else ours_env for side in sides}
    for side, argv in sides.items():  # untimed: exports, file cache, stems to compare
        run(argv, envs[side], work)
    results: tp.Dict[str, tp.List[Run]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side, argv in sides.items():
            results[side].append(run(argv, envs[side], work))
    reference = stems(work / "out_torch") if "torch" in sides else None
    report(name, args, results, {side: stems(work / out_name(side)) for side in sides},
           reference, ORIGINAL[name] if original is not None else None)


def report(name: str, args: argparse.Namespace, results: tp.Dict[str, tp.List[Run]],
           outputs: tp.Dict[str, np.ndarray], reference: tp.Optional[np.ndarray],
           original: tp.Optional[str]) -> None:
    base = results.get("original")
    for side, runs in results.items():
        speed = min(r.seconds for r in runs) / args.seconds
        memory = min(r.peak_mb for r in runs)
        label = f"original ({original})" if side == "original" else f"ours, {side}"
        times = ", ".join(f"{r.seconds:.1f}" for r in runs)
        line = (f"{name:8s} {label:22s} {speed:.3f} s/s  peak {memory:5.0f} MB  "
                f"(runs: {times} s)")
        if base is not None and side != "original":
            line += (f"  time x{speed * args.seconds / min(r.seconds for r in base):.2f}, "
                     f"memory x{memory / min(r.peak_mb for r in base):.2f} of the original")
        if reference is not None and side.endswith("bf16"):
            line += f"  stems {snr_db(reference, outputs[side]):.1f} dB SNR to torch's"
        elif reference is not None and side != "torch":
            line += f"  stems {error_to(reference, outputs[side]):.1e} of scale from torch's"
        print(line, flush=True)


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--bf16", action="store_true",
                        help="also torch and openvino with --precision bf16")
    parser.add_argument("--original", type=Path, default=Path("/tmp/demucs-v3"),
                        help="venv of demucs==3.0.6 (the v3 models' original)")
    parser.add_argument("--upstream", type=Path, default=Path("/tmp/demucs-v4"),
                        help="venv of demucs==4.1.0 (HTDemucs' original)")
    parser.add_argument("--no-original", action="store_true",
                        help="only this repository's backends")
    parser.add_argument("--setup", action="store_true",
                        help="make the two venvs of the originals, then stop")
    parser.add_argument("--cache", type=Path, default=HERE / "results" / "onnx_cache")
    parser.add_argument("--work", type=Path, default=HERE / "results" / "backends")
    args = parser.parse_args(argv)
    if args.setup:
        setup(args.original, ORIGINAL["hdemucs"])
        setup(args.upstream, ORIGINAL["htdemucs"])
        return
    for attr in ("original", "upstream"):
        venv = getattr(args, attr)
        if args.no_original or not (venv / "bin" / "python").exists():
            if not args.no_original:
                print(f"No venv at {venv}: its original is not measured (make it with "
                      "python bench/bench_backends.py --setup).")
            setattr(args, attr, None)
    print(f"{args.threads} threads, {args.seconds:g} s of audio, minimum of {args.repeats} "
          "alternating runs of each side")
    for name in args.models:
        work = args.work / name
        shutil.rmtree(work, ignore_errors=True)
        (work / "repo").mkdir(parents=True)
        write_track(work / "track.wav", args.seconds)
        write_package(name, work / "repo")
        bench_model(args, name, work)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
