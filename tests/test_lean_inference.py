"""The memory-lean inference path (no gradients): blocked convolutions, in-place GELU,
one source at a time through the inverse STFT, window sums by region. It computes what
the whole-tensor path (gradients enabled) computes, and never writes into its inputs."""
from __future__ import annotations

import os
import sys
import typing as tp

import pytest
import torch

from demucs import hlayers
from demucs.apply import _divide_by_window_sums, _transition_weight
from demucs.hlayers import HDecLayer, HEncLayer
from demucs.utils import freed_memory_kept, trim_heap

from helpers import tiny_hdemucs, tiny_htdemucs


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few time steps and rows, with remainders, even on tiny models."""
    monkeypatch.setattr(hlayers, "BLOCK_BYTES", 1000)
    monkeypatch.setattr(hlayers, "LEAN_BYTES", 0)
    monkeypatch.setattr(hlayers, "DCONV_ROWS", 3)


def both_paths(model: torch.nn.Module, mix: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """The output without gradients (lean) and with them (whole tensors)."""
    model.eval()
    original = mix.clone()
    with torch.no_grad():
        lean = model(mix)
    assert torch.equal(mix, original)
    with torch.enable_grad():
        whole = model(mix).detach()
    return lean, whole


def assert_same_output(lean: torch.Tensor, whole: torch.Tensor) -> None:
    """Float rounding apart (block sums in another order): 1e-5 of the scale."""
    assert lean.shape == whole.shape
    err = (lean - whole).abs().max().item()
    assert err <= 1e-5 * whole.abs().max().item(), err


HDEMUCS_CASES: tp.Dict[str, tp.Dict[str, tp.Any]] = {
    "81de367c_like": {"cac": False, "norm_starts": 999, "hybrid_old": True},
    "cac_group_norms": {"norm_starts": 2},
    "mixture_phase": {"cac": False, "wiener_iters": -1, "end_iters": -1},
    "wiener_coupled": {"cac": False, "wiener_iters": 1, "end_iters": 1},
    "multi_freqs_dconv_both": {"multi_freqs": [0.5], "dconv_mode": 3, "context_enc": 1},
    "no_rewrite": {"rewrite": False},
    "spectrogram_only": {"hybrid": False, "depth": 3, "nfft": 256},
}


@pytest.mark.parametrize("kwargs", list(HDEMUCS_CASES.values()), ids=list(HDEMUCS_CASES))
def test_hdemucs_lean_path_computes_the_same(kwargs: tp.Dict[str, tp.Any]) -> None:
    torch.manual_seed(1)
    lean, whole = both_paths(tiny_hdemucs(**kwargs), torch.randn(2, 2, 9000))
    assert_same_output(lean, whole)


@pytest.mark.parametrize("kwargs", [{}, {"cac": False, "wiener_iters": -1, "end_iters": -1},
                                    {"multi_freqs": [0.5], "dconv_mode": 3}],
                         ids=["default", "mixture_phase", "multi_freqs"])
def test_htdemucs_lean_path_computes_the_same(kwargs: tp.Dict[str, tp.Any]) -> None:
    model = tiny_htdemucs(**kwargs)
    torch.manual_seed(1)
    lean, whole = both_paths(model, torch.randn(1, 2, int(model.segment * model.samplerate)))
    assert_same_output(lean, whole)


@pytest.mark.parametrize("freq", [True, False])
def test_layers_leave_their_inputs_alone(freq: bool) -> None:
    """GELU runs in place on the layer's own tensors only."""
    torch.manual_seed(0)
    encoder = HEncLayer(4, 8, freq=freq, norm=False)
    decoder = HDecLayer(8, 4, freq=freq, norm=False)
    x = torch.randn(1, 4, 16, 50) if freq else torch.randn(1, 4, 200)
    y = encoder(x)
    skip = torch.randn_like(y)
    inputs = [x.clone(), y.clone(), skip.clone()]
    with torch.no_grad():
        encoder(x)
        decoder(y, skip, 200)
    for before, after in zip(inputs, [x, y, skip]):
        assert torch.equal(before, after)


@pytest.mark.parametrize("length,segment,stride", [
    (1000, 100, 75), (1000, 100, 100), (999, 64, 17), (50, 100, 75), (1234, 101, 1)])
def test_window_sums_by_region_are_the_track_long_sums(length: int, segment: int,
                                                       stride: int) -> None:
    """The same float sums, in the same order, as one buffer the length of the track."""
    weight = _transition_weight(segment, 1.7, "cpu")
    sum_weight = torch.zeros(length)
    for offset in range(0, length, stride):
        sum_weight[offset:offset + segment] += weight[:min(segment, length - offset)]
    out = torch.randn(1, 2, 3, length)
    expected = out / sum_weight
    assert torch.equal(_divide_by_window_sums(out, weight, stride), expected)


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap, /proc")
def test_trim_heap_gives_freed_pages_back() -> None:
    """Blocks freed between live ones stay resident until the heap is trimmed."""
    blocks = [torch.ones(25_000) for _ in range(2000)]  # 100 kB each: the heap, 200 MB
    kept = blocks[::10]
    del blocks
    before = resident_mb()
    trim_heap()
    assert before - resident_mb() > 100, "less than half of the 180 MB freed went back"
    assert all(block.sum() == 25_000 for block in kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap, /proc")
def test_freed_memory_kept_for_training_steps() -> None:
    """Within `freed_memory_kept`, a large buffer's pages stay with the process once it
    is freed (the next step reuses them instead of faulting new ones in); outside, and
    on leaving, they go back to the system."""
    def freed_but_resident_mb() -> float:
        before = resident_mb()
        buffer = torch.ones(16 * 2 ** 20)  # 64 MB: above glibc's largest mmap threshold
        del buffer
        return resident_mb() - before
    assert freed_but_resident_mb() < 8
    with freed_memory_kept():
        assert freed_but_resident_mb() > 56
        held = resident_mb()
    assert held - resident_mb() > 56
    assert freed_but_resident_mb() < 8
