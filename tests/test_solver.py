"""The training loop, in process: history, checkpoints, best state, resume, continue_from.

A tiny hybrid model trains for 1 or 2 epochs of 2 batches on a synthetic MusDB (3 s
tracks), inside a temporary Dora folder.
"""
from __future__ import annotations

import os
import shutil
import typing as tp
from pathlib import Path

import pytest
import torch
from dora.xp import XP
from omegaconf import OmegaConf

from demucs import train
from demucs.errors import ConfigError, ModelLoadingError
from demucs.grids._explorers import summarize
from demucs.checkpoints import load_checkpoint
from demucs.solver import Solver
from demucs.states import load_model
from demucs.train import main

SOURCES = ("drums", "bass", "other", "vocals")
TINY = ["model=hdemucs", "hdemucs.channels=4", "hdemucs.depth=4", "hdemucs.nfft=1024",
        "dset.segment=2", "dset.shift=1", "batch_size=2", "epochs=2", "max_batches=2",
        "misc.num_workers=0", "misc.num_prints=1", "test.sdr=false",
        "augment.remix.group_size=2", "augment.repitch.proba=0"]


@pytest.fixture(scope="module")
def musdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    synth = pytest.importorskip("tools.synth_dataset")
    root = tmp_path_factory.mktemp("data")
    synth.generate_dataset(root / "musdb", tracks=3, seconds=3, valid_tracks=1,
                           test_tracks=1)
    return root


@pytest.fixture(autouse=True)
def xp_folder(musdb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Dora's XPs in tmp_path; the dataset from the environment, as users set it."""
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    monkeypatch.setenv("MUSDB_PATH", str(musdb / "musdb"))
    monkeypatch.setenv("METADATA_PATH", str(musdb / "metadata"))
    return tmp_path / "outputs"


def make_solver(*argv: str, model_only: bool = False) -> tuple[Solver, XP]:
    xp = main.get_xp(TINY + list(argv))
    main.init_xp(xp)
    with xp.enter():
        return train.get_solver(xp.cfg, model_only=model_only), xp


def train_xp(*argv: str) -> tuple[Solver, XP]:
    solver, xp = make_solver(*argv)
    with xp.enter():
        solver.train()
    return solver, xp


def states_equal(first: tp.Mapping[str, torch.Tensor],
                 second: tp.Mapping[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k].cpu(), second[k].cpu())
                                                 for k in first)


def test_train_writes_history_and_checkpoints() -> None:
    solver, xp = train_xp("ema.batch=[0.9]", "ema.epoch=[0.5]", "save_every=1",
                          "svd.penalty=1e-3", "svd.min_size=0", "test.every=1")
    for name in ["checkpoint.th", "checkpoint_1.th", "checkpoint_2.th", "best.th",
                 "history.json"]:
        assert (xp.folder / name).is_file(), name
    assert not list(xp.folder.glob(".*.tmp"))
    history = main.get_xp_history(xp)  # what `dora grid` reads
    assert len(history) == 2
    for epoch in history:
        assert {"reco", "loss", "penalty"} <= set(epoch["train"])
        assert epoch["train"]["penalty"] > 0
        valid = epoch["valid"]
        assert {"reco", "loss", "penalty", "ms", "nsdr", "best"} <= set(valid)
        assert {f"nsdr_{source}" for source in SOURCES} <= set(valid)
        assert {f"nsdr_{source}" for source in SOURCES} | {"nsdr"} <= set(epoch["test"])
    assert history[1]["valid"]["best"] == min(e["valid"]["loss"] for e in history)
    row = summarize(history)
    assert row["train"]["epoch"] == 2 and "bnsdr_vocals" in row["valid"]
    # max_batches=2 allows 3 batches an epoch; this train set has fewer: all are used.
    assert solver.loaders is not None and len(solver.loaders["train"]) == 2
    steps = {float(state["step"]) for state in solver.optimizer.state.values()}
    assert steps == {4.}
    # best.th: a package of the best state, loadable by the separation code.
    package = torch.load(xp.folder / "best.th", weights_only=False)
    assert solver.best_state is not None
    assert states_equal(package["state"], solver.best_state)
    assert package["training_args"]["hdemucs"]["channels"] == 4
    model: tp.Any = load_model(xp.folder / "best.th")
    assert list(model.sources) == list(SOURCES)
    checkpoint = load_checkpoint(xp.folder / "checkpoint.th")
    assert states_equal(checkpoint["state"], solver.model.state_dict())
    # The original's layout: one entry per EMA, plus our random generator states.
    assert {"ema_batch_0", "ema_epoch_0", "rng", "penalty_rng"} <= set(checkpoint)
    assert checkpoint["ema_batch_0"]["count"] > checkpoint["ema_epoch_0"]["count"] > 0
    assert load_checkpoint(xp.folder / "checkpoint_1.th")["history"] == history[:1]


def test_interrupted_save_keeps_previous_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = Solver._save
    real_fsync = os.fsync

    def killed_during_fsync(fd: int) -> None:
        raise KeyboardInterrupt("killed while saving")

    def save(self: Solver, epoch: int) -> None:
        if epoch == 1:  # the data is written to a temporary file, then the process dies
            monkeypatch.setattr(os, "fsync", killed_during_fsync)
        real_save(self, epoch)

    monkeypatch.setattr(Solver, "_save", save)
    solver, xp = make_solver()
    with xp.enter(), pytest.raises(KeyboardInterrupt):
        solver.train()
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(Solver, "_save", real_save)
    checkpoint = load_checkpoint(xp.folder / "checkpoint.th")
    assert len(checkpoint["history"]) == 1  # the checkpoint of epoch 1, complete
    assert not list(xp.folder.glob(".*.tmp"))
    # Running the XP again resumes from it.
    resumed, _ = train_xp()
    assert len(resumed.history) == 2
    assert resumed.history[0] == checkpoint["history"][0]


def test_resume_in_process_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, _ = train_xp()
    # Same XP in another Dora folder, interrupted right after its first checkpoint.
    main.dora.dir = main.dora.dir.parent / "other"
    real_save = Solver._save

    def save_then_stop(self: Solver, epoch: int) -> None:
        real_save(self, epoch)
        raise KeyboardInterrupt("stopped after the first epoch")

    monkeypatch.setattr(Solver, "_save", save_then_stop)
    solver, xp = make_solver()
    with xp.enter(), pytest.raises(KeyboardInterrupt):
        solver.train()
    monkeypatch.setattr(Solver, "_save", real_save)
    resumed, _ = train_xp()
    assert resumed.history == reference.history
    assert states_equal(resumed.model.state_dict(), reference.model.state_dict())
    assert resumed.best_state is not None and reference.best_state is not None
    assert states_equal(resumed.best_state, reference.best_state)


def perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value + 1 if value.is_floating_point() else value
            for key, value in state.items()}


def test_continue_from() -> None:
    parent, parent_xp = train_xp("epochs=1")
    path = parent_xp.folder / "checkpoint.th"
    checkpoint = load_checkpoint(path)
    checkpoint["best_state"] = perturbed(checkpoint["state"])  # tell the two apart
    torch.save(checkpoint, path)
    best, _ = make_solver("epochs=1", f"continue_from={parent_xp.sig}")
    assert states_equal(best.model.state_dict(), checkpoint["best_state"])
    assert not best.optimizer.state_dict()["state"]  # a fresh optimizer
    last, xp = make_solver("epochs=1", f"continue_from={parent_xp.sig}",
                           "continue_best=false", "continue_opt=true")
    assert states_equal(last.model.state_dict(), checkpoint["state"])
    for key, value in checkpoint["optimizer"]["state"][0].items():
        assert torch.equal(last.optimizer.state_dict()["state"][0][key], value)
    with xp.enter():
        last.train()  # and it trains from there
    assert len(last.history) == 1


def test_continue_pretrained(tmp_path: Path) -> None:
    _, parent = train_xp("epochs=1")
    repo = tmp_path / "release_models"
    repo.mkdir()
    shutil.copy(parent.folder / "best.th", repo / "mymodel.th")  # as tools.export would
    solver, _ = make_solver("epochs=1", "continue_pretrained=mymodel",
                            f"pretrained_repo={repo}")
    best = load_checkpoint(parent.folder / "checkpoint.th")["best_state"]
    assert states_equal(solver.model.state_dict(), best)
    with pytest.raises(ModelLoadingError, match="Unknown model 'other'"):
        make_solver("continue_pretrained=other", f"pretrained_repo={repo}", model_only=True)


def test_continue_from_errors() -> None:
    with pytest.raises(ConfigError, match="unknown XP signature 'deadbeef'"):
        make_solver(f"continue_from={'deadbeef'}", model_only=True)
    with pytest.raises(ConfigError, match="unknown XP signature '00001234'"):
        make_solver("continue_from=00001234", model_only=True)  # Hydra reads 1234
    untrained = main.get_xp(TINY + ["epochs=3"])
    main.init_xp(untrained)
    with pytest.raises(ConfigError, match=f"XP {untrained.sig} has no checkpoint.*"
                                          f"dora run -f {untrained.sig}"):
        make_solver(f"continue_from={untrained.sig}", model_only=True)


def test_incompatible_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    _, xp = train_xp("epochs=1")
    build = train.get_model

    def other_architecture(cfg: tp.Any) -> torch.nn.Module:
        changed = OmegaConf.merge(cfg, {"hdemucs": {"channels": 6}})
        return build(tp.cast(tp.Any, changed))

    monkeypatch.setattr(train, "get_model", other_architecture)  # as if the code changed
    with pytest.raises(ModelLoadingError, match="dora run --clear .*epochs=1") as error:
        make_solver("epochs=1", model_only=True)
    assert "\n" not in str(error.value) and "checkpoint.th" in str(error.value)


def test_train_set_too_small() -> None:
    solver, xp = make_solver("batch_size=64", "augment.remix.group_size=4")
    with xp.enter(), pytest.raises(ConfigError, match="not one batch of batch_size=64"):
        solver.train()


@pytest.mark.parametrize("argv, message", [
    (["dset.segment=1"], "dset.segment=1 must be longer than dset.shift=1"),
    (["continue_from=1e3"], "quote it"),
    (["weights=[1,1]"], "one non-negative weight per source"),
    (["quant.diffq=1", "quant.qat=8"], "choose one quantizer"),
])
def test_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_solver(*argv, model_only=True)


def test_model_only_solver_has_no_data() -> None:
    solver, _ = make_solver(model_only=True)
    with pytest.raises(RuntimeError, match="model_only"):
        solver.train()


def test_diffq_and_nsdr_selection() -> None:
    pytest.importorskip("diffq")
    solver, xp = train_xp("quant.diffq=1e-4", "quant.min_size=0.01", "test.metric=nsdr",
                          "optim.loss=mse", "optim.clip_grad=1e-3")
    history = solver.history
    assert all("ms" in epoch["train"] for epoch in history)
    assert history[-1]["valid"]["best"] == max(epoch["valid"]["nsdr"] for epoch in history)
    package = torch.load(xp.folder / "best.th", weights_only=False)
    assert package["state"]["__quantized"]
    model = load_model(xp.folder / "best.th")
    assert not any(name.endswith("_diffq") for name, _ in model.named_parameters())
