"""A stand-in for torchaudio's file functions, for the baselines' venvs only.

The original Demucs packages (`demucs==3.0.6`, `demucs==4.1.0`) import torchaudio to read
and write audio files, and no torchaudio release goes with torch 2.13. bench_backends.py
copies this package into their venvs (`--setup`): `load`, `save` and `info` through
soundfile, as much of torchaudio's signatures as a separation command calls. Never
imported by this repository's code.
"""
from __future__ import annotations

import typing as tp
from types import SimpleNamespace

import numpy as np
import soundfile
import torch

__version__ = "0.0+stand-in"
SUBTYPES = {("PCM_S", 16): "PCM_16", ("PCM_S", 24): "PCM_24", ("PCM_S", 32): "PCM_32",
            ("PCM_F", 32): "FLOAT", ("PCM_F", 64): "DOUBLE"}


def load(filepath: tp.Any, frame_offset: int = 0, num_frames: int = -1,
         normalize: bool = True, channels_first: bool = True, format: tp.Any = None,
         **_: tp.Any) -> tp.Tuple[torch.Tensor, int]:
    """(channels, frames) float32 and the sample rate."""
    data, rate = soundfile.read(str(filepath), start=frame_offset,
                                frames=num_frames, dtype="float32", always_2d=True)
    wav = torch.from_numpy(np.ascontiguousarray(data.T if channels_first else data))
    return wav, rate


def save(filepath: tp.Any, src: torch.Tensor, sample_rate: int, channels_first: bool = True,
         compression: tp.Any = None, format: tp.Any = None, encoding: tp.Optional[str] = None,
         bits_per_sample: tp.Optional[int] = None, **_: tp.Any) -> None:
    """Write `src` ((channels, frames) with `channels_first`) as a wav file."""
    data = src.detach().cpu().numpy()
    data = data.T if channels_first else data
    if encoding is None:
        encoding = "PCM_F" if data.dtype.kind == "f" else "PCM_S"
    bits = bits_per_sample or (32 if encoding == "PCM_F" else 16)
    soundfile.write(str(filepath), data, sample_rate, subtype=SUBTYPES[(encoding, bits)])


def info(filepath: tp.Any, format: tp.Any = None) -> SimpleNamespace:
    meta = soundfile.info(str(filepath))
    return SimpleNamespace(sample_rate=meta.samplerate, num_frames=meta.frames,
                           num_channels=meta.channels, bits_per_sample=16,
                           encoding="PCM_S")
