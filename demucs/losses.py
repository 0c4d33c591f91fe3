"""The reconstruction losses of training, by their `optim.loss` name.

A loss takes the estimated and true sources, both (B, S, C, T), and the `LossOptions`
of the training, and gives per source (S,) the loss that is optimised and the `reco`
that is logged. A new loss is one function and one entry of `LOSSES` (which `checks`
reads to accept its name).

Besides Demucs' `l1` and `mse`, the losses with which MSST trains its models:
`l1_multi_stft` (the RoFormers' own: L1 on the waveforms plus L1 on complex STFTs at
several resolutions) and `masked_mse` (SCNet's: squared errors, the worst examples of the
batch left out). Their means over equally weighted sources are MSST's values.
"""
from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F



class MultiStftSettings(tp.NamedTuple):
    """The multi-resolution STFT term of `l1_multi_stft` (MSST's `multi_stft_*` options of
    the RoFormers, which carry theirs as `model.multi_stft`): per window size w, an STFT
    of max(w, min_n_fft) points, window w, hop `hop_size`."""
    weight: float = 1.
    window_sizes: tp.Tuple[int, ...] = (4096, 2048, 1024, 512, 256)
    min_n_fft: int = 2048
    hop_size: int = 147
    normalized: bool = False
    window_fn: str = "hann_window"


class LossOptions(tp.NamedTuple):
    """What some losses need besides the sources."""
    multi_stft: MultiStftSettings = MultiStftSettings()
    q: float = 0.95  # masked_mse: examples at or above this quantile of the batch are left out


DEFAULT_OPTIONS = LossOptions()
Loss = tp.Callable[[torch.Tensor, torch.Tensor, LossOptions], tuple[torch.Tensor, torch.Tensor]]


def l1(estimate: torch.Tensor, sources: torch.Tensor,
       options: LossOptions = DEFAULT_OPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean absolute error, both optimised and logged."""
    loss = F.l1_loss(estimate, sources, reduction="none").mean(dim=(2, 3)).mean(0)
    return loss, loss


def mse(estimate: torch.Tensor, sources: torch.Tensor,
        options: LossOptions = DEFAULT_OPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over the batch of each example's mean squared error; `reco` is the mean
    over the batch of its root."""
    per_example = F.mse_loss(estimate, sources, reduction="none").mean(dim=(2, 3))
    return per_example.mean(0), per_example.sqrt().mean(0)


def stft_l1(estimate: torch.Tensor, sources: torch.Tensor,
            settings: MultiStftSettings) -> torch.Tensor:
    """Per source (S,): the sum over resolutions of the mean modulus of the difference of
    the complex STFTs (computed in float32)."""
    B, S, C, T = sources.shape
    total = estimate.new_zeros(S, dtype=torch.float32)
    with torch.autocast(estimate.device.type, enabled=False):
        for size in settings.window_sizes:
            window = getattr(torch, settings.window_fn)(size, device=estimate.device)
            stft = dict(n_fft=max(size, settings.min_n_fft), win_length=size, window=window,
                        hop_length=settings.hop_size, normalized=settings.normalized,
                        return_complex=True)
            spec_est = torch.stft(estimate.float().reshape(-1, T), **stft)
            spec_ref = torch.stft(sources.float().reshape(-1, T), **stft)
            error = (spec_est - spec_ref).abs().reshape(B, S, -1)
            total = total + error.mean(dim=(0, 2))
    return total


def l1_multi_stft(estimate: torch.Tensor, sources: torch.Tensor,
                  options: LossOptions = DEFAULT_OPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoFormers' training loss: L1 on the waveforms plus `multi_stft.weight` times
    the multi-resolution STFT L1 (`stft_l1`); `reco` is the waveform L1."""
    wave, _ = l1(estimate, sources)
    spectral = stft_l1(estimate, sources, options.multi_stft)
    return wave + options.multi_stft.weight * spectral.to(wave.dtype), wave


def masked_mse(estimate: torch.Tensor, sources: torch.Tensor,
               options: LossOptions = DEFAULT_OPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """SCNet's training loss in MSST: each example's mean squared error per source; per
    source, the examples at or above the batch's `q`-quantile count as zero; the mean
    over the batch. `reco` is the mean over the batch of the root of every error."""
    per_example = F.mse_loss(estimate, sources, reduction="none").mean(dim=(2, 3))  # (B, S)
    errors = per_example.detach().float()
    threshold = torch.quantile(errors, options.q, dim=0, interpolation="linear")  # (S,)
    kept = per_example * (errors < threshold).to(per_example.dtype)
    return kept.mean(0), per_example.sqrt().mean(0)


LOSSES: tp.Mapping[str, Loss] = {"l1": l1, "mse": mse, "l1_multi_stft": l1_multi_stft,
                                 "masked_mse": masked_mse}
# Validation scores every example: a loss that leaves examples of a batch out is
# validated by its plain counterpart (one track per batch would leave everything out).
VALID_LOSSES: tp.Mapping[str, str] = {"masked_mse": "mse"}


def reco_losses(name: str, estimate: torch.Tensor, sources: torch.Tensor,
                options: LossOptions = DEFAULT_OPTIONS,
                train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss `name` of `estimate` against `sources` (B, S, C, T), per source (S,); in
    validation (`train=False`), its `VALID_LOSSES` counterpart."""
    if not train:
        name = VALID_LOSSES.get(name, name)
    if estimate.shape != sources.shape:
        raise RuntimeError(f"The model returned {tuple(estimate.shape)} for sources of "
                           f"shape (B, S, C, T)={tuple(sources.shape)}.")
    return LOSSES[name](estimate, sources, options)
