"""Tests of demucs.repitch: soundstretch tempo/pitch changes and the dataset wrapper."""
from __future__ import annotations

import random
import typing as tp
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from demucs import repitch as repitch_module
from demucs.errors import MissingProgramError
from demucs.repitch import RepitchedWrapper, repitch, wrap_repitch

from helpers import SOURCES, needs_soundstretch, tones

SR = 16000


def tone(channels: int = 2, seconds: float = 1., amplitude: float = 3.) -> torch.Tensor:
    """220 Hz on every channel, (C, T), louder than full scale by default."""
    return tones([220] * channels, seconds, SR, amplitude)


@pytest.mark.parametrize("tempo", [-12., 0., 10.])
@needs_soundstretch
def test_repitch_changes_length_by_tempo(tempo: float) -> None:
    wav = tone()
    out = repitch(wav, 0, tempo, samplerate=SR)
    expected = wav.shape[-1] / (1 + tempo / 100)
    assert out.shape[0] == 2 and out.dtype == wav.dtype
    assert abs(out.shape[-1] - expected) < 0.01 * expected
    # No clipping although the input goes well beyond [-1, 1].
    assert out.abs().max() == pytest.approx(3., rel=0.1)


@needs_soundstretch
def test_repitch_changes_pitch() -> None:
    wav = tone(channels=1)
    out = repitch(wav, 12, 0, samplerate=SR, quick=True, voice=True, anti_alias=False)
    spectrum = torch.fft.rfft(out[0, 2000:-2000]).abs()
    peak_hz = spectrum.argmax().item() * SR / (out.shape[-1] - 4000)
    assert peak_hz == pytest.approx(440, rel=0.03)


def test_command_flags(tmp_path: Path) -> None:
    command = repitch_module._command("soundstretch", tmp_path / "a.wav", tmp_path / "b.wav",
                                      2, -3.5, voice=True, quick=True, anti_alias=False)
    assert command[3:] == ["-pitch=2", "-tempo=-3.500000", "-quick", "-naa", "-speech"]


class Constant(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.example = torch.stack([tone(), tone() * 0.5, tone() * 0.2])  # (S, C, T)

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.example


@needs_soundstretch
def test_wrapper_crops_and_repitches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[float, float, bool]] = []
    original = repitch_module.repitch

    def recording(wav: torch.Tensor, pitch: float, tempo: float, voice: bool = False,
                  **kwargs: tp.Any) -> torch.Tensor:
        calls.append((pitch, tempo, voice))
        return original(wav, pitch, tempo, voice=voice, **kwargs)
    monkeypatch.setattr(repitch_module, "repitch", recording)
    random.seed(1)
    wrapper = RepitchedWrapper(Constant(), proba=1., max_tempo=12, vocals=[2],
                               samplerate=SR)
    out = wrapper[0]
    assert len(wrapper) == 3 and out.shape == (3, 2, int(0.88 * SR))
    assert [voice for _, _, voice in calls] == [False, False, True]
    assert len({(pitch, tempo) for pitch, tempo, _ in calls}) == 1  # same=True
    pitch, tempo, _ = calls[0]
    assert -2 <= pitch <= 2 and -12 <= tempo <= 12


def test_wrapper_without_change_only_crops() -> None:
    wrapper = RepitchedWrapper(Constant(), proba=0., max_tempo=10)
    out = wrapper[1]
    assert torch.equal(out, Constant().example[..., :int(0.9 * SR)])


def test_missing_soundstretch_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingProgramError, match="soundstretch"):
        RepitchedWrapper(Constant(), proba=0.2)
    RepitchedWrapper(Constant(), proba=0.)  # not needed when disabled


def test_wrap_repitch_from_config(monkeypatch: pytest.MonkeyPatch) -> None:
    off = OmegaConf.create({"proba": 0, "max_tempo": 12})
    dataset = Constant()
    assert wrap_repitch(dataset, off, SOURCES) is dataset
    monkeypatch.setattr(repitch_module, "find_soundstretch", lambda: "soundstretch")
    on = OmegaConf.create({"proba": 0.2, "max_tempo": 8})
    wrapper = wrap_repitch(dataset, on, SOURCES, samplerate=SR)
    assert isinstance(wrapper, RepitchedWrapper)
    assert wrapper.vocals == [3] and wrapper.max_tempo == 8 and wrapper.samplerate == SR
