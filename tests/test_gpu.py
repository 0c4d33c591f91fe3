"""Checks that need a CUDA GPU; they run wherever one is present and are skipped
elsewhere (this project's CI machines have none; see docs/training.md for running them on
a GPU machine: `pytest tests/test_gpu.py`)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from demucs import train
from demucs.apply import apply_model
from demucs.train import main
from helpers import new_xp, tiny_hdemucs
from tools.synth_dataset import generate_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY = ["model=hdemucs", "hdemucs.channels=4", "hdemucs.depth=4", "hdemucs.nfft=1024",
        "dset.segment=2", "dset.shift=1", "batch_size=2", "epochs=2", "max_batches=2",
        "misc.num_workers=0", "test.sdr=false", "augment.remix.group_size=2",
        "augment.repitch.proba=0", "ema.batch=[0.9]"]


@pytest.fixture
def dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    generate_dataset(tmp_path / "musdb", tracks=3, seconds=3, valid_tracks=1, test_tracks=1)
    monkeypatch.setenv("MUSDB_PATH", str(tmp_path / "musdb"))
    monkeypatch.setenv("METADATA_PATH", str(tmp_path / "metadata"))
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    return tmp_path


@pytest.mark.parametrize("amp", ["null", "bf16", "fp16"])
def test_training_on_cuda(dataset: Path, amp: str) -> None:
    xp = new_xp(TINY + [f"optim.amp={amp}"])
    with xp.enter():
        train.run(xp.cfg)
        solver = train.get_solver(xp.cfg, model_only=True)  # resumes the finished XP
    assert next(solver.model.parameters()).is_cuda
    history = main.get_xp_history(xp)
    assert len(history) == 2 and "nsdr" in history[-1]["test"]
    assert all(torch.isfinite(torch.tensor(value)) for value in history[-1]["train"].values())
    assert solver.best_state is not None
    assert {value.dtype for value in solver.best_state.values()
            if value.is_floating_point()} == {torch.float32}


def test_separation_cuda_equals_cpu() -> None:
    model = tiny_hdemucs().eval()
    mix = torch.randn(1, 2, 3 * 44100)
    random.seed(0)
    on_cpu = apply_model(model, mix, shifts=1, split=True, overlap=0.25)
    random.seed(0)
    on_cuda = apply_model(model, mix, shifts=1, split=True, overlap=0.25, device="cuda")
    assert on_cuda.device.type == "cpu"  # the result comes back where the mix is
    assert (on_cuda - on_cpu).abs().max() <= 1e-4 * on_cpu.abs().max() + 1e-5
