"""The STFT helpers: the inverse STFT against `torch.istft`, the real-edge-bins rule that
makes CUDA match CPU, and the windows and resamplers made once per device."""
from __future__ import annotations

import typing as tp

import julius
import pytest
import torch

from demucs.demucs import _resampler
from demucs.spec import _hann, _centred_hann, _real_edge_bins, ispectro, spectro
from demucs.transformer import _made_2d_sin_embedding, create_2d_sin_embedding
from helpers import tiny_hdemucs


@pytest.mark.parametrize("n_fft,hop,pad", [(4096, 1024, 0), (512, 128, 0), (1024, None, 0),
                                           (4096, 1024, 1)])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("trim", [None, 5 * 128, 0, -64])
def test_inverse_stft_is_torch_istft_bit_for_bit(n_fft: int, hop: tp.Optional[int],
                                                 pad: int, dtype: torch.dtype,
                                                 trim: tp.Optional[int]) -> None:
    """`ispectro` makes the envelope once on the CPU, with the same operations as
    `torch.istft`: equal outputs and gradients, whatever the length asked (shorter than
    the frames cover, all of it, or longer: zero-padded)."""
    torch.manual_seed(0)
    frames = 40
    z = torch.randn(3, n_fft // 2 + 1, frames, dtype=dtype, requires_grad=True)
    window = n_fft // (1 + pad)
    covered = (hop or n_fft // 4) * (frames - 1)
    length = None if trim is None else covered - trim
    theirs = torch.istft(z, n_fft, hop, window=_hann(window, z.device, z.real.dtype),
                         win_length=window, normalized=True, length=length, center=True)
    ours = ispectro(z, hop, length, pad)
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    grad = torch.randn(ours.shape, dtype=ours.dtype)
    assert torch.equal(torch.autograd.grad(ours, z, grad)[0],
                       torch.autograd.grad(theirs, z, grad)[0])


def test_inverse_stft_refuses_uncovered_samples() -> None:
    """A hop longer than the window leaves samples that no frame covers: one clear error
    (where `torch.istft` also refuses)."""
    z = torch.randn(2, 129, 10, dtype=torch.complex64)
    with pytest.raises(ValueError, match="covered by no window; lower the hop"):
        ispectro(z, 300)


def test_inverse_stft_ignores_imaginary_edge_bins_on_cpu() -> None:
    """The CPU inverse FFT ignores the imaginary parts of the 0 Hz and Nyquist bins;
    `ispectro` zeroes them on other devices (cuFFT uses them), so all devices agree."""
    torch.manual_seed(0)
    z = torch.randn(2, 3, 1025, 40, dtype=torch.complex64, requires_grad=True)
    real = _real_edge_bins(z.view(-1, 1025, 40))
    assert real.imag[:, 0].abs().max() == 0 and real.imag[:, -1].abs().max() == 0
    assert torch.equal(real[:, 1:-1], z.view(-1, 1025, 40)[:, 1:-1])
    assert z.imag[..., 0, :].abs().max() > 0  # the input is left untouched
    assert torch.equal(ispectro(z, 512), ispectro(real.view_as(z), 512))
    grad, = torch.autograd.grad(ispectro(z, 512).sum(), z)
    assert grad.imag[..., 0, :].abs().max() == 0 and grad.imag[..., -1, :].abs().max() == 0


def test_cached_windows_and_resamplers_serve_training_after_inference() -> None:
    """The STFT windows, the inverse STFT's envelopes and Demucs' resamplers are made once
    per device and dtype; made first under `inference_mode` (separation), they still serve
    a training step after, and give the values of the uncached functions."""
    _hann.cache_clear()
    _centred_hann.cache_clear()
    _resampler.cache_clear()
    torch.manual_seed(0)
    x = torch.randn(2, 3000)
    model = tiny_hdemucs(channels=8)
    mix = torch.randn(1, 2, 44100)
    with torch.inference_mode():
        spectro(x, 256)
        separated = model(mix)
    assert _hann.cache_info().currsize >= 1
    assert torch.equal(_hann(256, x.device, x.dtype), torch.hann_window(256))
    assert _hann(256, x.device, x.dtype) is _hann(256, x.device, x.dtype)
    x.requires_grad_()
    grad, = torch.autograd.grad(spectro(x, 256).abs().sum(), x)
    assert grad.shape == x.shape
    model(mix).sum().backward()  # the training step after separation
    torch.testing.assert_close(model(mix).detach(), separated)  # the lean path's rounding
    resampled = _resampler(1, 2, x.device, x.dtype)(x)
    assert torch.equal(resampled, julius.resample_frac(x, 1, 2))
    resampled.sum().backward()  # a cached resampler in an autograd graph
    embedding = _made_2d_sin_embedding(8, 4, 6, x.device, 10000.)
    assert embedding is _made_2d_sin_embedding(8, 4, 6, x.device, 10000.)
    assert torch.equal(embedding, create_2d_sin_embedding(8, 4, 6))
