"""The README's main command: the whole workflow, small, on synthetic music.

    python -m tools.demo [--root demo] [--epochs 10] [--model hdemucs|htdemucs]

1. writes a synthetic MusDB-HQ-shaped dataset under ROOT/musdb (`tools.synth_dataset`);
2. trains a tiny Hybrid Demucs (v3, `--model hdemucs`, the default) or Hybrid Transformer
   Demucs (v4, `--model htdemucs`) on it with `dora run` (the XP lives in
   ROOT/outputs/xps/SIG);
3. exports it with `python -m tools.export SIG -o ROOT/release_models`;
4. separates a test mixture with `demucs --repo ROOT/release_models -n SIG`;
5. prints the nSDR of the separated stems against the true ones.

Every step prints the command it runs, so that the same commands can be used on MusDB-HQ.
A second run reuses the dataset and the trained XP (Dora resumes finished XPs instantly).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import soundfile as sf
import torch

from demucs.errors import DemucsError, report_errors
from demucs.evaluate import new_sdr

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["drums", "bass", "other", "vocals"]


# The tiny model of each demo: its overrides.
MODELS = {
    "hdemucs": ["model=hdemucs", "hdemucs.channels=8"],
    # 8 channels, hence a transformer of width 64 (8 * 2 ** 3), with 2 layers.
    "htdemucs": ["model=htdemucs", "htdemucs.channels=8", "htdemucs.t_layers=2"],
}


def training_args(epochs: int, model: str = "hdemucs") -> tp.List[str]:
    """Overrides of the demo XP: a small `model`, short segments, a few batches."""
    return [*MODELS[model], "dset.segment=4", "dset.shift=2",
            "batch_size=4", f"epochs={epochs}", "max_batches=8", "optim.lr=0.003",
            "augment.repitch.proba=0", "misc.num_workers=1", "test.sdr=false",
            f"test.every={epochs}"]


def run(command: tp.List[str], cwd: Path, env: tp.Dict[str, str]) -> None:
    shown = " ".join(shlex.quote(part) for part in command)
    print(f"\n+ (cd {cwd} && {shown})", flush=True)
    if subprocess.run(command, cwd=cwd, env=env).returncode != 0:
        raise DemucsError(f"the step `{shown}` failed (see its output above).")


def environment(root: Path) -> tp.Dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DORA_")}
    env["MUSDB_PATH"] = str(root / "musdb")
    env["METADATA_PATH"] = str(root / "metadata")
    return env


def signature(args: tp.List[str], env: tp.Dict[str, str]) -> str:
    """The Dora signature of the demo XP, computed as `dora run` computes it."""
    code = ("import sys; from demucs.train import main; "
            "print(main.get_xp(sys.argv[1:]).sig)")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def read(path: Path) -> torch.Tensor:
    data, _ = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy())  # (C, T)


def report(track: Path, separated: Path) -> None:
    """nSDR of each separated stem against the true stem of the synthetic track."""
    refs = torch.stack([read(track / f"{name}.wav") for name in SOURCES])
    ests = torch.stack([read(separated / f"{name}.wav") for name in SOURCES])
    length = min(refs.shape[-1], ests.shape[-1])
    scores = new_sdr(refs[None, ..., :length], ests[None, ..., :length])[0]
    print("\nnSDR of the separated stems (dB, higher is better; 0 = no separation):")
    for name, score in zip(SOURCES, scores.tolist()):
        print(f"  {name:8s} {score:6.2f}")
    print(f"  {'mean':8s} {scores.mean().item():6.2f}")


PROG = "tools.demo"


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("demo"),
                        help="Folder for the dataset, the XP, the export and the stems.")
    parser.add_argument("--epochs", type=int, default=10, help="Training epochs.")
    parser.add_argument("--model", choices=list(MODELS), default="hdemucs",
                        help="hdemucs: Hybrid Demucs (v3); htdemucs: Hybrid Transformer "
                             "Demucs (v4).")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Show the full traceback of errors.")
    args = parser.parse_args(argv)
    with report_errors(PROG, args.verbose, also=(subprocess.CalledProcessError, OSError)):
        demo(args.root.resolve(), args.epochs, args.model)


def demo(root: Path, epochs: int, model: str = "hdemucs") -> None:
    begin = time.time()
    root.mkdir(parents=True, exist_ok=True)
    env = environment(root)
    python = sys.executable
    if not (root / "musdb" / "test").is_dir():
        run([python, "-m", "tools.synth_dataset", str(root / "musdb"), "--tracks", "6",
             "--seconds", "12"], REPO, env)
    train_args = training_args(epochs, model)
    run([python, "-m", "dora", "-P", "demucs", "run", *train_args], root, env)
    sig = signature(train_args, env)
    run([python, "-m", "tools.export", sig, "-o", "release_models"], root, env)
    track = sorted((root / "musdb" / "test").iterdir())[0]
    run([python, "-m", "demucs", "--repo", "release_models", "-n", sig,
         str(track / "mixture.wav"), "-o", "separated"], root, env)
    separated = root / "separated" / sig / "mixture"
    report(track, separated)
    print(f"\nDone in {time.time() - begin:.0f} s. XP {sig}: {root / 'outputs' / 'xps' / sig}; "
          f"stems: {separated}.")
    print("Next: the same commands on MusDB-HQ (export MUSDB_PATH=...), see docs/training.md.")


if __name__ == "__main__":
    main()
