"""Helpers shared by the tests: source names, signal and track generators, tiny models,
markers for external programs and checks of one-line errors.

Test files import it as `from helpers import ...`: pytest puts `tests/` on `sys.path`
(rootdir conftest, default import mode), and mypy sees it under the same name.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from dora.xp import XP

from demucs import norm, train
from demucs.demucs import Demucs, LayerScale
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs
from demucs.solver import Solver
from demucs.train import main as xp_main

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["drums", "bass", "other", "vocals"]
# torch's thread count before conftest.py sets the tests' one thread (`one_thread`)
DEFAULT_THREADS = torch.get_num_threads()
_threads_set = False  # by `one_thread`


def one_thread() -> None:
    """One torch thread for the tests and, through OMP_NUM_THREADS, for the commands they
    start, unless the environment sets it: tiny models run faster so, and the cores stay
    free for the processes a test runs side by side."""
    global _threads_set
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        _threads_set = True


def threads_set_by_tests() -> bool:
    """Whether OMP_NUM_THREADS comes from `one_thread`, not from the environment."""
    return _threads_set

# ---------------------------------------------------------------------------------------
# Missing resources: skipped on a developer's machine, a failure on CI


def on_ci() -> bool:
    """True on CI (`.ci/run` exports CI=true), where every resource must be installed."""
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(message: str) -> tp.NoReturn:
    """Skip the current test because something is missing; on CI, fail it instead."""
    if on_ci():
        pytest.fail(message)
    pytest.skip(message)


def require_programs(*names: str) -> None:
    """Skip (fail on CI) unless every program of `names` is on the PATH; for fixtures."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        skip_or_fail(f"{', '.join(missing)} not installed (`make install` installs it)")


# `conftest.py` calls `require_programs(*args)` before each test carrying the marker.
needs_ffmpeg = pytest.mark.needs_programs("ffmpeg", "ffprobe")
needs_soundstretch = pytest.mark.needs_programs("soundstretch")

# ---------------------------------------------------------------------------------------
# Signals and track folders


def sine(freq: float, seconds: float, samplerate: int, amplitude: float = 0.5) -> torch.Tensor:
    """A sine of `freq` Hz, (T,) float32 (computed in float64)."""
    time = torch.arange(int(seconds * samplerate), dtype=torch.float64) / samplerate
    return (amplitude * torch.sin(2 * math.pi * freq * time)).float()


def tones(freqs: tp.Sequence[float], seconds: float, samplerate: int,
          amplitudes: float | tp.Sequence[float] = 0.5) -> torch.Tensor:
    """One sine per channel, (C, T) with C = len(freqs)."""
    if isinstance(amplitudes, (int, float)):
        amplitudes = [float(amplitudes)] * len(freqs)
    return torch.stack([sine(freq, seconds, samplerate, amp)
                        for freq, amp in zip(freqs, amplitudes, strict=True)])


def noise(channels: int, length: int, seed: int = 0, scale: float = 1.) -> torch.Tensor:
    """Reproducible white gaussian noise, (C, T), from its own generator."""
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(channels, length, generator=generator)


def write_wav(path: Path, wav: torch.Tensor, samplerate: int, subtype: str = "PCM_16") -> Path:
    """Write `wav` (C, T) with soundfile; return `path`."""
    sf.write(str(path), wav.t().numpy(), samplerate, subtype=subtype)
    return path


def file_bytes(path: Path) -> bytes:
    """The bytes of an audio file, but the time stamp libsndfile writes in the PEAK chunk
    of float wav files (the second it was written)."""
    data = path.read_bytes()
    peak = data.find(b"PEAK", 0, 200)
    if peak < 0:
        return data
    return data[:peak + 12] + b"\0\0\0\0" + data[peak + 16:]


def read_wav(path: Path) -> torch.Tensor:
    """Read a wav file as a float32 (C, T) tensor."""
    data, _ = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy())


def write_track(folder: Path, stems: dict[str, np.ndarray], samplerate: int = 1000,
                subtype: str = "FLOAT") -> None:
    """A MusDB-HQ track folder: the `stems` (T, C) arrays as SOURCE.wav files and, unless
    given, their sum as mixture.wav."""
    folder.mkdir(parents=True, exist_ok=True)
    if "mixture" not in stems:
        stems = {**stems, "mixture": sum(stems.values())}  # type: ignore[dict-item]
    for name, data in stems.items():
        sf.write(str(folder / f"{name}.wav"), data, samplerate, subtype=subtype)


def write_musdb(root: Path, names: tp.Sequence[str], length: int = 3000,
                sources: tp.Sequence[str] = SOURCES, seed: int = 3) -> Path:
    """A MusDB-HQ-shaped folder: `root/train/NAME` tracks of stereo noise at 1000 Hz."""
    rng = np.random.default_rng(seed)
    for name in names:
        write_track(root / "train" / name,
                    {source: rng.normal(0, 0.1, (length, 2)) for source in sources})
    return root


# ---------------------------------------------------------------------------------------
# Models


def tiny_hdemucs(seed: int = 0, sources: tp.Sequence[str] = SOURCES,
                 **kwargs: tp.Any) -> HDemucs:
    """An HDemucs with 4 channels (unless `kwargs` say otherwise), seeded weights."""
    torch.manual_seed(seed)
    return HDemucs(list(sources), **{"channels": 4, **kwargs})


# 0.5 s at 8 kHz, 8 frames of STFT, 64 channels and 32 tokens at the bottleneck
TINY_HTDEMUCS = {"samplerate": 8000, "segment": 0.5, "channels": 8, "nfft": 2048,
                 "t_layers": 2}


def tiny_htdemucs(seed: int = 0, sources: tp.Sequence[str] = SOURCES,
                  **kwargs: tp.Any) -> HTDemucs:
    """A small HTDemucs (`TINY_HTDEMUCS`, updated by `kwargs`) with seeded weights."""
    torch.manual_seed(seed)
    return HTDemucs(list(sources), **{**TINY_HTDEMUCS, **kwargs})


def tiny_demucs(seed: int = 0, sources: tp.Sequence[str] = SOURCES,
                **kwargs: tp.Any) -> Demucs:
    """A Demucs with 4 channels (unless `kwargs` say otherwise), seeded weights."""
    torch.manual_seed(seed)
    return Demucs(list(sources), **{"channels": 4, **kwargs})


R = tp.TypeVar("R")


def saved_for_backward(run: tp.Callable[[], R]) -> tuple[R, list[torch.Size]]:
    """What `run()` returns, and the shapes of the tensors autograd keeps for its
    backward, in the order they are kept."""
    shapes: list[torch.Size] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        shapes.append(t.shape)
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        result = run()
    return result, shapes


def norm_steps(channels: int, then: nn.Module, with_gain: bool,
               device: str = "cpu") -> list[nn.Module]:
    """A group norm (one group, as in the DConvs) with random affine parameters, the
    activation `then`, and a LayerScale with random gains if `with_gain`: the steps a
    `norm.FusedSequential` runs as one."""
    module = norm.GroupNorm(1, channels).to(device)
    torch.nn.init.normal_(module.weight)
    torch.nn.init.normal_(module.bias)
    steps: list[nn.Module] = [module, then]
    if with_gain:
        gain = LayerScale(channels // 2 if isinstance(then, nn.GLU) else channels).to(device)
        torch.nn.init.normal_(gain.scale)
        steps.append(gain)
    return steps


class Scaler(nn.Module):
    """A stand-in model: source s is `weights[s] * mix`, so its outputs are computable."""

    def __init__(self, sources: tp.Sequence[str], weights: tp.Sequence[float],
                 samplerate: int = 44100, segment: float = 1.) -> None:
        super().__init__()
        self.sources = list(sources)
        self.samplerate = samplerate
        self.audio_channels = 2
        self.segment = segment
        self.weights = nn.Parameter(torch.tensor(weights, dtype=torch.float32),
                                    requires_grad=False)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        return self.weights[None, :, None, None] * mix[:, None]  # (B, S, C, T)


StateLike = tp.Union[nn.Module, tp.Mapping[str, torch.Tensor]]


def same_state(first: StateLike, second: StateLike) -> bool:
    """Same keys and bitwise equal tensors (modules are compared by their state_dict)."""
    a = first.state_dict() if isinstance(first, nn.Module) else first
    b = second.state_dict() if isinstance(second, nn.Module) else second
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def assert_same_tensors(first: tp.Any, second: tp.Any, where: str = "") -> None:
    """Recursive torch.equal over the tensors of two nested containers."""
    if isinstance(first, torch.Tensor):
        assert isinstance(second, torch.Tensor) and torch.equal(first, second), where
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), where
        for key in first:
            assert_same_tensors(first[key], second[key], f"{where}.{key}")
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), where
        for index, (a, b) in enumerate(zip(first, second)):
            assert_same_tensors(a, b, f"{where}[{index}]")
    else:
        assert first == second, where


# ---------------------------------------------------------------------------------------
# Commands and processes


def one_line(stderr: str) -> str:
    """The only line of `stderr`; fails when it has none or several (a traceback)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


def main_error(main: tp.Callable[[list[str]], object], argv: list[str],
               capsys: pytest.CaptureFixture[str], code: int = 1) -> str:
    """Run a command's `main(argv)` in process, expecting it to exit with status `code`
    after one line on stderr; return that line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == code, f"exit status {info.value.code}, expected {code}"
    return one_line(capsys.readouterr().err)


def imported_modules(*modules: str) -> set[str]:
    """The modules loaded by a fresh interpreter that imports `modules`."""
    code = f"import sys, {', '.join(modules)}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return set(out.split())


# ---------------------------------------------------------------------------------------
# Reference outputs and XPs


def assert_tensor_close(ours: torch.Tensor, golden: torch.Tensor, factor: float = 1.0) -> None:
    """The reference tolerance, `factor` times: max|ours - golden| <= 1e-4 max|golden| + 1e-5."""
    assert ours.shape == golden.shape, (ours.shape, golden.shape)
    tol = factor * (1e-4 * golden.abs().max().item() + 1e-5)
    err = (ours - golden).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"


def normalized(mix: torch.Tensor) -> torch.Tensor:
    """The reference's input of `apply_model`: the mix normalised by its mono mean/std."""
    ref = mix.mean(0)
    return (mix - ref.mean()) / ref.std()


def new_xp(argv: tp.Sequence[str]) -> XP:
    """The XP of `argv`, registered in Dora's folder (as `dora run` would, before training)."""
    xp = xp_main.get_xp(list(argv))
    xp_main.init_xp(xp)
    return xp


def make_solver(base: tp.Sequence[str], *argv: str, model_only: bool = False
                ) -> tuple[Solver, XP]:
    """The solver of the XP `base + argv` (registered in Dora's folder), and that XP."""
    xp = new_xp([*base, *argv])
    with xp.enter():
        return train.get_solver(xp.cfg, model_only=model_only), xp
