"""`dora run` trains for real, in subprocesses: files, exact resume after a kill, export
and separation with the `demucs` command (a tiny Hybrid Demucs, and, marked slow, a tiny
Hybrid Transformer Demucs), DDP.

Each XP runs from its own temporary folder (Dora's `outputs/` is relative to it), with the
synthetic dataset given through MUSDB_PATH and METADATA_PATH, as users do.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import soundfile as sf
import torch

from demucs.grids._explorers import summarize
from helpers import SOURCES, assert_same_tensors, on_ci
from tools.synth_dataset import generate_dataset

# Everything random is on: repitch (when soundstretch is there), remix, scale, flips,
# shifts, the SVD penalty drawn with probability 1/2, an EMA, a data loader worker.
HDEMUCS = ["model=hdemucs", "hdemucs.channels=4", "hdemucs.depth=4", "hdemucs.nfft=1024"]
# Hybrid Transformer Demucs (v4): it trains, and is exported, at its training length
# (use_train_segment: dset.segment - dset.shift = 1 s); the SVD penalty covers its
# transformer's linear layers too.
HTDEMUCS = ["model=htdemucs", "htdemucs.channels=8", "htdemucs.t_layers=1",
            "htdemucs.nfft=1024"]
TRAINING = ["dset.segment=2", "dset.shift=1", "batch_size=2", "epochs=2", "max_batches=2",
            "misc.num_workers=1", "test.sdr=false", "augment.remix.group_size=2",
            "ema.batch=[0.9]", "svd.penalty=1e-4", "svd.min_size=0", "svd.proba=0.5"]
if shutil.which("soundstretch") is None and not on_ci():  # CI has it: repitch must run
    TRAINING.append("augment.repitch.proba=0")
ARGS = [*HDEMUCS, *TRAINING]

# Runs the training like `python -m demucs.train`, but SIGKILLs itself right after the
# first checkpoint is written: a training killed between two epochs.
KILLED_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
from demucs import solver
save = solver.Solver._save
def save_then_die(self, epoch):
    save(self, epoch)
    os.kill(os.getpid(), signal.SIGKILL)
solver.Solver._save = save_then_die
from demucs.train import main
sys.argv = ["demucs.train"] + sys.argv[1:]
main()
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of the runs: the synthetic MusDB and its metadata cache."""
    root = tmp_path_factory.mktemp("data")
    generate_dataset(root / "musdb", tracks=3, seconds=3, valid_tracks=1,
                           test_tracks=1)
    env = {key: value for key, value in os.environ.items() if not key.startswith("DORA_")}
    env.update(MUSDB_PATH=str(root / "musdb"), METADATA_PATH=str(root / "metadata"))
    return env


def run(cwd: Path, env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, *command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def xp_folder(cwd: Path) -> Path:
    folders = list((cwd / "outputs" / "xps").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def load(path: Path) -> dict[str, tp.Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", params=[
    pytest.param(ARGS, id="hdemucs"),
    pytest.param([*HTDEMUCS, *TRAINING], id="htdemucs", marks=pytest.mark.slow)])
def runs(request: pytest.FixtureRequest, dataset: dict[str, str],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, tp.Any]:
    """A full `dora run`, and the same XP killed after one epoch then resumed."""
    argv: list[str] = request.param
    root = tmp_path_factory.mktemp("runs")
    with ThreadPoolExecutor(2) as pool:
        full = pool.submit(run, root / "full", dataset, "-m", "dora", "-P", "demucs", "run",
                           *argv)
        killed = pool.submit(run, root / "killed", dataset, "-c",
                             KILLED_AFTER_FIRST_CHECKPOINT, *argv)
        results = {"full": full.result(), "killed": killed.result()}
    results["resumed"] = run(root / "killed", dataset, "-m", "demucs.train", *argv)
    return {"root": root, **results}


def test_dora_run_trains(runs: dict[str, tp.Any]) -> None:
    result = runs["full"]
    assert result.returncode == 0, result.stderr[-3000:]
    folder = xp_folder(runs["root"] / "full")
    for name in ["checkpoint.th", "best.th", "history.json", ".argv.json"]:
        assert (folder / name).is_file(), name
    history = json.loads((folder / "history.json").read_text())
    assert len(history) == 2
    for epoch in history:
        assert {"reco", "loss", "penalty"} <= set(epoch["train"])
        assert {"reco", "loss", "penalty", "ms", "nsdr"} <= set(epoch["valid"])
        assert {f"nsdr_{source}" for source in SOURCES} <= set(epoch["valid"])
    assert "test" not in history[0] and "nsdr" in history[1]["test"]  # test.every=20
    assert "bnsdr" in summarize(history)["valid"]
    assert "Train Summary | Epoch 2" in result.stdout + result.stderr
    package = torch.load(folder / "best.th", map_location="cpu", weights_only=False)
    assert_same_tensors(package["state"], load(folder / "checkpoint.th")["best_state"])


def test_killed_training_resumes_exactly(runs: dict[str, tp.Any]) -> None:
    killed, resumed = runs["killed"], runs["resumed"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after 1 epochs" in resumed.stdout + resumed.stderr  # "Resuming from ..."
    full = load(xp_folder(runs["root"] / "full") / "checkpoint.th")
    again = load(xp_folder(runs["root"] / "killed") / "checkpoint.th")
    for key in ["state", "best_state", "optimizer", "ema_batch_0", "history", "penalty_rng"]:
        assert_same_tensors(full[key], again[key], key)
    assert_same_tensors(full["rng"]["torch"], again["rng"]["torch"])


def test_exported_model_separates(runs: dict[str, tp.Any], dataset: dict[str, str]) -> None:
    """As in `tools.demo`: `tools.export` packages the trained XP into a repo folder and
    `demucs --repo FOLDER -n SIG` separates a test track with it into its 4 stems."""
    cwd = runs["root"] / "full"
    sig = xp_folder(cwd).name
    track = sorted((Path(dataset["MUSDB_PATH"]) / "test").iterdir())[0] / "mixture.wav"
    for command in [["tools.export", sig, "-o", "release_models"],
                    ["demucs", "--repo", "release_models", "-n", sig, str(track), "-o", "out"]]:
        result = run(cwd, dataset, "-m", *command)
        assert result.returncode == 0, result.stderr[-3000:]
    stems = cwd / "out" / sig / "mixture"
    assert sorted(path.name for path in stems.iterdir()) == sorted(f"{s}.wav" for s in SOURCES)
    mixture = sf.info(str(track))
    for source in SOURCES:
        info = sf.info(str(stems / f"{source}.wav"))
        assert (info.samplerate, info.frames, info.channels) == (
            mixture.samplerate, mixture.frames, mixture.channels), source
