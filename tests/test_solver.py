"""The training loop, in process: history, checkpoints, best state, resume, continue_from.

A tiny hybrid model trains for 1 or 2 epochs of 2 batches on a synthetic MusDB (3 s
tracks), inside a temporary Dora folder.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import torch
from dora.xp import XP
from omegaconf import OmegaConf

from demucs import solver as solver_module
from demucs import checkpoints, checks, train
from demucs.errors import ConfigError, ModelLoadingError, TrainingError
from demucs.grids._explorers import summarize
from demucs.checkpoints import get_rng_state, load_checkpoint, set_rng_state
from demucs.checks import check_optim
from demucs.cuda_graph import GraphedStep, check_cuda_graph
from demucs.losses import reco_losses
from demucs.solver import Solver
from demucs.states import load_model
from demucs.svd import svd_penalty
from demucs.train import main
from demucs.utils import cpu_has_bf16, peak_memory, reset_peak_memory
from helpers import SOURCES, make_solver, new_xp, same_state

TINY = ["model=hdemucs", "hdemucs.channels=4", "hdemucs.depth=4", "hdemucs.nfft=1024",
        "dset.segment=2", "dset.shift=1", "batch_size=2", "epochs=2", "max_batches=2",
        "misc.num_workers=0", "misc.num_prints=1", "test.sdr=false",
        "augment.remix.group_size=2", "augment.repitch.proba=0"]
MUSDB = {"tracks": 3, "seconds": 3, "valid_tracks": 1, "test_tracks": 1}  # `musdb` fixture's size
# Every test runs in a temporary Dora folder, with MUSDB_PATH set to the `musdb` fixture.
pytestmark = pytest.mark.usefixtures("xp_folder")


def train_xp(*argv: str) -> tuple[Solver, XP]:
    solver, xp = make_solver(TINY, *argv)
    with xp.enter():
        solver.train()
    return solver, xp


def test_train_writes_history_and_checkpoints(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="demucs.solver"):
        solver, xp = train_xp("ema.batch=[0.9]", "ema.epoch=[0.5]", "save_every=1",
                              "svd.penalty=1e-3", "svd.min_size=0", "test.every=1",
                              "misc.num_prints=2")
    for name in ["checkpoint.th", "checkpoint_1.th", "checkpoint_2.th", "best.th",
                 "history.json", "curves.png"]:
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
    assert same_state(package["state"], solver.best_state)
    assert package["training_args"]["hdemucs"]["channels"] == 4
    model: tp.Any = load_model(xp.folder / "best.th")
    assert list(model.sources) == list(SOURCES)
    checkpoint = load_checkpoint(xp.folder / "checkpoint.th")
    assert same_state(checkpoint["state"], solver.model.state_dict())
    # The original's layout: one entry per EMA, plus our random generator states.
    assert {"ema_batch_0", "ema_epoch_0", "rng", "penalty_rng"} <= set(checkpoint)
    assert checkpoint["ema_batch_0"]["count"] > checkpoint["ema_epoch_0"]["count"] > 0
    assert load_checkpoint(xp.folder / "checkpoint_1.th")["history"] == history[:1]
    # The log: each training progress line with the epoch's ETA, and after each epoch
    # its time, its peak memory (here the process's resident one) and the XP's ETA.
    assert re.search(r"Train \| Epoch 1 \| 1/2 \| .* \| Eta [\d.]+s", caplog.text)
    ends = re.findall(r"Epoch (\d) done \| [\d.]+s per epoch \| peak memory ([\d.]+) GiB "
                      r"resident \| XP ETA ([\d.]+)s \((\d) epochs left\)", caplog.text)
    assert [(epoch, left) for epoch, _, _, left in ends] == [("1", "1"), ("2", "0")]
    assert all(float(peak) > 0.1 for _, peak, _, _ in ends)
    assert float(ends[0][2]) > 0 and float(ends[1][2]) == 0


def test_peak_memory_counts_from_its_reset() -> None:
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    before = peak_memory(cpu)
    assert before is not None and before > 0
    block = torch.ones(2 ** 26)  # 256 MiB, resident once written
    assert tp.cast(float, peak_memory(cpu)) > before + 0.2
    del block  # glibc hands blocks this large back to the system
    reset_peak_memory(cpu)
    assert tp.cast(float, peak_memory(cpu)) < before + 0.2


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
    solver, xp = make_solver(TINY)
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


@pytest.mark.parametrize("argv", [
    [],
    # bf16 with accumulation: the EMA over optimizer steps and the float32 states resume too
    ["optim.amp=bf16", "optim.accumulate=2", "ema.batch=[0.9]", "ema.epoch=[0.5]"]])
def test_resume_in_process_is_exact(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    reference, _ = train_xp(*argv)
    # Same XP in another Dora folder, interrupted right after its first checkpoint.
    main.dora.dir = main.dora.dir.parent / "other"
    real_save = Solver._save

    def save_then_stop(self: Solver, epoch: int) -> None:
        real_save(self, epoch)
        raise KeyboardInterrupt("stopped after the first epoch")

    monkeypatch.setattr(Solver, "_save", save_then_stop)
    solver, xp = make_solver(TINY, *argv)
    with xp.enter(), pytest.raises(KeyboardInterrupt):
        solver.train()
    monkeypatch.setattr(Solver, "_save", real_save)
    resumed, _ = train_xp(*argv)
    assert resumed.history == reference.history
    assert same_state(resumed.model.state_dict(), reference.model.state_dict())
    assert resumed.best_state is not None and reference.best_state is not None
    assert same_state(resumed.best_state, reference.best_state)


class FakeCuda:
    """The GPU generators of a machine with `count` GPUs, this worker on GPU `current`."""

    def __init__(self, count: int, current: int) -> None:
        self.states = [torch.tensor([index], dtype=torch.uint8) for index in range(count)]
        self.current = current

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ["is_available", "get_rng_state", "set_rng_state", "get_rng_state_all",
                     "set_rng_state_all"]:
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def is_available(self) -> bool:
        return True

    def get_rng_state(self, device: int = -1) -> torch.Tensor:
        return self.states[self.current if device == -1 else device].clone()

    def set_rng_state(self, state: torch.Tensor, device: int = -1) -> None:
        self.states[self.current if device == -1 else device] = state.clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [state.clone() for state in self.states]

    def set_rng_state_all(self, states: list[torch.Tensor]) -> None:
        for device, state in enumerate(states):
            self.states[device] = state.clone()  # IndexError past the last GPU


def test_gpu_generator_state_moves_between_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint keeps the generator of the GPU the worker trains on, and restores it
    into the GPU the resumed worker trains on, whatever the GPUs of either machine: an
    XP of an 8-GPU box resumes on a 1-GPU one, and its second worker (GPU 1) resumes
    where the first one was, not at the untouched state of the first one's GPU 1."""
    saving = FakeCuda(count=8, current=0)
    saving.states[0] = torch.tensor([42], dtype=torch.uint8)  # drawn from
    saving.install(monkeypatch)
    state = get_rng_state()
    assert torch.equal(state["cuda"], torch.tensor([42], dtype=torch.uint8))
    for count, current in [(1, 0), (8, 1)]:
        resuming = FakeCuda(count=count, current=current)
        resuming.install(monkeypatch)
        set_rng_state(state)
        assert resuming.states[current].item() == 42
        earlier = dict(state, cuda=saving.get_rng_state_all())  # a list per visible GPU
        resuming.states[current] = torch.tensor([0], dtype=torch.uint8)
        set_rng_state(earlier)
        assert resuming.states[current].item() == 42


def perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value + 1 if value.is_floating_point() else value
            for key, value in state.items()}


def test_continue_from() -> None:
    parent, parent_xp = train_xp("epochs=1")
    path = parent_xp.folder / "checkpoint.th"
    checkpoint = load_checkpoint(path)
    checkpoint["best_state"] = perturbed(checkpoint["state"])  # tell the two apart
    torch.save(checkpoint, path)
    best, _ = make_solver(TINY, "epochs=1", f"continue_from={parent_xp.sig}")
    assert same_state(best.model.state_dict(), checkpoint["best_state"])
    assert not best.optimizer.state_dict()["state"]  # a fresh optimizer
    last, xp = make_solver(TINY, "epochs=1", f"continue_from={parent_xp.sig}",
                           "continue_best=false", "continue_opt=true")
    assert same_state(last.model.state_dict(), checkpoint["state"])
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
    solver, _ = make_solver(TINY, "epochs=1", "continue_pretrained=mymodel",
                            f"pretrained_repo={repo}")
    best = load_checkpoint(parent.folder / "checkpoint.th")["best_state"]
    assert same_state(solver.model.state_dict(), best)
    with pytest.raises(ModelLoadingError, match="Unknown model 'other'"):
        make_solver(TINY, "continue_pretrained=other", f"pretrained_repo={repo}", model_only=True)


def test_continue_from_errors() -> None:
    with pytest.raises(ConfigError, match="unknown XP signature 'deadbeef'"):
        make_solver(TINY, f"continue_from={'deadbeef'}", model_only=True)
    with pytest.raises(ConfigError, match="unknown XP signature '00001234'"):
        make_solver(TINY, "continue_from=00001234", model_only=True)  # Hydra reads 1234
    untrained = new_xp(TINY + ["epochs=3"])
    _, trained = train_xp("epochs=1")
    with pytest.raises(ConfigError, match=f"XP {untrained.sig} has not trained yet.*"
                                          f"dora run -f {untrained.sig}.*XPs with a "
                                          f"checkpoint: {trained.sig}\\.$"):
        make_solver(TINY, f"continue_from={untrained.sig}", model_only=True)


def test_incompatible_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    _, xp = train_xp("epochs=1")
    build = train.get_model

    def other_architecture(cfg: tp.Any) -> torch.nn.Module:
        changed = OmegaConf.merge(cfg, {"hdemucs": {"channels": 6}})
        return build(tp.cast(tp.Any, changed))

    monkeypatch.setattr(train, "get_model", other_architecture)  # as if the code changed
    with pytest.raises(ModelLoadingError, match="dora run --clear .*epochs=1") as error:
        make_solver(TINY, "epochs=1", model_only=True)
    assert "\n" not in str(error.value) and "checkpoint.th" in str(error.value)


def test_checkpoint_part_failing_in_our_code_keeps_the_xp(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A part that fails with an error of the loading code (not a config mismatch): no
    advice to delete the XP, the file untouched, the cause kept for `misc.verbose`."""
    _, xp = train_xp("epochs=1")
    path = xp.folder / "checkpoint.th"
    before = path.read_bytes()

    def broken(state: tp.Any) -> None:
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr(solver_module, "set_rng_state", broken)
    with pytest.raises(ModelLoadingError) as error:
        make_solver(TINY, "epochs=1", model_only=True)
    message = str(error.value)
    assert f"{path}: loading its 'rng' failed (TypeError: 'NoneType'" in message
    assert "kept" in message and "misc.verbose=true" in message
    assert "--clear" not in message and "\n" not in message
    assert isinstance(error.value.__cause__, TypeError)
    assert path.read_bytes() == before


def test_train_set_too_small() -> None:
    with pytest.raises(ConfigError, match="not one batch of batch_size=64"):
        make_solver(TINY, "batch_size=64", "augment.remix.group_size=4")


@pytest.mark.parametrize("argv, message", [
    (["continue_from=1e3"], "quote it"),
    (["quant.diffq=1", "quant.qat=8"], "choose one quantizer"),
])
def test_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_solver(TINY, *argv, model_only=True)


@pytest.mark.parametrize("argv, message", [
    (["dset.segment=1"], "dset.segment=1 must be longer than dset.shift=1"),
    (["weights=[1,1]"], "one non-negative weight per source"),
])
def test_training_errors(argv: list[str], message: str) -> None:
    """What only training needs: refused when it starts, not when the XP is listed."""
    cfg = main.get_xp(TINY + argv).cfg
    with pytest.raises(ConfigError, match=message):
        checks.check_training(cfg)


def test_model_only_solver_has_no_data() -> None:
    solver, _ = make_solver(TINY, model_only=True)
    with pytest.raises(RuntimeError, match="model_only"):
        solver.train()


def test_diffq_and_nsdr_selection() -> None:
    solver, xp = train_xp("quant.diffq=1e-4", "quant.min_size=0.01", "test.metric=nsdr",
                          "optim.loss=mse", "optim.clip_grad=1e-3")
    history = solver.history
    assert all("ms" in epoch["train"] for epoch in history)
    assert history[-1]["valid"]["best"] == max(epoch["valid"]["nsdr"] for epoch in history)
    package = torch.load(xp.folder / "best.th", weights_only=False)
    assert package["state"]["__quantized"]
    model = load_model(xp.folder / "best.th")
    assert not any(name.endswith("_diffq") for name, _ in model.named_parameters())


# ---------------------------------------------------------------------------------------
# The original's training facts, one by one (no training: stages are stubbed)


def test_unknown_test_metric_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match="test.metric='sdr' is not a valid metric; choose "
                                          "one of: loss, reco, ms, nsdr, reco_drums"):
        main.get_xp(TINY + ["test.metric=sdr"])


def test_valid_metrics_are_weighted() -> None:
    solver, _ = make_solver(TINY, "weights=[1,1,0.1,0.1]", "valid_apply=false", model_only=True)
    torch.manual_seed(0)
    streams = torch.randn(1, 5, 2, 44100)  # mixture + 4 sources (B, 1 + S, C, T)
    solver.model.eval()
    with torch.no_grad():
        metrics = solver._valid_step(streams)
    weights = [1, 1, 0.1, 0.1]
    for name in ("nsdr", "reco"):
        values = [metrics[f"{name}_{source}"] for source in SOURCES]
        weighted = sum(w * x for w, x in zip(weights, values)) / sum(weights)
        assert metrics[name] == pytest.approx(weighted, rel=1e-5)
        assert metrics[name] != pytest.approx(sum(values) / 4, rel=1e-3)
    assert metrics["loss"] == metrics["reco"] and metrics["ms"] == 0.


def test_mse_loss_and_reco() -> None:
    sources = torch.zeros(2, 4, 2, 10)
    estimate = sources.clone()
    estimate[0] += 1.  # example 0: mse 1 everywhere
    estimate[1] += 3.  # example 1: mse 9
    loss, reco = reco_losses("mse", estimate, sources)
    assert loss.tolist() == [5.] * 4  # mean over the batch of the per-example mse
    assert reco.tolist() == [2.] * 4  # mean over the batch of their root


@pytest.mark.parametrize("max_batches, expected", [(None, 10), (0, 1), (3, 4), (20, 10)])
def test_max_batches_plus_one(max_batches: tp.Optional[int], expected: int) -> None:
    solver, _ = make_solver(TINY, model_only=True)
    solver.args.max_batches = max_batches
    assert len(list(solver._batches(list(range(10)), "Test"))) == expected


CANDIDATES = {  # valid metrics of each candidate at one epoch
    "main": {"loss": 0.5, "nsdr_vocals": 2.0},
    "ema_batch_0": {"loss": 0.4, "nsdr_vocals": 3.0},
    "ema_batch_1": {"loss": 0.4, "nsdr_vocals": 3.5},  # ties on loss with ema_batch_0
    "ema_epoch_0": {"loss": 0.6, "nsdr_vocals": 1.0},
}


def stub_validation(monkeypatch: pytest.MonkeyPatch, candidates: dict[str, dict]) -> None:
    monkeypatch.setattr(Solver, "_validate",
                        lambda self, epoch, name: dict(candidates[name]))


@pytest.mark.parametrize("metric, chosen", [("loss", "ema_batch_0"),
                                            ("nsdr_vocals", "ema_batch_1")])
def test_candidate_choice(monkeypatch: pytest.MonkeyPatch, metric: str, chosen: str) -> None:
    solver, _ = make_solver(TINY, "ema.batch=[0.9,0.99]", "ema.epoch=[0.5]",
                            f"test.metric={metric}", model_only=True)
    stub_validation(monkeypatch, CANDIDATES)
    solver.history[:] = [{"valid": {"loss": 0.45, "nsdr_vocals": 3.2}}]
    valid = solver._valid_stage(1)
    # The original's layout: sub-dicts, then the choice merged after each kind of EMA.
    assert list(valid) == ["main", "ema_batch_0", "ema_batch_1", "loss", "nsdr_vocals",
                           "bname", "ema_epoch_0", "best"]
    assert valid["bname"] == chosen  # strictly better only: a tie keeps the first
    assert all(valid[key] == value for key, value in CANDIDATES[chosen].items())
    # best over the epochs so far; this epoch is better, so its choice is the best state.
    assert valid["best"] == CANDIDATES[chosen][metric]
    ema = solver.emas["batch"][0 if chosen == "ema_batch_0" else 1]
    assert solver.best_state is not None
    assert all(torch.equal(solver.best_state[key], value) for key, value in ema.state.items())


@pytest.mark.parametrize("train_valid, replaced", [(False, False), (True, True)])
def test_best_state_only_on_a_best_epoch(monkeypatch: pytest.MonkeyPatch, train_valid: bool,
                                         replaced: bool) -> None:
    solver, _ = make_solver(TINY, f"dset.train_valid={str(train_valid).lower()}", model_only=True)
    stub_validation(monkeypatch, {"main": {"loss": 0.5}})
    solver.history[:] = [{"valid": {"loss": 0.3}}]
    solver.best_state = previous = {"marker": torch.zeros(1)}
    valid = solver._valid_stage(1)
    assert valid["best"] == 0.3
    assert (solver.best_state is not previous) == replaced


@pytest.mark.parametrize("epochs_done, reco, loss, stops", [
    (100, 0.26, "l1", True), (99, 0.26, "l1", False), (100, 0.24, "l1", False),
    (180, 0.19, "l1", True), (179, 0.19, "l1", False), (100, 0.26, "mse", False)])
def test_divergence_stop(monkeypatch: pytest.MonkeyPatch, epochs_done: int, reco: float,
                         loss: str, stops: bool) -> None:
    """l1 only: from epoch index 100 a valid reco above 0.25, from 180 above 0.18, of the
    live model stops the training after a last test (with museval when test.sdr)."""
    solver, xp = make_solver(TINY, f"epochs={epochs_done + 2}", "test.every=1000", "test.sdr=true",
                             f"optim.loss={loss}", model_only=True)
    stub_validation(monkeypatch, {"main": {"loss": reco, "reco": reco}})
    tests: list[bool] = []

    def test_stage(self: Solver, compute_sdr: bool) -> dict[str, float]:
        tests.append(compute_sdr)
        return {"nsdr": 0.}

    monkeypatch.setattr(Solver, "_train_stage", lambda self, epoch: {"loss": 0.1})
    monkeypatch.setattr(Solver, "_test_stage", test_stage)
    monkeypatch.setattr(Solver, "_save", lambda self, epoch: None)
    solver.history[:] = [{"valid": {"loss": 0.1, "main": {"reco": 0.1}}}] * epochs_done
    with xp.enter():
        solver.train()
    trained = len(solver.history) - epochs_done
    if stops:
        assert trained == 1 and tests == [True]  # tested as the last epoch, then stopped
    else:
        assert trained == 2 and tests == [True]  # only the real last epoch is tested


# ---------------------------------------------------------------------------------------
# Mixed precision, gradient accumulation, a loss that becomes NaN


@pytest.mark.parametrize("argv, message", [
    (["optim.amp=fp32"], "optim.amp='fp32' is not valid; choose one of: null"),
    (["optim.accumulate=0"], "optim.accumulate=0: give a whole number"),
    (["optim.accumulate=1.5"], "optim.accumulate=1.5: give a whole number"),
])
def test_optim_errors_at_start_up(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        main.get_xp(TINY + argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused without CUDA only")
@pytest.mark.parametrize("argv, message", [
    (["optim.amp=fp16"], "optim.amp=fp16 needs a CUDA GPU"),
    (["optim.cuda_graph=true"], "optim.cuda_graph=true needs a CUDA GPU"),
])
def test_cuda_only_options(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        main.get_xp(TINY + argv)


X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {}\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd {}\n"


@pytest.mark.parametrize("text, has", [
    (X86.format("avx512_bf16"), True), (X86.format("amx_bf16"), True), (X86.format(""), False),
    (ARM.format("bf16 i8mm"), True), (ARM.format("sve"), False), ("processor\t: 0\n", None),
    (None, None)])
def test_cpu_has_bf16(text: tp.Optional[str], has: tp.Optional[bool], tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    if text is not None:
        cpuinfo.write_text(text)
    assert cpu_has_bf16(cpuinfo) is has


@pytest.mark.parametrize("flags, amp, warned", [
    ("avx512_bf16", "bf16", False), ("", "bf16", True), ("", None, False)])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(
        flags: str, amp: tp.Optional[str], warned: bool, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """bf16 is emulated there (a step 2 to 16 times slower, bench/README.md): said once
    when training starts, not refused, as it still saves memory."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(X86.format(flags))
    monkeypatch.setattr(checks, "cpu_has_bf16", lambda: cpu_has_bf16(cpuinfo))
    solver, xp = make_solver(TINY, "epochs=1", "max_batches=1", f"optim.amp={amp or 'null'}")
    with xp.enter(), caplog.at_level(logging.WARNING, logger="demucs.checks"):
        solver.train()
    assert caplog.text.count("this CPU has no bf16 instructions") == warned
    caplog.clear()
    with xp.enter(), caplog.at_level(logging.WARNING, logger="demucs.checks"):
        solver.train()  # nothing left to train: nothing said
    assert "bf16 instructions" not in caplog.text


@pytest.mark.parametrize("argv, model, message", [
    (["quant.diffq=1e-4"], "hdemucs", "does not go with quantization"),
    ([], "ddp", "trains on one GPU; drop -d"),
    ([], "htdemucs-shift", "would freeze the random positional shifts"),
    ([], "htdemucs-cape", "would freeze the random positional shifts"),
])
def test_cuda_graph_refusals(argv: list[str], model: str, message: str,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """What the CUDA graphs cannot hold fails at start-up (`Solver` checks these on the
    GPU machine; the check itself needs no GPU)."""
    from demucs import distrib
    from helpers import tiny_hdemucs, tiny_htdemucs
    check_cuda_graph(main.get_xp(TINY).cfg, tiny_htdemucs())  # the default HTDemucs is fine
    args = main.get_xp(TINY + argv).cfg
    if model == "ddp":
        monkeypatch.setattr(distrib, "world_size", lambda: 2)
    makers: dict[str, tp.Callable[[], torch.nn.Module]] = {
        "hdemucs": tiny_hdemucs, "ddp": tiny_hdemucs,
        "htdemucs-shift": lambda: tiny_htdemucs(t_sin_random_shift=2),
        "htdemucs-cape": lambda: tiny_htdemucs(t_emb="cape")}
    with pytest.raises(ConfigError, match=message):
        check_cuda_graph(args, makers[model]())


def emulated_graphs(module: torch.nn.Module, sample_args: tuple[torch.Tensor, ...],
                    allow_unused_input: bool = False) -> torch.nn.Module:
    """A CPU stand-in for `torch.cuda.make_graphed_callables(module, sample_args)` with
    the semantics the solver must live with: each call copies its input into a static
    buffer, and returns the output and, in the backward, the parameters' gradients as
    aliases of static buffers that the next call overwrites. Calls are counted in
    `module.replays`."""
    params = tuple(module.parameters())
    static_input = sample_args[0].clone()
    static_grads: list[tp.Optional[torch.Tensor]] = []
    eager, training = module.forward, module.training
    replays: list[tuple[int, ...]] = []

    class Graphed(torch.autograd.Function):
        @staticmethod
        def forward(ctx: tp.Any, mix: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
            static_input.copy_(mix)
            replays.append(tuple(mix.shape))
            with torch.enable_grad():
                ctx.output = eager(static_input)
            return ctx.output.detach()

        @staticmethod
        def backward(ctx: tp.Any, grad: torch.Tensor) -> tuple[tp.Optional[torch.Tensor], ...]:
            grads = torch.autograd.grad(ctx.output, params, grad, allow_unused=True)
            if not static_grads:
                static_grads.extend(None if g is None else torch.empty_like(g) for g in grads)
            for buffer, value in zip(static_grads, grads):
                if buffer is not None and value is not None:
                    buffer.copy_(value)
            return (None, *(None if b is None else b.detach() for b in static_grads))

    def forward(mix: torch.Tensor) -> torch.Tensor:
        if module.training != training:
            return eager(mix)
        return tp.cast(torch.Tensor, Graphed.apply(mix, *params))
    module.forward = forward  # type: ignore[method-assign]
    module.replays = replays  # type: ignore[assignment]
    return module


@pytest.fixture
def cuda_options_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lift the start-up refusal of the CUDA-only options (`optim.amp=fp16`,
    `optim.cuda_graph`) without CUDA, so that their code paths can run here (PyTorch's
    gradient scaler works on the CPU too)."""
    monkeypatch.setattr(checks, "check_optim", lambda optim, cuda: check_optim(optim, True))


@pytest.fixture
def graphs_on_cpu(cuda_options_on_cpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`optim.cuda_graph` on the CPU, with `emulated_graphs` for CUDA's."""
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", emulated_graphs)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_cuda_graph_bookkeeping(accumulate: int, graphs_on_cpu: None) -> None:
    """The solver's side of `optim.cuda_graph`, with the graphs emulated on the CPU: the
    eager history bit for bit, every batch replayed, and gradients accumulated over two
    batches (a `.grad` sharing the graph's gradient buffers would double the second
    batch's gradients and lose the first's)."""
    argv = ["batch_size=1", "augment.remix.group_size=1", "max_batches=1", "epochs=2",
            f"optim.accumulate={accumulate}"]
    graphed, _ = train_xp(*argv, "optim.cuda_graph=true")
    assert isinstance(graphed.graphed, GraphedStep)
    assert graphed.model.replays == [(1, 2, 44100)] * 4  # type: ignore[union-attr]
    eager, _ = train_xp(*argv)
    assert graphed.history == eager.history
    for mine, theirs in zip(graphed.model.parameters(), eager.model.parameters()):
        assert torch.equal(mine, theirs)


def test_graphed_step_runs_other_shapes_and_eval_eagerly(graphs_on_cpu: None) -> None:
    from helpers import tiny_hdemucs
    model = tiny_hdemucs(channels=4).train()
    step = GraphedStep(model, torch.randn(2, 2, 44100))
    replays: list[tuple[int, ...]] = model.replays  # type: ignore[assignment]
    assert all(param.grad is not None and not param.grad.any()
               for param in model.parameters())  # zeroed in place from now on
    step(torch.randn(2, 2, 44100))
    out = step(torch.randn(1, 2, 44100))  # a smaller batch: eager
    assert len(replays) == 1 and out.shape[0] == 1 and out.grad_fn is not None
    model.eval()
    with torch.no_grad():
        step(torch.randn(2, 2, 44100))
    assert len(replays) == 1


def test_bf16_training_keeps_float32_state() -> None:
    solver, xp = train_xp("epochs=1", "optim.amp=bf16", "ema.batch=[0.9]")
    train = solver.history[0]["train"]
    assert all(np.isfinite(value) for value in train.values())
    assert solver.best_state is not None
    for state in (solver.model.state_dict(), solver.best_state, solver.emas["batch"][0].state):
        assert {value.dtype for value in state.values() if value.is_floating_point()} == {
            torch.float32}
    assert "skipped" not in train  # only fp16 skips steps
    assert load_checkpoint(xp.folder / "checkpoint.th")["scaler"] == {}


def test_svd_penalty_stays_float32_under_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The penalty is of the float32 weights: it is computed outside autocast (with
    `svd.powm`, autocast ran its power iterations in bf16, 1 % off on an HDemucs)."""
    seen: list[tuple[bool, torch.dtype]] = []

    def penalty(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        value = svd_penalty(*args, **kwargs)
        assert isinstance(value, torch.Tensor)  # min_size=0: every weight counts
        seen.append((torch.is_autocast_enabled("cpu"), value.dtype))
        return value

    monkeypatch.setattr(solver_module, "svd_penalty", penalty)
    solver, _ = train_xp("epochs=1", "max_batches=2", "optim.amp=bf16", "svd.penalty=1e-3",
                         "svd.powm=true", "svd.min_size=0")
    assert seen == [(False, torch.float32)] * 3  # 2 training batches, then valid's exact one
    assert np.isfinite(solver.history[0]["train"]["penalty"])


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_out_of_memory_stops_with_one_line(amp: tp.Optional[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that runs out of memory (on a GPU: PyTorch's OutOfMemoryError) stops the
    training with one line saying where, what is kept and what to change."""
    real = Solver._train_step

    def out_of_memory_in_second_epoch(self: Solver, sources: torch.Tensor, group: int,
                                      where: tuple[int, int]) -> dict[str, float]:
        if where == (1, 1):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return real(self, sources, group, where)

    monkeypatch.setattr(Solver, "_train_step", out_of_memory_in_second_epoch)
    solver, xp = make_solver(TINY, "epochs=3", f"optim.amp={amp or 'null'}")
    with xp.enter(), pytest.raises(TrainingError) as caught:
        solver.train()
    message = str(caught.value)
    assert message.startswith(
        f"cpu out of memory at epoch 2, batch 2 (batch_size={xp.cfg.batch_size}): training "
        f"stopped, the checkpoint of epoch 1 is kept in {xp.folder / 'checkpoint.th'}; lower "
        "batch_size (optim.accumulate=N keeps the examples per step), or dset.segment")
    assert ("optim.amp=bf16" in message) is (amp is None)  # bf16 offered where it is not on
    assert len(load_checkpoint(xp.folder / "checkpoint.th")["history"]) == 1


@pytest.mark.parametrize("stage,argv,where,fix", [
    ("valid", [], "in the validation of epoch 2 (segments of {segment:.2f} s)",
     "lower model_segment (the length of those segments, by default 4 * dset.segment)."),
    ("valid", ["valid_apply=false"], "in the validation of epoch 2 (whole tracks)",
     "set valid_apply=true to run the model on segments."),
    ("test", ["test.split=false"], "in the test of epoch 2 (whole tracks)",
     "set test.split=true to run the model on segments.")])
def test_out_of_memory_in_validation_or_test_is_one_line(
        stage: str, argv: list[str], where: str, fix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation and test hold one track (or one segment of it) at a time: running out
    of memory there stops with one line naming the setting that runs on less."""
    def out_of_memory(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.")

    if stage == "valid":
        real = Solver._valid_step
        monkeypatch.setattr(Solver, "_valid_step", lambda self, streams: (
            out_of_memory() if self.history else real(self, streams)))
    else:
        monkeypatch.setattr(solver_module, "evaluate", out_of_memory)
    solver, xp = make_solver(TINY, "epochs=2", *argv)
    with xp.enter(), pytest.raises(TrainingError) as caught:
        solver.train()
    assert str(caught.value) == (
        f"cpu out of memory {where.format(segment=solver.model.segment)}: training stopped, "
        f"the checkpoint of epoch 1 is kept in {xp.folder / 'checkpoint.th'}; {fix}")
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert len(load_checkpoint(xp.folder / "checkpoint.th")["history"]) == 1


def test_full_disk_stops_with_one_line_and_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint that cannot be written (here, a full disk at epoch 2) stops the
    training with one line; epoch 1's files stay, and the same command resumes there."""
    real = checkpoints.save_atomic

    epoch = 0

    def full_disk_at_epoch_2(content: tp.Any, path: tp.Any) -> None:
        nonlocal epoch
        epoch += Path(path).name == "best.th"  # the first file that each epoch writes
        if epoch == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(content, path)

    monkeypatch.setattr(checkpoints, "save_atomic", full_disk_at_epoch_2)
    solver, xp = make_solver(TINY, "epochs=3")
    with xp.enter(), pytest.raises(TrainingError) as caught:
        solver.train()
    assert str(caught.value) == (
        "could not save epoch 2: [Errno 28] No space left on device: training stopped, the "
        f"checkpoint of epoch 1 is kept in {xp.folder / 'checkpoint.th'}; free some space "
        "and run the same command to resume.")
    assert len(load_checkpoint(xp.folder / "checkpoint.th")["history"]) == 1
    monkeypatch.setattr(checkpoints, "save_atomic", real)
    resumed, xp = make_solver(TINY, "epochs=3")
    assert len(resumed.history) == 1
    with xp.enter():
        resumed.train()
    assert len(load_checkpoint(xp.folder / "checkpoint.th")["history"]) == 3


class ToDouble(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def skip_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training stages only: validation and the test are skipped."""
    monkeypatch.setattr(Solver, "_valid_stage", lambda self, epoch: {"loss": 0.})
    monkeypatch.setattr(Solver, "_test_stage", lambda self, compute_sdr: {})


def gradients_of_first_step(monkeypatch: pytest.MonkeyPatch, *argv: str,
                            ) -> tuple[list[torch.Tensor], Solver]:
    """The gradients the optimizer sees at its first step, in float64 (so that float
    rounding is negligible), augmentations off, valid and test stages skipped."""
    grads: list[list[torch.Tensor]] = []
    real_step = torch.optim.Adam.step

    def step(self: torch.optim.Optimizer, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        grads.append([p.grad.clone() for group in self.param_groups for p in group["params"]
                      if p.grad is not None])
        return real_step(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    skip_evaluation(monkeypatch)
    solver, xp = make_solver(TINY, "epochs=1", "max_batches=1", *argv)
    solver.model.double()
    solver.augment = torch.nn.Sequential(ToDouble())  # no augmentation
    with xp.enter():
        solver.train()
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    return grads[0], solver


def test_accumulation_equals_a_bigger_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """batch_size=4 and batch_size=2 optim.accumulate=2 see the same 4 examples (same
    shuffle) and give the same gradients, up to float rounding."""
    dora_dir = main.dora.dir
    full, big = gradients_of_first_step(monkeypatch, "batch_size=4",
                                        "augment.remix.group_size=4")
    monkeypatch.setattr(main.dora, "dir", dora_dir.parent / "other")
    accumulated, small = gradients_of_first_step(monkeypatch, "batch_size=2",
                                                 "optim.accumulate=2")
    assert len(full) == len(accumulated) > 10
    for first, second in zip(full, accumulated):
        assert torch.allclose(first, second, rtol=1e-9, atol=1e-12)
    steps = {float(state["step"]) for state in small.optimizer.state.values()}
    assert steps == {1.}  # 2 batches (max_batches=1), 1 optimizer step
    train_big, train_small = big.history[0]["train"], small.history[0]["train"]
    assert train_small["grad"] == pytest.approx(train_big["grad"], rel=1e-9)
    assert train_small["loss"] == pytest.approx(train_big["loss"], rel=1e-9)


def test_out_of_memory_in_validation_with_cuda_graphs(graphs_on_cpu: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The graphs keep their memory through validation: the line offers to drop them."""
    def out_of_memory(self: Solver, streams: torch.Tensor) -> tp.Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.")

    monkeypatch.setattr(Solver, "_valid_step", out_of_memory)
    solver, xp = make_solver(TINY, "epochs=1", "batch_size=1", "augment.remix.group_size=1",
                             "optim.cuda_graph=true")
    with xp.enter(), pytest.raises(TrainingError) as caught:
        solver.train()
    assert str(caught.value).startswith("cpu out of memory in the validation of epoch 1 (")
    assert str(caught.value).endswith(
        "lower model_segment (the length of those segments, by default 4 * dset.segment), "
        "or set optim.cuda_graph=false (the training's CUDA graphs keep their memory "
        "meanwhile).")


def test_a_last_shorter_group_is_scaled_by_its_own_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """4 batches with optim.accumulate=3: a step over the first 3 (each loss scaled by
    1/3), then one over the last (not scaled, where it was scaled by 1/3): each step's
    gradient is the mean of its batches' gradients, as a bigger batch's would be."""
    losses: list[float] = []
    backward: list[float] = []
    real_metrics = Solver._batch_metrics

    def record(self: Solver, estimate: torch.Tensor,
               sources: torch.Tensor, train: bool
                        ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = real_metrics(self, estimate, sources, train)
        losses.append(loss.item())
        return loss, metrics

    monkeypatch.setattr(Solver, "_batch_metrics", record)
    skip_evaluation(monkeypatch)
    solver, xp = make_solver(TINY, "epochs=1", "batch_size=1", "max_batches=3",
                             "augment.remix.group_size=1", "optim.accumulate=3")
    scale = solver.scaler.scale
    solver.scaler.scale = lambda loss: backward.append(loss.item()) or scale(loss)  # type: ignore
    with xp.enter():
        solver.train()
    assert len(losses) == len(backward) == 4
    ratios = [scaled / loss for scaled, loss in zip(backward, losses)]
    assert ratios == pytest.approx([1 / 3] * 3 + [1], rel=1e-6)
    steps = {float(state["step"]) for state in solver.optimizer.state.values()}
    assert steps == {2.}


@pytest.mark.usefixtures("cuda_options_on_cpu")
def test_fp16_skips_and_counts_overflowing_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 run on the CPU, where PyTorch's gradient scaler works too (users are refused
    fp16 there, bf16 being the CPU's half precision): a batch whose loss overflows does
    not stop the training; its step is skipped, counted in `skipped`, its loss is left
    out of the epoch's mean, and the batch EMA does not count it."""
    real_metrics, real_step = Solver._batch_metrics, Solver._optimizer_step
    losses: list[float] = []
    changed: list[bool] = []
    ema_counts: list[float] = []

    def overflow_second(self: Solver, estimate: torch.Tensor,
                        sources: torch.Tensor, train: bool
                        ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = real_metrics(self, estimate, sources, train)
        if torch.is_grad_enabled():  # a training batch, not validation
            loss = loss * math.inf if len(losses) == 1 else loss
            losses.append(loss.item())
        return loss, metrics

    def step(self: Solver) -> dict[str, float]:
        before = [param.detach().clone() for param in self.model.parameters()]
        metrics = real_step(self)
        changed.append(any(not torch.equal(old, param)
                           for old, param in zip(before, self.model.parameters())))
        ema_counts.append(self.emas["batch"][0].count)
        return metrics

    monkeypatch.setattr(Solver, "_batch_metrics", overflow_second)
    monkeypatch.setattr(Solver, "_optimizer_step", step)
    solver, xp = train_xp("epochs=1", "optim.amp=fp16", "ema.batch=[0.9]")
    assert len(losses) == 2 and math.isfinite(losses[0]) and math.isinf(losses[1])
    assert len(changed) == 2 and not changed[1]  # the overflowing step changed nothing
    assert ema_counts == [1., 1.]  # nor the EMA (0.9 * 1 + 1 had it averaged once more)
    train_metrics = solver.history[0]["train"]
    assert train_metrics["skipped"] == pytest.approx(sum(not c for c in changed) / 2)
    assert train_metrics["loss"] == pytest.approx(losses[0])
    scaler = load_checkpoint(xp.folder / "checkpoint.th")["scaler"]
    assert scaler["scale"] < 2. ** 16  # halved at each skipped step, and checkpointed


@pytest.mark.usefixtures("cuda_options_on_cpu")
def test_fp16_stops_when_every_batch_overflows(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Solver._batch_metrics

    def overflow_after_first_epoch(self: Solver, estimate: torch.Tensor, sources: torch.Tensor,
                                   train: bool
                                   ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = real(self, estimate, sources, train)
        return (loss * math.inf if self.history else loss), metrics

    monkeypatch.setattr(Solver, "_batch_metrics", overflow_after_first_epoch)
    solver, xp = make_solver(TINY, "epochs=2", "optim.amp=fp16")
    with xp.enter(), pytest.raises(TrainingError, match="fp16: the training loss overflowed "
                                   "at every batch of epoch 2: training stopped, the "
                                   "checkpoint of epoch 1 is kept"):
        solver.train()
    assert len(load_checkpoint(xp.folder / "checkpoint.th")["history"]) == 1


def test_nan_loss_stops_and_keeps_the_last_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Solver._batch_metrics

    def nan_after_first_epoch(self: Solver, estimate: torch.Tensor,
                              sources: torch.Tensor, train: bool
                        ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = real(self, estimate, sources, train)
        return (loss * float("nan") if self.history else loss), metrics

    monkeypatch.setattr(Solver, "_batch_metrics", nan_after_first_epoch)
    solver, xp = make_solver(TINY, "epochs=2")
    with xp.enter(), pytest.raises(TrainingError, match="loss became nan at epoch 2, batch 1: "
                                                        "training stopped, the checkpoint of "
                                                        "epoch 1 is kept"):
        solver.train()
    assert len(load_checkpoint(xp.folder / "checkpoint.th")["history"]) == 1
