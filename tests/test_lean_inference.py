"""The memory-lean inference path (`demucs.lean`): blocked convolutions, in-place GELU,
one source at a time through the inverse STFT, window sums by region. It computes what
the whole-tensor path computes, never writes into its inputs, and is the path that
`apply_model`, evaluation and the `demucs` command take."""
from __future__ import annotations

import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
import torch

from demucs import evaluate, lean, separate
from demucs.apply import _divide_by_window_sums, _transition_weight, apply_model
from demucs.audio import save_audio
from demucs.hlayers import HDecLayer, HEncLayer
from demucs.lean import BlockSizes, block_sizes, lean_inference
from demucs.states import save_with_checksum, serialize_model
from demucs.utils import freed_memory_kept, trim_heap

from helpers import noise, tiny_hdemucs, tiny_htdemucs

# Blocks of a few time steps and rows, with remainders, even on tiny models.
SMALL_BLOCKS = BlockSizes(lean_bytes=0, block_bytes=1000, dconv_rows=3)


@pytest.fixture(autouse=True)
def small_blocks() -> tp.Iterator[None]:
    with block_sizes(SMALL_BLOCKS):
        yield


def both_paths(model: torch.nn.Module, mix: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """The output of the lean path and of the whole-tensor one, both without gradients."""
    model.eval()
    original = mix.clone()
    with lean_inference():
        lean_out = model(mix)
    assert torch.equal(mix, original)
    with lean_inference(False):
        whole = model(mix)
    return lean_out, whole


def assert_same_output(lean_out: torch.Tensor, whole: torch.Tensor) -> None:
    """Float rounding apart (block sums in another order): 1e-5 of the scale."""
    assert lean_out.shape == whole.shape
    err = (lean_out - whole).abs().max().item()
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
    lean_out, whole = both_paths(tiny_hdemucs(**kwargs), torch.randn(2, 2, 9000))
    assert_same_output(lean_out, whole)


@pytest.mark.parametrize("kwargs", [{}, {"cac": False, "wiener_iters": -1, "end_iters": -1},
                                    {"multi_freqs": [0.5], "dconv_mode": 3}],
                         ids=["default", "mixture_phase", "multi_freqs"])
def test_htdemucs_lean_path_computes_the_same(kwargs: tp.Dict[str, tp.Any]) -> None:
    model = tiny_htdemucs(**kwargs)
    torch.manual_seed(1)
    lean_out, whole = both_paths(model, torch.randn(1, 2, int(model.segment * model.samplerate)))
    assert_same_output(lean_out, whole)


# ---------------------------------------------------------------------------------------
# Where the lean path is taken


class Spy(tp.NamedTuple):
    """A call of `lean.per_time_step` (the freq branch's convolutions): the switch as it
    was, the input's time steps and those of each call of the convolution."""
    switch: tp.Optional[bool]
    length: int
    calls: tp.List[int]

    @property
    def blocked(self) -> bool:
        return len(self.calls) > 1


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> tp.List[Spy]:
    """The calls of `lean.per_time_step` from now on."""
    seen: tp.List[Spy] = []
    original = lean.per_time_step

    def spy(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls: tp.List[int] = []

        def counted(chunk: torch.Tensor) -> torch.Tensor:
            calls.append(chunk.shape[-1])
            return layer(chunk)
        out = original(tp.cast(torch.nn.Module, counted), x)
        seen.append(Spy(lean.requested(), x.shape[-1], calls))
        return out
    monkeypatch.setattr(lean, "per_time_step", spy)
    return seen


def test_bare_forward_without_gradients_takes_the_lean_path(spied: tp.List[Spy]) -> None:
    """The choice documented in `demucs.lean`: no switch set, no gradients -> lean."""
    model = tiny_hdemucs().eval()
    mix = torch.randn(1, 2, 9000)
    with torch.no_grad():
        model(mix)
    assert spied and all(spy.switch is None and spy.blocked for spy in spied)
    spied.clear()
    model(mix)
    assert spied and not any(spy.blocked for spy in spied)


def test_switched_off_it_runs_whole(spied: tp.List[Spy]) -> None:
    with lean_inference(False):
        tiny_hdemucs().eval()(torch.randn(1, 2, 9000))
    assert spied and not any(spy.blocked for spy in spied)


def test_apply_model_turns_it_on(spied: tp.List[Spy]) -> None:
    """With gradients enabled around it, too."""
    apply_model(tiny_hdemucs(segment=1).eval(), torch.randn(1, 2, 9000), shifts=0,
                split=True)
    assert spied and all(spy.switch is True and spy.blocked for spy in spied)


def test_evaluation_turns_it_on(spied: tp.List[Spy]) -> None:
    model = tiny_hdemucs(segment=1).eval()
    track = evaluate.EvalTrack("track", noise(2, 9000), noise(8, 9000).view(4, 2, -1), 44100)
    test_cfg = tp.cast(tp.Any, type("TestCfg", (), {"shifts": 0, "split": True,
                                                    "overlap": 0.25}))
    evaluate.separate(model, track, test_cfg, "cpu")
    assert spied and all(spy.switch is True and spy.blocked for spy in spied)


def test_the_demucs_command_turns_it_on(spied: tp.List[Spy], tmp_path: Path) -> None:
    package = tmp_path / "tiny.th"
    save_with_checksum(serialize_model(tiny_hdemucs(segment=1), {"model": "hdemucs"}),
                       package)
    save_audio(noise(2, 9000), tmp_path / "mix.wav", 44100, as_float=True)
    separate.main(["-n", str(next(tmp_path.glob("tiny*.th"))), str(tmp_path / "mix.wav"),
                   "-o", str(tmp_path / "out"), "--shifts", "0", "-d", "cpu"])
    assert spied and all(spy.switch is True and spy.blocked for spy in spied)


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
    with lean_inference():
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


MAPPED = """
import os, sys, torch
from demucs.utils import map_large_buffers
if sys.argv[1] == "mapped":
    map_large_buffers()
def freed_but_resident_mb(mb):
    statm = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = statm()
    buffer = torch.ones(mb * 2 ** 18)
    del buffer
    return (statm() - before) / 2 ** 20
freed_but_resident_mb(30)  # glibc's own threshold rises to a mapping freed, up to 32 MB
print(round(freed_but_resident_mb(20)), os.environ.get("THP_MEM_ALLOC_ENABLE"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap, /proc")
@pytest.mark.parametrize("how, user", [("mapped", None), ("mapped", "0"), ("heap", None)])
def test_map_large_buffers_for_separation(how: str, user: tp.Optional[str]) -> None:
    """After `map_large_buffers` (the `demucs` command's first step), a 20 MB buffer is
    mapped on its own and goes back to the system when freed; glibc alone serves it from
    its heap after a larger one was freed, where it stays. Torch's huge pages are asked
    for, unless the user said otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user
    out = subprocess.run([sys.executable, "-c", MAPPED, how], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    resident, huge = int(out[0]), out[1]
    if how == "mapped":
        assert resident < 4 and huge == (user or "1")
    else:
        assert resident > 16 and huge == "None"
