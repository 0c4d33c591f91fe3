"""MSST's architectures trained by our solver, through the commands users type.

For each of `model=bs_roformer|mel_band_roformer|scnet` (tiny), with the loss MSST uses:
`dora run` trains it and is killed after its first epoch, `dora run -f SIG` resumes it,
and its history and weights equal those of the same XP trained without a stop (in
another folder); `tools.export SIG` writes a package that `demucs` separates with;
`tools.export SIG --msst DIR` writes MSST's files, which `tools.import_msst` reads back
to the same weights. Then `continue_pretrained=` fine-tunes an imported one-stem MSST
model, and `dora grid roformer --dry_run --init` lists MSST's MUSDB configurations.
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
from demucs.states import load_model, load_package
from tools.synth_dataset import generate_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
COMMON = ["dset.segment=2", "dset.shift=1", "batch_size=2", "max_batches=2",
          "misc.num_workers=0", "test.sdr=false", "augment.remix.group_size=2",
          "augment.repitch.proba=0", "epochs=2", "test.every=2"]
ROFORMER = ["dim=8", "depth=1", "dim_head=4", "heads=2", "time_transformer_depth=1",
            "freq_transformer_depth=1", "mask_estimator_depth=1", "mlp_expansion_factor=1"]
TINY = {
    "bs_roformer": ["model=bs_roformer", "optim.loss=l1_multi_stft",
                    *[f"bs_roformer.{arg}" for arg in ROFORMER]],
    "mel_band_roformer": ["model=mel_band_roformer", "optim.loss=l1_multi_stft",
                          "mel_band_roformer.num_bands=16",
                          *[f"mel_band_roformer.{arg}" for arg in ROFORMER]],
    "scnet": ["model=scnet", "optim.loss=masked_mse", "scnet.dims=[4,4,8]",
              "scnet.nfft=1024", "scnet.hop_size=256", "scnet.win_size=1024",
              "scnet.num_dplayer=2"],
}


class Workspace(tp.NamedTuple):
    root: Path
    env: dict[str, str]


def make_workspace(root: Path, data: Path) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("DORA_")}
    env.update(MUSDB_PATH=str(data), METADATA_PATH=str(root / "metadata"),
               DORA_PACKAGE="demucs")
    return Workspace(root, env)


def run(workspace: Workspace, *command: str) -> str:
    result = subprocess.run(command, cwd=workspace.root, env=workspace.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-4000:]}"
    return result.stdout


def signature(workspace: Workspace, argv: tp.Sequence[str]) -> str:
    return run(workspace, sys.executable, "-c", "import sys; from demucs.train import main; "
               "print(main.get_xp(sys.argv[1:]).sig)", *argv).split()[-1]


def history(workspace: Workspace, sig: str) -> list[dict[str, tp.Any]]:
    path = workspace.root / "outputs" / "xps" / sig / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def train_killed_then_resumed(workspace: Workspace, argv: tp.Sequence[str], sig: str) -> None:
    process = subprocess.Popen([str(BIN / "dora"), "run", *argv], cwd=workspace.root,
                               env=workspace.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        begin = time.time()
        checkpoint = workspace.root / "outputs" / "xps" / sig / "checkpoint.th"
        while not checkpoint.exists():  # written after history.json
            assert process.poll() is None, "the training ended before it could be killed"
            assert time.time() - begin < 600, "no epoch written in time"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert len(history(workspace, sig)) == 1
    output = run(workspace, str(BIN / "dora"), "run", "-f", sig)
    assert "Resuming from" in output


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("msst_data")
    generate_dataset(root / "musdb", tracks=3, seconds=3, valid_tracks=1, test_tracks=1)
    return root / "musdb"


@pytest.mark.parametrize("model", list(TINY))
def test_trains_resumes_exactly_exports_and_separates(model: str, data: Path,
                                                      tmp_path: Path) -> None:
    argv = [*TINY[model], *COMMON]
    straight = make_workspace(tmp_path / "straight", data)
    stopped = make_workspace(tmp_path / "stopped", data)
    sig = signature(straight, argv)
    run(straight, str(BIN / "dora"), "run", *argv)
    train_killed_then_resumed(stopped, argv, sig)
    expected, resumed = history(straight, sig), history(stopped, sig)
    assert len(expected) == 2 and "nsdr" in expected[-1]["test"]
    assert [epoch["train"] for epoch in resumed] == [epoch["train"] for epoch in expected]
    assert [epoch["valid"] for epoch in resumed] == [epoch["valid"] for epoch in expected]
    ours = load_checkpoint(stopped.root / "outputs" / "xps" / sig / "checkpoint.th")["state"]
    theirs = load_checkpoint(straight.root / "outputs" / "xps" / sig / "checkpoint.th")["state"]
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)

    run(stopped, sys.executable, "-m", "tools.export", sig)
    package = stopped.root / "release_models" / f"{sig}.th"
    assert type(load_model(package)).__module__.endswith(model.replace("_band", ""))
    track = next((data / "test").iterdir()) / "mixture.wav"
    run(stopped, str(BIN / "demucs"), "--repo", "release_models", "-n", sig, str(track))
    for source in ["drums", "bass", "other", "vocals"]:
        info = sf.info(str(stopped.root / "separated" / sig / track.stem /
                           f"{source}.wav"))
        assert info.frames == sf.info(str(track)).frames and info.channels == 2

    output = run(stopped, sys.executable, "-m", "tools.export", sig, "--msst", "msst")
    assert "Exported XP" in output
    run(stopped, sys.executable, "-m", "tools.import_msst", "--model-type", model,
        "--config", "msst/config.yaml", "--checkpoint", "msst/model.ckpt",
        "--out", "imported.th")
    best = load_checkpoint(stopped.root / "outputs" / "xps" / sig / "checkpoint.th")
    imported = load_package(stopped.root / "imported.th")["state"]
    reference = best["best_state"] or best["state"]  # what tools.export writes
    assert imported.keys() == reference.keys()
    assert all(torch.equal(imported[key], reference[key].float()) for key in reference)


def test_fine_tunes_an_imported_one_stem_model(reference_dir: Path, data: Path,
                                               tmp_path: Path) -> None:
    """A one-stem (vocals) MSST BS-RoFormer, imported, then fine-tuned with `dora run
    ... continue_pretrained=PATH.th dset.sources=[vocals]`, with the overrides that
    `tools.import_msst` prints."""
    import yaml
    case = torch.load(reference_dir / "msst" / "msst_bs_roformer_vocals.pt",
                      weights_only=False)
    workspace = make_workspace(tmp_path, data)
    config = {"audio": {"chunk_size": 44100, "num_channels": 2, "sample_rate": 44100},
              "model": case["kwargs"],
              "training": {"instruments": ["vocals", "other"], "target_instrument": "vocals"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save(case["state_dict"], tmp_path / "model.ckpt")
    output = run(workspace, sys.executable, "-m", "tools.import_msst", "--model-type",
                 "bs_roformer", "--config", "config.yaml", "--checkpoint", "model.ckpt",
                 "--out", "vocals.th")
    command = next(line for line in output.splitlines() if "continue_pretrained=" in line)
    overrides = command.split("dora run ", 1)[1].split()
    assert "dset.sources=[vocals]" in overrides and "weights=[1]" in overrides
    argv = [*overrides, *COMMON, "epochs=1"]
    sig = signature(workspace, argv)
    output = run(workspace, str(BIN / "dora"), "run", *argv)
    assert "Starting from the pretrained model" in output
    assert len(history(workspace, sig)) == 1


def test_grid_lists_msst_configurations(tmp_path: Path) -> None:
    workspace = make_workspace(tmp_path, tmp_path)
    output = run(workspace, str(BIN / "dora"), "grid", "roformer", "--dry_run", "--init")
    lines = [line for line in output.splitlines() if "model=" in line]
    assert len(lines) == 4
    assert "model=bs_roformer" in lines[0] and "opt.loss=l1_multi_stft" in lines[0]
    assert "model=mel_band_roformer" in lines[1]
    assert "model=scnet" in lines[2] and "opt.loss=masked_mse" in lines[2]
    assert "scn.dims=[4, 64, 128, 256]" in lines[3]
