"""The training workflow of docs/training.md, command after command, as a user types it.

Each command runs in a subprocess from a temporary folder, with the data paths given
through the environment as the docs say (`MUSDB_PATH`, `AUTOMIX_MUSDB_PATH`,
`METADATA_PATH`) and `DORA_PACKAGE=demucs` (what running from the repository root
gives). The XPs are tiny Hybrid Demucs; where the docs use `-d` (all the GPUs), this
machine has none, so `-d --ddp_workers 2` runs two CPU workers, as the docs say.

The chain is the seed's recipe: `dora run` trains a first XP -> `dora info -f SIG` ->
`python -m tools.automix` writes the fine-tuning set -> `dora run -d -f SIG
continue_from=SIG dset=auto_mus variant=finetune` fine-tunes on it -> `python -m
tools.export SIG SIG2` -> a bag of the two -> `demucs --repo ./release_models -n my_bag
track.mp3`. Beside it: `python -m demucs.train ... continue_from=SIG`, the one-line errors
for unknown and untrained signatures, and `dora run -f SIG` resuming a killed XP.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
import soundfile as sf
import torch

from demucs.checkpoints import load_checkpoint
from helpers import SOURCES, require_programs
from tools.synth_dataset import generate_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent  # the console scripts of this environment: dora, demucs
# The first XP: a tiny Hybrid Demucs, two short epochs (the history of each is checked).
BASE = ["model=hdemucs", "hdemucs.channels=4", "hdemucs.depth=4", "hdemucs.nfft=1024",
        "dset.segment=2", "dset.shift=1", "batch_size=2", "epochs=2", "max_batches=2",
        "misc.num_workers=0", "test.sdr=false", "augment.remix.group_size=2",
        "augment.repitch.proba=0"]
# Loose automix tolerances: random synthetic tracks must find partners.
AUTOMIX = ["--mixes-per-track", "2", "--max-tempo", "60", "--max-pitch", "6",
           "--workers", "1"]


class Workspace(tp.NamedTuple):
    root: Path
    env: dict[str, str]


def run(workspace: Workspace, *command: str, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `command` in the workspace; its output (stdout and stderr) in `.stdout`."""
    result = subprocess.run(command, cwd=workspace.root, env=workspace.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}")
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The last line of a command that failed: its one-line error."""
    assert result.returncode == 1, result.stdout[-3000:]
    return result.stdout.strip().splitlines()[-1]


def dora(workspace: Workspace, *args: str, **kwargs: tp.Any) -> subprocess.CompletedProcess:
    return run(workspace, str(BIN / "dora"), *args, **kwargs)


def python(workspace: Workspace, *args: str, **kwargs: tp.Any) -> subprocess.CompletedProcess:
    return run(workspace, sys.executable, *args, **kwargs)


def xps(workspace: Workspace) -> set[str]:
    return {path.name for path in (workspace.root / "outputs" / "xps").iterdir()}


def history(workspace: Workspace, sig: str) -> list[dict[str, tp.Any]]:
    path = workspace.root / "outputs" / "xps" / sig / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def train_new(workspace: Workspace, command: tp.Callable[..., subprocess.CompletedProcess],
              *args: str) -> tuple[str, str]:
    """Run a training `command` that makes one new XP: (its signature, its output)."""
    before = xps(workspace) if (workspace.root / "outputs" / "xps").exists() else set()
    output = command(workspace, *args).stdout
    new = xps(workspace) - before
    assert len(new) == 1, (new, output[-3000:])
    return new.pop(), output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    require_programs("ffmpeg", "soundstretch")
    root = tmp_path_factory.mktemp("workflow")
    env = {key: value for key, value in os.environ.items() if not key.startswith("DORA_")}
    env.update(MUSDB_PATH=str(root / "data" / "musdbhq"),
               AUTOMIX_MUSDB_PATH=str(root / "data" / "automix"),
               METADATA_PATH=str(root / "metadata"), DORA_PACKAGE="demucs")
    generate_dataset(root / "data" / "musdbhq", tracks=8, seconds=8, test_tracks=1,
                     valid_tracks=4)  # automix remixes 4 validation tracks together
    return Workspace(root, env)


@pytest.fixture(scope="module")
def base(workspace: Workspace) -> str:
    """`dora run BASE`: the signature of the first XP, trained."""
    sig, output = train_new(workspace, dora, "run", *BASE)
    assert len(history(workspace, sig)) == 2, output[-3000:]
    return sig


def test_dora_info_shows_the_xp(workspace: Workspace, base: str) -> None:
    output = dora(workspace, "info", "-f", base).stdout
    assert f"from sig {base}" in output and "'hdemucs.channels=4'" in output
    assert f"Folder is {workspace.root / 'outputs' / 'xps' / base}" in output


def test_unknown_and_untrained_signatures_are_one_line(workspace: Workspace,
                                                       base: str) -> None:
    result = dora(workspace, "run", *BASE, "seed=3", "continue_from=abcdef12", check=False)
    line = error_line(result)
    assert line.startswith("demucs.train: error: unknown XP signature 'abcdef12'")
    assert base in line  # the XPs that exist
    # An XP known by its argv alone (as `dora grid --init` leaves them): no checkpoint.
    folder = workspace.root / "outputs" / "xps"
    sig = python(workspace, "-c", "import sys; from demucs.train import main; "
                 "xp = main.get_xp(sys.argv[1:]); main.init_xp(xp); print(xp.sig)",
                 *BASE, "seed=4").stdout.split()[-1]
    result = dora(workspace, "run", *BASE, "seed=5", f"continue_from={sig}", check=False)
    line = error_line(result)
    assert line.startswith(f"demucs.train: error: continue_from={sig}: XP {sig} has not "
                           f"trained yet (no {folder / sig / 'checkpoint.th'})")
    assert line.endswith(f"XPs with a checkpoint: {base}.")


def test_python_m_demucs_train_continues_from_an_xp(workspace: Workspace, base: str) -> None:
    sig, output = train_new(workspace, python, "-m", "demucs.train", *BASE, "epochs=1",
                            "seed=7", f"continue_from={base}")
    checkpoint = workspace.root / "outputs" / "xps" / base / "checkpoint.th"
    assert f"Starting from the best_state of {checkpoint}" in output
    assert len(history(workspace, sig)) == 1


def test_finetune_on_automix_export_and_separate_with_a_bag(workspace: Workspace,
                                                            base: str) -> None:
    # The fine-tuning set (AUTOMIX_MUSDB_PATH, as conf/dset/auto_mus.yaml reads it).
    python(workspace, "-m", "tools.automix", *AUTOMIX)
    automix = workspace.root / "data" / "automix"
    assert list((automix / "train").iterdir()) and list((automix / "valid").iterdir())
    # docs/training.md's fine-tuning command, with two CPU workers for `-d`.
    sig, output = train_new(workspace, dora, "run", "-d", "--ddp_workers", "2", "-f", base,
                            f"continue_from={base}", "dset=auto_mus", "variant=finetune")
    assert f"Starting from the best_state of {workspace.root}/outputs/xps/{base}" in output
    tuned = history(workspace, sig)
    assert len(tuned) == 2  # -f's epochs=2 comes after variant=finetune's epochs: 4
    assert "nsdr" in tuned[-1]["test"]  # variant=finetune tests at every epoch
    argv = json.loads((workspace.root / "outputs" / "xps" / sig / ".argv.json").read_text())
    assert argv[-3:] == [f"continue_from={base}", "dset=auto_mus", "variant=finetune"]
    # It started from the base XP's best weights, then trained on the remixes.
    assert load_checkpoint(workspace.root / "outputs" / "xps" / sig / "checkpoint.th")[
        "args"]["dset"]["wav"] == str(automix)

    python(workspace, "-m", "tools.export", base, sig)
    release = workspace.root / "release_models"
    assert {path.name for path in release.iterdir()} == {f"{base}.th", f"{sig}.th"}
    (release / "my_bag.yaml").write_text(
        f"models: ['{base}', '{sig}']\n"
        "weights: [[1., 1., 1., 1.], [1., 1., 1., 0.5]]\n")
    mixture = workspace.root / "data" / "musdbhq" / "test"
    track = next(mixture.iterdir()) / "mixture.wav"
    run(workspace, "ffmpeg", "-loglevel", "error", "-i", str(track), "my_track.mp3")
    output = run(workspace, str(BIN / "demucs"), "--repo", "./release_models", "-n",
                 "my_bag", "my_track.mp3").stdout
    assert "Selected model is a bag of 2 models" in output
    stems = workspace.root / "separated" / "my_bag" / "my_track"
    length = sf.info(str(track)).frames
    for source in SOURCES:
        info = sf.info(str(stems / f"{source}.wav"))
        assert info.samplerate == 44100 and info.channels == 2
        assert abs(info.frames - length) < 2048  # mp3 padding at most
    peaks = [abs(sf.read(str(stems / f"{source}.wav"), dtype="float32")[0]).max()
             for source in SOURCES]
    assert max(peaks) > 0.01  # not silence


def _wait_for_epochs(workspace: Workspace, sig: str, epochs: int,
                     process: subprocess.Popen, timeout: float = 300) -> None:
    """Until `epochs` epochs are in the history and a checkpoint is written (the solver
    writes the history first: a kill in between leaves nothing to resume from)."""
    begin = time.time()
    checkpoint = workspace.root / "outputs" / "xps" / sig / "checkpoint.th"
    while len(history(workspace, sig)) < epochs or not checkpoint.exists():
        assert process.poll() is None, "the training ended before it could be killed"
        assert time.time() - begin < timeout, "no epoch written in time"
        time.sleep(0.2)


def test_killed_xp_resumes_with_dora_run_f(workspace: Workspace, base: str) -> None:
    argv = [*BASE, "epochs=3", "seed=9"]
    sig = python(workspace, "-c", "import sys; from demucs.train import main; "
                 "print(main.get_xp(sys.argv[1:]).sig)", *argv).stdout.split()[-1]
    process = subprocess.Popen([str(BIN / "dora"), "run", *argv], cwd=workspace.root,
                               env=workspace.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_epochs(workspace, sig, 1, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    first = history(workspace, sig)
    assert 1 <= len(first) < 3
    output = dora(workspace, "run", "-f", sig).stdout
    assert f"Resuming from {workspace.root / 'outputs' / 'xps' / sig / 'checkpoint.th'}" \
        in output
    resumed = history(workspace, sig)
    assert len(resumed) == 3 and resumed[:len(first)] == first


def test_failing_checkpoint_part_keeps_the_xp_and_verbose_shows_the_cause(
        workspace: Workspace, base: str) -> None:
    path = workspace.root / "outputs" / "xps" / base / "checkpoint.th"
    whole = path.read_bytes()
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["rng"]["python"] = None  # random.setstate(None): a TypeError
    torch.save(checkpoint, path)
    broken = path.read_bytes()
    try:
        for verbose in (False, True):
            extra = ["misc.verbose=true"] if verbose else []  # misc.*: the same XP
            result = dora(workspace, "run", "-f", base, *extra, check=False)
            last = error_line(result)
            assert last.startswith(f"demucs.train: error: {path}: loading its 'rng' failed "
                                   "(TypeError: ")
            assert "--clear" not in last and "kept" in last
            assert ("Traceback" in result.stdout) == verbose
            assert ("in setstate" in result.stdout) == verbose  # the cause's traceback
            assert path.read_bytes() == broken
    finally:
        path.write_bytes(whole)
