"""STFT helpers with the conventions of Hybrid Demucs.

`spectro` is a normalized, centered STFT with a Hann window and reflect padding;
`ispectro` inverts it. Both accept any number of leading dimensions, and always compute
in at least float32 / complex64, mixed precision (autocast) or not.
"""
from __future__ import annotations

import functools
import typing as tp

import torch

HALF_TYPES = (torch.float16, torch.bfloat16)  # computed in float32


def spectro(x: torch.Tensor, n_fft: int = 512, hop_length: tp.Optional[int] = None,
            pad: int = 0) -> torch.Tensor:
    """STFT of `x` (..., T) -> complex (..., n_fft // 2 + 1, frames).

    `pad` zero-pads each frame to `n_fft * (1 + pad)` points (window of `n_fft`).
    """
    *other, length = x.shape
    x = x.reshape(-1, length)
    if x.dtype in HALF_TYPES:
        x = x.float()
    with torch.autocast(x.device.type, enabled=False):
        z = torch.stft(x, n_fft * (1 + pad), hop_length or n_fft // 4,
                       window=_hann(n_fft, x.device, x.dtype), win_length=n_fft,
                       normalized=True, center=True, return_complex=True, pad_mode="reflect")
    _, freqs, frames = z.shape
    return z.view(*other, freqs, frames)


def ispectro(z: torch.Tensor, hop_length: tp.Optional[int] = None,
             length: tp.Optional[int] = None, pad: int = 0) -> torch.Tensor:
    """Inverse of `spectro`: complex (..., F, frames) -> real (..., length)."""
    *other, freqs, frames = z.shape
    n_fft = 2 * freqs - 2
    z = z.reshape(-1, freqs, frames)
    if z.dtype == torch.complex32:
        z = z.to(torch.complex64)
    win_length = n_fft // (1 + pad)
    if z.device.type != "cpu":
        z = _real_edge_bins(z)
    with torch.autocast(z.device.type, enabled=False):
        x = torch.istft(z, n_fft, hop_length, window=_hann(win_length, z.device, z.real.dtype),
                        win_length=win_length, normalized=True, length=length, center=True)
    _, length = x.shape
    return x.view(*other, length)


@functools.lru_cache(maxsize=None)
def _hann(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The Hann window, made on the CPU (the reference values) and copied to `device`
    once: a copy at each call would make a GPU step wait for the device."""
    with torch.inference_mode(False), torch.no_grad():  # usable by later training
        return torch.hann_window(length).to(device, dtype)


def _real_edge_bins(z: torch.Tensor) -> torch.Tensor:
    """`z` (N, F, frames) with the imaginary part of its 0 Hz and Nyquist bins zeroed.

    The spectrum of a real signal has real edge bins; a model's output need not. The CPU
    inverse FFT ignores those imaginary parts, cuFFT does not (it adds a near-constant
    offset to each frame): zeroing them makes every device give the CPU's result.
    """
    z = z.clone()
    z.imag[:, 0].zero_()
    z.imag[:, -1].zero_()
    return z
