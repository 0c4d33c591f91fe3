"""STFT helpers with the conventions of Hybrid Demucs.

`spectro` is a normalized, centered STFT with a Hann window and reflect padding;
`ispectro` inverts it. Both accept any number of leading dimensions, and always compute
in at least float32 / complex64, mixed precision (autocast) or not.
"""
from __future__ import annotations

import functools
import typing as tp

import torch
from torch.nn import functional as F

from .utils import made_once

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
        x = _istft(z, n_fft, hop_length or n_fft // 4, win_length, length)
    _, length = x.shape
    return x.view(*other, length)


def _istft(z: torch.Tensor, n_fft: int, hop: int, win_length: int,
           length: tp.Optional[int]) -> torch.Tensor:
    """`torch.istft` of `z` (N, F, frames) with a Hann window of `win_length`, normalized
    and centered, trimmed or zero-padded to `length`: the same operations in the same
    order (the same values, bit for bit), but the check that every output sample is
    covered by a window is made once per shape, on the CPU. `torch.istft` makes it on the
    device at each call, which makes a GPU step wait for the device and rules out CUDA
    graphs."""
    batch, _, frames = z.shape
    full = n_fft + hop * (frames - 1)
    start = n_fft // 2
    end = start + length if length is not None else full - n_fft // 2
    _check_overlap(n_fft, hop, win_length, frames, end)
    window = _centred_hann(n_fft, win_length, z.device, z.real.dtype)
    signal = torch.fft.irfft(z.transpose(1, 2), n=n_fft, dim=-1, norm="ortho")  # (N, T, n)
    x = torch.ops.aten.unfold_backward(signal * window, [batch, full], 1, n_fft, hop)
    x = x[:, start:end] / _envelope(window, frames, hop)[:, start:end]
    if end > full:
        x = F.pad(x, (0, end - full))
    return x


def _envelope(window: torch.Tensor, frames: int, hop: int) -> torch.Tensor:
    """The sum of the squared `window` over `frames` frames `hop` apart, (1, length)."""
    n_fft = len(window)
    squares = window.pow(2).expand(1, frames, n_fft)
    return torch.ops.aten.unfold_backward(squares, [1, n_fft + hop * (frames - 1)], 1,
                                          n_fft, hop)


@functools.lru_cache(maxsize=1024)
def _check_overlap(n_fft: int, hop: int, win_length: int, frames: int, end: int) -> None:
    """Fail where a window envelope vanishes between `n_fft // 2` and `end`."""
    window = _centred_hann(n_fft, win_length, torch.device("cpu"), torch.float32)
    envelope = _envelope(window, frames, hop)[:, n_fft // 2:end]
    if envelope.numel() and float(envelope.abs().min()) < 1e-11:
        raise ValueError(
            f"Inverse STFT: with n_fft={n_fft}, hop_length={hop}, a window of "
            f"{win_length} and {frames} frames, some of the {end - n_fft // 2} output "
            "samples are covered by no window; lower the hop or the length.")


@made_once
def _centred_hann(n_fft: int, win_length: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """`_hann(win_length)` zero-padded on both sides to `n_fft` points."""
    left = (n_fft - win_length) // 2
    return F.pad(_hann(win_length, device, dtype), (left, n_fft - win_length - left))


@made_once
def _hann(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The Hann window, made on the CPU (the reference values)."""
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
