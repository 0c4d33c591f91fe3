"""Multichannel Wiener filtering by expectation-maximisation.

Given magnitude estimates of each source and the complex mixture STFT, the sources
are modelled as zero-mean complex Gaussians with a power spectral density `v_j(t, f)`
and a spatial covariance `R_j(f)` (C x C). Each EM iteration re-estimates `v_j` and
`R_j` from the current source estimates, then filters the mixture with the
multichannel Wiener gain `v_j R_j (sum_k v_k R_k)^-1`.

Complex numbers are stored as real pairs in a trailing dimension of size 2, and the
arithmetic is spelled out on those pairs: the filter is sensitive to rounding when the
mixture covariance is nearly singular, and this keeps the results of the original
implementation within float32 noise. Shapes are time-major, as HDemucs uses them:
magnitudes (T, F, C, S), mixture (T, F, C, 2), estimates (T, F, C, 2, S).
"""
from __future__ import annotations

import typing as tp

import torch


def _mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Complex product of real-pair tensors (..., 2)."""
    return torch.stack([a[..., 0] * b[..., 0] - a[..., 1] * b[..., 1],
                        a[..., 0] * b[..., 1] + a[..., 1] * b[..., 0]], dim=-1).contiguous()


def _conj(z: torch.Tensor) -> torch.Tensor:
    return torch.stack([z[..., 0], -z[..., 1]], dim=-1)


def _norm(z: torch.Tensor) -> torch.Tensor:
    """Squared modulus of real-pair tensors (..., 2) -> (...)."""
    return z[..., 0] ** 2 + z[..., 1] ** 2


def _inv(z: torch.Tensor) -> torch.Tensor:
    """Complex inverse 1 / z of real-pair tensors."""
    ez = _norm(z)
    return torch.stack([z[..., 0] / ez, -z[..., 1] / ez], dim=-1)


def _invert(m: torch.Tensor) -> torch.Tensor:
    """Inverse of complex matrices (..., C, C, 2) for C = 1 or 2, in closed form."""
    nb_channels = m.shape[-2]
    if nb_channels == 1:
        return _inv(m)
    if nb_channels != 2:
        raise ValueError(f"Wiener filtering supports 1 or 2 audio channels, not {nb_channels}.")
    det = _mul(m[..., 0, 0, :], m[..., 1, 1, :]) - _mul(m[..., 0, 1, :], m[..., 1, 0, :])
    inv_det = _inv(det)
    out = torch.empty_like(m)
    out[..., 0, 0, :] = _mul(inv_det, m[..., 1, 1, :])
    out[..., 1, 0, :] = _mul(-inv_det, m[..., 1, 0, :])
    out[..., 0, 1, :] = _mul(-inv_det, m[..., 0, 1, :])
    out[..., 1, 1, :] = _mul(inv_det, m[..., 0, 0, :])
    return out


def _phase(mix_stft: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Phase of the mixture (T, F, C) computed from atan(im / re) with quadrant fixes.

    This is how the reference implementation computes it (not `torch.atan2`), and its
    rounding matters here. Bins that are exactly 0 are read as 1 + 0j, by the phase and
    by the rest of the filter alike; the patched mixture is returned with the phase.
    """
    re, im = mix_stft[..., 0], mix_stft[..., 1]
    re = re + ((re == 0) & (im == 0)) * 1.0
    pi = 2 * torch.asin(torch.tensor(1.0))
    out = torch.atan(im / re)
    out = out + ((im >= 0) & (re < 0)) * pi
    out = out - ((im < 0) & (re < 0)) * pi
    out = out * (1 - ((im > 0) & (re == 0)) * 1.0) + ((im > 0) & (re == 0)) * (pi / 2)
    out = out * (1 - ((im < 0) & (re == 0)) * 1.0) + ((im < 0) & (re == 0)) * (-pi / 2)
    return out, torch.stack([re, im], dim=-1)


def mixture_phase_filter(mix_stft: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Give each source magnitude the phase of the mixture: `wiener` with 0 iterations.

    `mix_stft` is complex (B, C, Fr, T), `magnitudes` real (B, S, C, Fr, T); the result is
    complex (B, S, C, Fr, T). Every product is the one `wiener(..., iterations=0)` computes,
    without its transpositions to the time-major layout, so the values are identical.
    """
    angle, _ = _phase(torch.view_as_real(mix_stft))
    angle = angle[:, None]  # (B, 1, C, Fr, T)
    # Stacked rather than `torch.complex`, which keeps both of its (B, S, C, Fr, T)
    # float32 inputs for its backward: the same values, half the memory until then.
    parts = [magnitudes * torch.cos(angle), magnitudes * torch.sin(angle)]
    return torch.view_as_complex(torch.stack(parts, dim=-1))


def _covariance(y_j: torch.Tensor) -> torch.Tensor:
    """Per-bin spatial covariance y y^H: (T, F, C, 2) -> (T, F, C, C, 2)."""
    return _mul(y_j[..., :, None, :], _conj(y_j[..., None, :, :]))


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Complex matrix product of (..., C, C, 2) tensors, summing in channel order."""
    out = _mul(a[..., :, 0, None, :], b[..., 0, None, :, :])
    for k in range(1, a.shape[-2]):
        out = out + _mul(a[..., :, k, None, :], b[..., k, None, :, :])
    return out


def _update_models(y: torch.Tensor, eps: float, batch_size: int
                   ) -> tp.Tuple[torch.Tensor, tp.List[torch.Tensor]]:
    """PSDs (T, F, S) and spatial covariances S x (F, C, C, 2) from y (T, F, C, 2, S)."""
    nb_frames = y.shape[0]
    v = torch.mean(torch.abs(y[..., 0, :]) ** 2 + torch.abs(y[..., 1, :]) ** 2, dim=-2)
    covs = []
    for j in range(y.shape[-1]):
        R = torch.zeros((), device=y.device)  # made on the device: no copy to wait for
        weight = torch.full((), eps, device=y.device)
        for pos in range(0, nb_frames, batch_size):
            frames = slice(pos, pos + batch_size)
            R = R + torch.sum(_covariance(y[frames, ..., j]), dim=0)
            weight = weight + torch.sum(v[frames, ..., j], dim=0)
        covs.append(R / weight[..., None, None, None])
    return v, covs


def expectation_maximization(y: torch.Tensor, x: torch.Tensor, iterations: int = 2,
                             eps: float = 1e-10, batch_size: int = 200) -> torch.Tensor:
    """Refine source estimates y (T, F, C, 2, S) of the mixture x (T, F, C, 2)."""
    nb_frames, nb_bins, nb_channels = x.shape[:-1]
    eye = torch.eye(nb_channels, dtype=x.dtype, device=x.device)[..., None]
    regularization = torch.cat([eye, torch.zeros_like(eye)], dim=2)  # (C, C, 2)
    regularization = torch.sqrt(torch.as_tensor(eps)) * regularization[None, None]
    regularization = regularization.expand(-1, nb_bins, -1, -1, -1)
    for _ in range(iterations):
        v, covs = _update_models(y, eps, batch_size)
        y = y.clone()
        for pos in range(0, nb_frames, batch_size):
            frames = slice(pos, pos + batch_size)
            Cxx = regularization
            for j, R in enumerate(covs):
                Cxx = Cxx + v[frames, ..., j, None, None, None] * R[None]
            inv_Cxx = _invert(Cxx)
            for j, R in enumerate(covs):
                gain = _matmul(R[None], inv_Cxx) * v[frames, ..., None, None, None, j]
                # y_j = gain x, summed over the mixture channels in order.
                y_j = _mul(gain[..., 0, :], x[frames, ..., 0, None, :])
                for i in range(1, nb_channels):
                    y_j = y_j + _mul(gain[..., i, :], x[frames, ..., i, None, :])
                y[frames, ..., j] = y_j
    return y


def wiener(targets_spectrograms: torch.Tensor, mix_stft: torch.Tensor, iterations: int = 1,
           softmask: bool = False, residual: bool = False, scale_factor: float = 10.0,
           eps: float = 1e-10) -> torch.Tensor:
    """Wiener-filter source magnitudes (T, F, C, S) against the mixture (T, F, C, 2).

    The initial estimates take the mixture phase (or a soft mask with `softmask`);
    `residual` adds a source for what the others leave of the mixture. Returns the
    complex estimates as (T, F, C, 2, S).
    """
    if softmask:
        total = eps + torch.sum(targets_spectrograms, dim=-1, keepdim=True)
        y = mix_stft[..., None] * (targets_spectrograms / total)[..., None, :]
    else:
        angle, mix_stft = _phase(mix_stft)
        angle = angle[..., None]
        y = torch.zeros(mix_stft.shape + targets_spectrograms.shape[-1:],
                        dtype=mix_stft.dtype, device=mix_stft.device)
        y[..., 0, :] = targets_spectrograms * torch.cos(angle)
        y[..., 1, :] = targets_spectrograms * torch.sin(angle)
    if residual:
        y = torch.cat([y, mix_stft[..., None] - y.sum(dim=-1, keepdim=True)], dim=-1)
    if iterations == 0:
        return y
    one = torch.as_tensor(1.0, dtype=mix_stft.dtype, device=mix_stft.device)
    max_abs = torch.max(one, torch.sqrt(_norm(mix_stft)).max() / scale_factor)
    y = expectation_maximization(y / max_abs, mix_stft / max_abs, iterations, eps=eps)
    return y * max_abs
