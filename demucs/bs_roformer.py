"""Band-Split RoFormer (Lu et al., "Music Source Separation with Band-Split RoPE
Transformer", 2023), compatible with the checkpoints of ZFTurbo's
Music-Source-Separation-Training (MSST, `--model_type bs_roformer`).

The stereo STFT is cut into fixed bands of frequencies (`freqs_per_bands`), each band
embedded to `dim` features; transformers alternate along time and along bands; one mask
estimator per source gives a complex mask per bin, applied to the mixture's STFT.

The constructor takes MSST's `model:` options under their names, plus what our models
carry (`sources`, `audio_channels`, `samplerate`, `segment`). MSST's `stereo` and
`num_stems` are implied by `audio_channels` and `sources` (given, they must agree).
Unlike MSST's, `forward` returns (B, S, C, T) for one stem too.
"""
from __future__ import annotations

import typing as tp
from fractions import Fraction

import torch
from torch import nn

from .roformer import (ROFORMER_CHUNK, BandSplit, MaskEstimator,
                       RMSNorm, RoformerBase, Segment)
from .utils import capture_init

# 62 bands over the 1025 bins of a 2048-point STFT (the paper's split at 44.1 kHz)
DEFAULT_FREQS_PER_BANDS = (
    (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129))


class BSRoformer(RoformerBase):
    """Band-Split RoFormer.

    The defaults are those of MSST's constructor (an option an MSST config leaves out
    means the same here); `conf/config.yaml` gives its MUSDB configuration.

    Args:
        sources: names of the sources (MSST's `training.instruments`, or its
            `target_instrument` alone).
        audio_channels: 1 or 2 (MSST's `stereo`).
        samplerate: sample rate of the audio.
        segment: training chunk in seconds (MSST's `audio.chunk_size` over the rate); the
            longest chunk separation gives the model.
        dim: features per band. depth: axial layers.
        stereo, num_stems: MSST's, optional (checked against audio_channels, sources).
        time_transformer_depth, freq_transformer_depth, linear_transformer_depth: blocks
            per axial layer of each transformer (linear: over every (time, band) position).
        freqs_per_bands: STFT bins per band, summing to stft_n_fft // 2 + 1.
        dim_head, heads, attn_dropout, ff_dropout: attention settings.
        flash_attn: MSST's switch of attention kernels (attention always runs through
            scaled_dot_product_attention here; kept for the checkpoints' configs).
        dim_freqs_in: MSST's, unused (the bins come from stft_n_fft).
        stft_n_fft, stft_hop_length, stft_win_length, stft_normalized, stft_window_fn:
            the STFT (window: a torch window function by name, Hann when None).
        zero_dc: zero the DC bin of the estimates before the inverse STFT.
        mask_estimator_depth, mlp_expansion_factor: the mask estimators' MLPs.
        multi_stft_*: the multi-resolution STFT term of the training loss
            (`optim.loss=l1_multi_stft`).
        use_torch_checkpoint: recompute the transformers in the backward pass (memory).
        skip_connection: add the outputs of earlier axial layers to each layer's input.
        use_pope: MSST's polar positional embedding, not supported (must be false).
    """

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
                 freqs_per_bands: tp.Sequence[int] = DEFAULT_FREQS_PER_BANDS,
                 # attention
                 dim_head: int = 64,
                 heads: int = 8,
                 attn_dropout: float = 0.,
                 ff_dropout: float = 0.,
                 flash_attn: bool = True,
                 # STFT
                 dim_freqs_in: int = 1025,
                 stft_n_fft: int = 2048,
                 stft_hop_length: int = 512,
                 stft_win_length: int = 2048,
                 stft_normalized: bool = False,
                 stft_window_fn: tp.Optional[str] = None,
                 zero_dc: bool = True,
                 # mask estimators
                 mask_estimator_depth: int = 2,
                 mlp_expansion_factor: int = 4,
                 # loss
                 multi_stft_resolution_loss_weight: float = 1.,
                 multi_stft_resolutions_window_sizes: tp.Sequence[int] = (
                     4096, 2048, 1024, 512, 256),
                 multi_stft_hop_size: int = 147,
                 multi_stft_normalized: bool = False,
                 multi_stft_window_fn: str = "hann_window",
                 # training
                 use_torch_checkpoint: bool = False,
                 skip_connection: bool = False,
                 use_pope: bool = False):
        super().__init__()
        bins = stft_n_fft // 2 + 1
        if len(freqs_per_bands) < 2 or sum(freqs_per_bands) != bins:
            raise ValueError(f"freqs_per_bands must list 2 or more bands summing to the "
                             f"{bins} bins of stft_n_fft={stft_n_fft}, not "
                             f"{sum(freqs_per_bands)}.")
        self._setup_audio(sources, audio_channels, samplerate, segment, stereo, num_stems,
                          use_pope, stft_n_fft,
                          stft_hop_length, stft_win_length, stft_normalized, stft_window_fn,
                          zero_dc)
        self._setup_loss(multi_stft_resolution_loss_weight, multi_stft_resolutions_window_sizes,
                         multi_stft_hop_size, multi_stft_normalized, multi_stft_window_fn)
        self._setup_layers(
            dim, depth, time_transformer_depth, freq_transformer_depth,
            linear_transformer_depth, norm_output=False, skip_connection=skip_connection,
            use_torch_checkpoint=use_torch_checkpoint, dim_head=dim_head, heads=heads,
            attn_dropout=attn_dropout, ff_dropout=ff_dropout)
        self.final_norm: nn.Module = RMSNorm(dim)
        band_dims = [2 * size * audio_channels for size in freqs_per_bands]
        self.band_split = BandSplit(dim, band_dims)
        self.mask_estimators = nn.ModuleList(
            MaskEstimator(dim, band_dims, mask_estimator_depth, mlp_expansion_factor)
            for _ in self.sources)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, C, T) mixture -> (B, S, C, T) estimated sources."""
        spec = self.spectrogram(mix)  # (B, Fr * C, frames, 2)
        x = spec.transpose(1, 2).flatten(2)  # (B, frames, Fr * C * 2)
        masks = self.forward_stack(x.to(mix.dtype))  # (B, S, frames, Fr * C * 2)
        masks = masks.unflatten(-1, (-1, 2)).transpose(2, 3).float()  # (B, S, Fr * C, frames, 2)
        out = torch.view_as_complex(spec)[:, None] * torch.view_as_complex(masks.contiguous())
        return self.waveforms(out, mix.shape[-1]).to(mix.dtype)
