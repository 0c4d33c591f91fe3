"""Mel-Band RoFormer (Wang et al., "Mel-Band RoFormer for Music Source Separation",
2023), compatible with the checkpoints of ZFTurbo's Music-Source-Separation-Training
(MSST, `--model_type mel_band_roformer`).

As the Band-Split RoFormer (`bs_roformer`), with overlapping bands: band k holds the
STFT bins where the k-th triangle of a Slaney mel filter bank (librosa's default, over 0
to samplerate / 2) is positive. Where bands overlap, the masks estimated for a bin are
averaged.

The constructor takes MSST's `model:` options under their names, plus `sources`,
`audio_channels`, `samplerate`, `segment` (MSST's `stereo`, `num_stems`, `sample_rate`,
where given, must agree). `forward` returns (B, S, C, T) for one stem too and always the
input's length T: MSST's model returns the frames' own length (a multiple of the hop,
unless `match_input_audio_length`), the samples of which are the first ones of ours.
"""
from __future__ import annotations

import typing as tp
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from .roformer import ROFORMER_CHUNK, BandSplit, MaskEstimator, RoformerBase, Segment
from .utils import capture_init


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    linear = hz * 3 / 200
    logarithmic = 15 + np.log(np.maximum(hz, 1e-10) / 1000) * 27 / np.log(6.4)
    return np.where(hz >= 1000, logarithmic, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    linear = mel * 200 / 3
    logarithmic = 1000 * np.exp(np.log(6.4) / 27 * (mel - 15))
    return np.where(mel >= 15, logarithmic, linear)


def mel_bands(samplerate: int, n_fft: int, num_bands: int) -> torch.Tensor:
    """(num_bands, n_fft // 2 + 1) bool: the bins of each band, where its mel triangle is
    positive; the first and last bins always belong to the first and last bands."""
    bins = np.linspace(0, samplerate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(0.)), hz_to_mel(np.array(samplerate / 2)),
                                  num_bands + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - bins[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    bands = torch.from_numpy(np.minimum(rising, falling) > 0)
    bands[0, 0] = True
    bands[-1, -1] = True
    return bands


class MelBandRoformer(RoformerBase):
    """Mel-Band RoFormer.

    The defaults are those of MSST's constructor, as for `BSRoformer`.

    Args (those not listed: as `bs_roformer.BSRoformer`):
        num_bands: mel bands.
        sample_rate: MSST's, optional (checked against samplerate).
        match_input_audio_length: MSST's; our output always has the input's length.
        attn_dropout, ff_dropout: 0.1 by default, as MSST's.
    """

    freq_indices: torch.Tensor  # (bins of the bands * C,): rows of (Fr * C) of each band's bins
    num_bands_per_freq: torch.Tensor  # (Fr * C,): bands holding each row

    @capture_init
    def __init__(self,
                 sources: tp.Sequence[str],
                 audio_channels: int = 2,
                 samplerate: int = 44100,
                 segment: Segment = Fraction(ROFORMER_CHUNK, 44100),
                 *,
                 # main structure (required, as in MSST)
                 dim: int,
                 depth: int,
                 stereo: tp.Optional[bool] = None,
                 num_stems: tp.Optional[int] = None,
                 time_transformer_depth: int = 2,
                 freq_transformer_depth: int = 2,
                 linear_transformer_depth: int = 0,
                 num_bands: int = 60,
                 # attention
                 dim_head: int = 64,
                 heads: int = 8,
                 attn_dropout: float = 0.1,
                 ff_dropout: float = 0.1,
                 flash_attn: bool = True,
                 # STFT
                 dim_freqs_in: int = 1025,
                 sample_rate: tp.Optional[int] = None,
                 stft_n_fft: int = 2048,
                 stft_hop_length: int = 512,
                 stft_win_length: int = 2048,
                 stft_normalized: bool = False,
                 stft_window_fn: tp.Optional[str] = None,
                 zero_dc: bool = True,
                 # mask estimators
                 mask_estimator_depth: int = 1,
                 mlp_expansion_factor: int = 4,
                 # loss
                 multi_stft_resolution_loss_weight: float = 1.,
                 multi_stft_resolutions_window_sizes: tp.Sequence[int] = (
                     4096, 2048, 1024, 512, 256),
                 multi_stft_hop_size: int = 147,
                 multi_stft_normalized: bool = False,
                 multi_stft_window_fn: str = "hann_window",
                 match_input_audio_length: bool = False,
                 # training
                 use_torch_checkpoint: bool = False,
                 skip_connection: bool = False,
                 use_pope: bool = False):
        super().__init__()
        if sample_rate is not None and sample_rate != samplerate:
            raise ValueError(f"sample_rate={sample_rate} disagrees with samplerate={samplerate}.")
        self._setup_audio(sources, audio_channels, samplerate, segment, stereo, num_stems,
                          use_pope, stft_n_fft,
                          stft_hop_length, stft_win_length, stft_normalized, stft_window_fn,
                          zero_dc)
        self._setup_loss(multi_stft_resolution_loss_weight, multi_stft_resolutions_window_sizes,
                         multi_stft_hop_size, multi_stft_normalized, multi_stft_window_fn)
        self._setup_layers(
            dim, depth, time_transformer_depth, freq_transformer_depth,
            linear_transformer_depth, norm_output=True, skip_connection=skip_connection,
            use_torch_checkpoint=use_torch_checkpoint, dim_head=dim_head, heads=heads,
            attn_dropout=attn_dropout, ff_dropout=ff_dropout)
        self.final_norm: nn.Module = nn.Identity()
        bands = mel_bands(samplerate, stft_n_fft, num_bands)
        if not bands.any(dim=0).all():
            raise ValueError(f"num_bands={num_bands} leaves STFT bins in no band.")
        C = audio_channels
        bins = torch.arange(bands.shape[1]).expand_as(bands)[bands]  # bins of band 0, 1, ...
        indices = (bins[:, None] * C + torch.arange(C)).flatten()  # rows of (Fr * C)
        self.register_buffer("freq_indices", indices, persistent=False)
        self.register_buffer("num_bands_per_freq",
                             bands.sum(0).repeat_interleave(C).float(), persistent=False)
        band_dims = [2 * int(size) * C for size in bands.sum(1)]
        self.band_split = BandSplit(dim, band_dims)
        self.mask_estimators = nn.ModuleList(
            MaskEstimator(dim, band_dims, mask_estimator_depth + 1, mlp_expansion_factor)
            for _ in self.sources)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, C, T) mixture -> (B, S, C, T) estimated sources."""
        spec = self.spectrogram(mix)  # (B, Fr * C, frames, 2)
        B, FC, frames, _ = spec.shape
        x = spec[:, self.freq_indices].transpose(1, 2).flatten(2)  # (B, frames, bands' bins)
        masks = self.forward_stack(x.to(mix.dtype))
        masks = masks.unflatten(-1, (-1, 2)).transpose(2, 3).float()
        masks = torch.view_as_complex(masks.contiguous())  # (B, S, bands' bins, frames)
        S = masks.shape[1]
        summed = masks.new_zeros(B, S, FC, frames)
        summed.index_add_(2, self.freq_indices, masks)
        averaged = summed / self.num_bands_per_freq.clamp(min=1e-8)[:, None]
        out = torch.view_as_complex(spec)[:, None] * averaged
        return self.waveforms(out, mix.shape[-1]).to(mix.dtype)
