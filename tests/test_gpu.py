"""Checks that need a CUDA GPU; they run wherever one is present and are skipped
elsewhere (this project's CI machines have none; see docs/training.md for running them on
a GPU machine: `pytest tests/test_gpu.py`)."""
from __future__ import annotations

import logging
import random
import re
import typing as tp
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from demucs import norm, train
from demucs.apply import apply_model
from demucs.checkpoints import get_rng_state, set_rng_state
from demucs.errors import TrainingError
from demucs.cuda_graph import GraphedStep
from demucs.solver import Solver
from demucs.train import main
from helpers import new_xp, norm_steps, tiny_hdemucs, tiny_htdemucs
from tools.synth_dataset import generate_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY = ["model=hdemucs", "hdemucs.channels=4", "hdemucs.depth=4", "hdemucs.nfft=1024",
        "dset.segment=2", "dset.shift=1", "batch_size=2", "epochs=2", "max_batches=2",
        "misc.num_workers=0", "test.sdr=false", "augment.remix.group_size=2",
        "augment.repitch.proba=0", "ema.batch=[0.9]"]
TINY_V4 = ["model=htdemucs", "htdemucs.channels=8", "htdemucs.t_layers=1",
           "htdemucs.nfft=1024"] + TINY[4:]


@pytest.fixture
def dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    generate_dataset(tmp_path / "musdb", tracks=3, seconds=3, valid_tracks=1, test_tracks=1)
    monkeypatch.setenv("MUSDB_PATH", str(tmp_path / "musdb"))
    monkeypatch.setenv("METADATA_PATH", str(tmp_path / "metadata"))
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    return tmp_path


@pytest.mark.parametrize("argv,amp", [(TINY, "null"), (TINY, "bf16"), (TINY, "fp16"),
                                      (TINY_V4, "bf16")], ids=["f32", "bf16", "fp16", "v4-bf16"])
def test_training_on_cuda(dataset: Path, argv: list[str], amp: str,
                          caplog: pytest.LogCaptureFixture) -> None:
    xp = new_xp(argv + [f"optim.amp={amp}"])
    with xp.enter(), caplog.at_level(logging.INFO, logger="demucs.solver"):
        train.run(xp.cfg)
        solver = train.get_solver(xp.cfg, model_only=True)  # resumes the finished XP
    assert next(solver.model.parameters()).is_cuda
    history = main.get_xp_history(xp)
    assert len(history) == 2 and "nsdr" in history[-1]["test"]
    assert all(torch.isfinite(torch.tensor(value)) for value in history[-1]["train"].values())
    assert solver.best_state is not None
    assert {value.dtype for value in solver.best_state.values()
            if value.is_floating_point()} == {torch.float32}
    # each epoch's line gives the memory the allocator reserved out of the card's total
    peaks = re.findall(r"Epoch \d done \| .* \| peak memory ([\d.]+) of the GPU's ([\d.]+) "
                       r"GiB reserved \| XP ETA", caplog.text)
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    assert len(peaks) == 2 and all(0 < float(peak) < float(card) == round(total, 1)
                                   for peak, card in peaks)


def test_gpu_generator_state_round_trip() -> None:
    """A checkpoint's generator state gives the same GPU draws again, also from an
    earlier checkpoint's list of one state per GPU, longer than this machine's."""
    torch.cuda.manual_seed(3)
    torch.rand(8, device="cuda")
    state = get_rng_state()
    expected = torch.rand(8, device="cuda")
    torch.rand(100, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(8, device="cuda"), expected)
    set_rng_state(dict(state, cuda=[state["cuda"]] * (torch.cuda.device_count() + 7)))
    assert torch.equal(torch.rand(8, device="cuda"), expected)


def test_out_of_memory_on_cuda_is_one_line(dataset: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A real CUDA out-of-memory error in a training batch (an allocation no GPU holds)."""
    real = Solver._forward

    def huge(self: Solver, mix: torch.Tensor) -> torch.Tensor:
        torch.empty(2 ** 45, device=mix.device)  # 128 TiB of float32
        return real(self, mix)

    monkeypatch.setattr(Solver, "_forward", huge)
    xp = new_xp(TINY)
    with xp.enter(), pytest.raises(TrainingError, match=(
            r"^cuda out of memory at epoch 1, batch 1 \(batch_size=2, [\d.]+ of the GPU's "
            r"[\d.]+ GiB reserved\): training stopped, no epoch was checkpointed; lower "
            r"batch_size")):
        train.get_solver(xp.cfg).train()


@pytest.mark.parametrize("argv,amp,accumulate", [
    (TINY, "null", 1), (TINY, "null", 2), (TINY, "bf16", 1), (TINY_V4, "bf16", 1)],
    ids=["f32", "f32-accumulate", "bf16", "v4-bf16"])
def test_cuda_graph_training_equals_eager(dataset: Path, argv: list[str], amp: str,
                                          accumulate: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`optim.cuda_graph=true` replays the captured forward and backward: the same training
    history as the eager one (two batches per epoch; with accumulation, one optimizer step
    on the gradients of both)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    argv = argv + [f"optim.amp={amp}", f"optim.accumulate={accumulate}"]
    histories, solvers = [], []
    for graph in ["false", "true"]:
        xp = new_xp(argv + [f"optim.cuda_graph={graph}"])
        with xp.enter():
            solver = train.get_solver(xp.cfg)
            solver.train()
        histories.append(solver.history)
        solvers.append(solver)
    assert solvers[0].graphed is None and isinstance(solvers[1].graphed, GraphedStep)
    assert solvers[1].graphed.shape[0] == 2  # TINY's batch_size
    eager, graphed = (history[-1]["train"] for history in histories)
    assert eager.keys() == graphed.keys()
    for key in eager:
        assert graphed[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-6), key


@pytest.mark.parametrize("make", [tiny_hdemucs, tiny_htdemucs], ids=["hdemucs", "htdemucs"])
def test_separation_cuda_equals_cpu(make: tp.Callable[[], torch.nn.Module],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # cuDNN convolutions default to TF32 (10-bit mantissa, errors near 1e-3): compare in
    # full float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = make().eval()
    mix = torch.randn(1, 2, 3 * 44100)
    random.seed(0)
    on_cpu = apply_model(model, mix, shifts=1, split=True, overlap=0.25)
    random.seed(0)
    on_cuda = apply_model(model, mix, shifts=1, split=True, overlap=0.25, device="cuda")
    assert on_cuda.device.type == "cpu"  # the result comes back where the mix is
    assert (on_cuda - on_cpu).abs().max() <= 1e-4 * on_cpu.abs().max() + 1e-5


@pytest.mark.parametrize("groups", [1, 4])
def test_fast_group_norm_on_cuda(groups: int) -> None:
    """The norms' CUDA path (parallel statistics) against PyTorch's kernel."""
    torch.manual_seed(0)
    x = (torch.randn(4, 48, 20000, device="cuda") * 3 + 1).requires_grad_()
    module = norm.GroupNorm(groups, 48).cuda()
    torch.nn.init.normal_(module.weight)
    out = module(x)
    assert type(out.grad_fn).__name__ == "_GroupNormBackward"  # the fast path
    reference = F.group_norm(x, groups, module.weight, module.bias)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, module.weight, module.bias), grad)
    theirs = torch.autograd.grad(reference, (x, module.weight, module.bias), grad)
    for a, b in zip(ours, theirs):
        assert (a - b).norm() <= 1e-4 * b.norm()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = module(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("then", [torch.nn.GLU(1), torch.nn.GELU()], ids=["glu", "gelu"])
@pytest.mark.parametrize("with_gain", [False, True], ids=["", "layerscale"])
def test_norm_and_activation_in_one_step_on_cuda(dtype: torch.dtype, then: torch.nn.Module,
                                                 with_gain: bool) -> None:
    """On CUDA, under autocast for bf16, a norm, its activation and a LayerScale as one
    step give the values and gradients of the steps apart, bit for bit (what the backward
    computes again is what the forward computed)."""
    torch.manual_seed(0)
    rows = 8 if dtype == torch.float32 else 2048  # the freq DConvs' many rows: bf16 only
    x = (torch.randn(rows, 96, 336, device="cuda") * 2 + 1).to(dtype).requires_grad_()
    steps = norm_steps(96, then, with_gain, device="cuda")
    inputs = tuple([x] + [p for step in steps for p in step.parameters()])
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        fused = norm.FusedSequential(*steps)(x)
        apart = torch.nn.Sequential(*steps)(x)
    assert type(fused.grad_fn).__name__ == "_GroupNormBackward"
    assert torch.equal(fused, apart)
    grad = torch.randn_like(fused)
    for a, b in zip(torch.autograd.grad(fused, inputs, grad),
                    torch.autograd.grad(apart, inputs, grad)):
        assert torch.equal(a, b)
