"""Fine-tuning an HTDemucs from a v4 package: `continue_pretrained=NAME pretrained_repo=DIR`
or `continue_pretrained=PATH.th` starts a `model=htdemucs` XP from the package's weights,
and a package of another architecture is refused with the keys, shapes and overrides that
differ.

A tiny HTDemucs trains for 1 epoch of 2 batches on a synthetic MusDB (3 s tracks), in
process, inside a temporary Dora folder.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import typing as tp
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from demucs import train
from demucs.errors import ModelLoadingError
from demucs.htdemucs import HTDemucs
from demucs.weights import package_overrides, state_mismatch
from demucs.states import load_model, save_atomic, serialize_model
from demucs.train import main
from tools.synth_dataset import generate_dataset

from helpers import SOURCES, make_solver, same_state

SIX = [*SOURCES, "guitar", "piano"]
SIX_ARG = "dset.sources=[drums,bass,other,vocals,guitar,piano]"
TINY = ["model=htdemucs", "htdemucs.channels=8", "htdemucs.t_layers=1", "htdemucs.t_heads=2",
        "htdemucs.nfft=1024", "dset.segment=2", "dset.shift=1", "batch_size=2", "epochs=1",
        "max_batches=1", "misc.num_workers=0", "misc.num_prints=1", "test.sdr=false",
        "augment.remix.group_size=2", "augment.repitch.proba=0"]
# The `musdb` fixture: 3 s tracks with the 4 usual sources.
MUSDB: dict[str, tp.Any] = {"tracks": 2, "seconds": 3, "valid_tracks": 1, "test_tracks": 1}
# Every test runs in a temporary Dora folder, with MUSDB_PATH set to the `musdb` fixture.
pytestmark = pytest.mark.usefixtures("xp_folder")


@pytest.fixture(scope="module")
def six(musdb: Path) -> Path:
    """The same set with 6 sources, next to `musdb` (they share its metadata folder)."""
    return generate_dataset(musdb.parent / "six", **MUSDB, sources=SIX)


def export(path: Path, *argv: str, seed: int = 1) -> dict[str, tp.Any]:
    """Write the package of a random tiny HTDemucs built from TINY + `argv`, as
    `tools.export` writes a trained one (half precision, the training length as a
    Fraction); return the package."""
    cfg = main.get_xp(TINY + list(argv)).cfg
    torch.manual_seed(seed)  # not the XP's seed: its own initial weights differ
    model: tp.Any = train.get_model(cfg)
    model.segment = Fraction(1)  # what `dset.segment - dset.shift` trains on
    package = serialize_model(model, cfg, half=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(package, path)
    return package


def float_state(package: dict[str, tp.Any]) -> dict[str, torch.Tensor]:
    return {key: value.float() for key, value in package["state"].items()}


# ---------------------------------------------------------------------------------------
# Fine-tuning


@pytest.mark.slow
def test_finetune_from_a_repo_starts_from_the_package(tmp_path: Path) -> None:
    package = export(tmp_path / "release_models" / "v4tiny.th")
    solver, xp = make_solver(TINY, "continue_pretrained=v4tiny",
                             f"pretrained_repo={tmp_path / 'release_models'}")
    assert isinstance(solver.model, HTDemucs)
    assert same_state(solver.model, float_state(package))
    with xp.enter():
        solver.train()
    assert len(solver.history) == 1 and "nsdr" in solver.history[0]["test"]
    assert not same_state(solver.model, float_state(package))  # it trained from there
    best = load_model(xp.folder / "best.th")
    assert isinstance(best, HTDemucs) and best.segment == 1


def test_finetune_from_a_package_path(tmp_path: Path) -> None:
    package = export(tmp_path / "models" / "v4tiny.th")
    solver, _ = make_solver(TINY, f"continue_pretrained={tmp_path / 'models' / 'v4tiny.th'}",
                            model_only=True)
    assert same_state(solver.model, float_state(package))


def test_finetune_from_a_bag_of_one_model(tmp_path: Path) -> None:
    """As the released `htdemucs`, a bag holding one model."""
    package = export(tmp_path / "repo" / "v4tiny.th")
    (tmp_path / "repo" / "mybag.yaml").write_text("models: ['v4tiny']\n")
    solver, _ = make_solver(TINY, "continue_pretrained=mybag",
                            f"pretrained_repo={tmp_path / 'repo'}", model_only=True)
    assert same_state(solver.model, float_state(package))


@pytest.mark.slow
def test_finetune_six_sources(six: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSDB_PATH", str(six))
    package = export(tmp_path / "models" / "six.th", SIX_ARG)
    solver, xp = make_solver(TINY, SIX_ARG, "weights=[1,1,1,1,1,1]", "continue_pretrained=six",
                             f"pretrained_repo={tmp_path / 'models'}")
    assert isinstance(solver.model, HTDemucs) and solver.model.sources == SIX
    assert same_state(solver.model, float_state(package))
    with xp.enter():
        solver.train()
    assert "nsdr_piano" in solver.history[0]["valid"]
    best = load_model(xp.folder / "best.th")
    assert isinstance(best, HTDemucs) and best.sources == SIX


def test_other_settings_load_with_a_warning(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Keys that change no weight (dropout, embedding) load; the log names them."""
    path = tmp_path / "v4tiny.th"
    package = export(path, "htdemucs.t_dropout=0.1", "htdemucs.t_emb=cape")
    with caplog.at_level(logging.WARNING, logger="demucs.solver"):
        solver, _ = make_solver(TINY, f"continue_pretrained={path}", model_only=True)
    assert same_state(solver.model, float_state(package))
    assert "built with htdemucs.t_dropout=0.1 htdemucs.t_emb=cape" in caplog.text


# ---------------------------------------------------------------------------------------
# Another architecture


def finetune_error(tmp_path: Path, package_argv: list[str], *argv: str) -> str:
    path = tmp_path / "other.th"
    export(path, *package_argv)
    with pytest.raises(ModelLoadingError) as error:
        make_solver(TINY, f"continue_pretrained={path}", *argv, model_only=True)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"continue_pretrained={path}: ")
    return message


def test_mismatch_names_keys_shapes_and_overrides(tmp_path: Path) -> None:
    # A bottleneck of 16 channels around the transformer, whose width is otherwise
    # channels * growth ** 3 = 64.
    message = finetune_error(tmp_path, ["htdemucs.bottom_channels=16", "htdemucs.t_layers=2"])
    assert "crosstransformer.norm_in.weight: package (16,), model (64,)" in message
    assert "; 77 more keys); set" in message
    assert message.endswith("; set htdemucs.bottom_channels=16 htdemucs.t_layers=2 "
                            "(the package's arguments).")


def test_mismatch_of_sources(tmp_path: Path) -> None:
    message = finetune_error(tmp_path, [SIX_ARG])
    assert "decoder.3.conv_tr.weight: package (8, 24, 8, 1), model (8, 16, 8, 1)" in message
    assert f"set {SIX_ARG} weights=[1,1,1,1,1,1] (the package's arguments)" in message


def test_mismatch_of_model_class(tmp_path: Path) -> None:
    message = finetune_error(tmp_path, ["model=hdemucs", "hdemucs.channels=8"])
    assert "set model=hdemucs hdemucs.channels=8 " in message


def test_mismatch_through_the_command(tmp_path: Path) -> None:
    """`python -m demucs.train` reports it as one line and exits 1."""
    path = tmp_path / "other.th"
    export(path, "htdemucs.t_layers=2")
    env = {key: value for key, value in os.environ.items() if not key.startswith("DORA_")}
    result = subprocess.run([sys.executable, "-m", "demucs.train", *TINY,
                             f"continue_pretrained={path}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after the scan of the dataset
    assert line.startswith("demucs.train: error: continue_pretrained=")
    assert "crosstransformer.layers.1.cross_attn.in_proj_weight: package (192, 64), " \
           "model missing" in line
    assert line.endswith("set htdemucs.t_layers=2 (the package's arguments).")


# ---------------------------------------------------------------------------------------
# The helpers


def test_state_mismatch_lists_the_first_keys() -> None:
    model = {"a": torch.zeros(3), "b": torch.zeros(2, 2), "c": torch.zeros(1),
             "d_diffq": torch.zeros(1)}
    state = {"a": torch.zeros(3), "b": torch.zeros(2, 3), "e": torch.zeros(4)}
    assert state_mismatch(model, state, "package") == (
        "b: package (2, 3), model (2, 2); c: package missing, model (1,); "
        "e: package (4,), model missing")
    assert state_mismatch(model, {**model}, "checkpoint") == ""
    many = {f"k{index}": torch.zeros(index + 1) for index in range(5)}
    assert state_mismatch(many, {}, "checkpoint").endswith("; 2 more keys")


def test_package_overrides_of_a_matching_model_are_empty() -> None:
    cfg = main.get_xp(TINY).cfg
    assert package_overrides(train.get_model(cfg), cfg) == []
    cfg.use_train_segment = False
    assert package_overrides(train.get_model(main.get_xp(TINY).cfg), cfg) == [
        "use_train_segment=true"]
