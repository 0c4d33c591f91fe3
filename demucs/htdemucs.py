"""Hybrid Transformer Demucs (HTDemucs, Demucs v4).

The two U-Nets of Hybrid Demucs (spectrogram and waveform branches, see `hdemucs`), with
a cross-domain transformer (`transformer.CrossTransformerEncoder`) between their
innermost layers: the branches stay separate down to the bottleneck, exchange
information through cross-attention there, and each decodes its own output. The
spectrogram output (complex-as-channels, or a magnitude filtered by Wiener) is added to
the waveform output, as in HDemucs.

A model trained with `use_train_segment` runs on exactly its training length: a training
forward records that length in `segment` (a `Fraction` of seconds); in evaluation,
shorter inputs are zero padded on the right up to it and longer ones are refused
(`apply_model` cuts long inputs into chunks of `segment` seconds).
"""
from __future__ import annotations

import math
import typing as tp
from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional as F

from . import lean
from .demucs import rescale_module
from .errors import ConfigError
from .hdemucs import HybridSpectrogram
from .hlayers import add_frequency_embedding
from .transformer import CrossTransformerEncoder, check_dense_attention
from .utils import capture_init

Segment = tp.Union[float, Fraction]


class HTDemucs(HybridSpectrogram, nn.Module):
    """Hybrid Transformer Demucs: spectrogram and waveform U-Nets joined by a transformer.

    Args:
        sources: names of the sources to separate.
        audio_channels: input/output audio channels.
        channels: channels of the first layer (freq branch); `channels_time` for the
            time branch if different (with a transformer, that needs `bottom_channels`).
        growth: channel multiplier from one layer to the next.
        nfft: STFT size (hop nfft // 4).
        wiener_iters: Wiener EM iterations at evaluation when masking (`cac=False`);
            a negative value keeps the mixture phase without filtering.
        end_iters: the same during training (must equal `wiener_iters`).
        wiener_residual: add a residual source to the Wiener filter.
        cac: complex-as-channels: the freq branch predicts the complex spectrogram.
        depth: number of layers of each U-Net.
        rewrite: add rewrite convolutions (1x1 or with context) followed by GLU.
        multi_freqs: split the frequency axis into bands with these ratios for the first
            `multi_freqs_depth` layers, each band with its own weights.
        freq_emb: weight of the frequency embedding added after the first layer (0: none).
        emb_scale, emb_smooth: learning rate scale and smooth init of that embedding.
        kernel_size, stride: of the freq layers and of the time layers.
        time_stride: stride of the time-only layers (when the frequencies are exhausted).
        context: decoder rewrite context; context_enc: encoder rewrite context.
        norm_starts, norm_groups: layer from which group norm is used, and its groups.
        dconv_mode: 1 = DConv in the encoder, 2 = in the decoder, 3 = both.
        dconv_depth, dconv_comp, dconv_init: DConv depth, compression, LayerScale init.
        bottom_channels: if not 0, 1x1 convolutions to this many channels around the
            transformer.
        t_layers: transformer layers in each branch (0: no transformer).
        t_hidden_scale, t_heads, t_dropout: feed-forward scale, heads, dropout.
        t_layer_scale, t_gelu: LayerScale on residual branches; GELU (else ReLU).
        t_emb: positional embedding of the time branch: 'sin', 'cape' or 'scaled'.
        t_max_positions: size of the 'scaled' embedding.
        t_max_period, t_weight_pos_embed: longest period, weight of the embeddings.
        t_cape_mean_normalize, t_cape_augment, t_cape_glob_loc_scale: CAPE options
            (augmentation in training only: global shift, local shift, scale).
        t_sin_random_shift: random shift of the 'sin' positions.
        t_norm_in, t_norm_in_group: LayerNorm (else GroupNorm) of the transformer inputs.
        t_group_norm: GroupNorm instead of LayerNorm inside the transformer layers.
        t_norm_first, t_norm_out: pre-norm layers, with a final one-group norm.
        t_weight_decay, t_lr: weight decay and learning rate of the transformer's
            optimizer group.
        t_sparse_self_attn, t_sparse_cross_attn, t_mask_type, t_mask_random_seed,
        t_sparse_attn_window, t_global_window, t_sparsity, t_auto_sparsity: sparse
            attention (needs xformers kernels, not available: asking raises ConfigError).
        t_cross_first: the first transformer layer is a cross-attention layer.
        rescale: rescale the initial weights of the convolutions (0 to disable).
        samplerate: sample rate of the audio.
        segment: training length in seconds (a float or a `Fraction`).
        use_train_segment: run on exactly `segment` seconds in evaluation (see module doc).
    """

    hybrid = True  # the spectrogram conventions of a hybrid HDemucs (HybridSpectrogram)
    hybrid_old = False

    @capture_init
    def __init__(self,
                 sources: tp.List[str],
                 # Channels
                 audio_channels: int = 2,
                 channels: int = 48,
                 channels_time: tp.Optional[int] = None,
                 growth: float = 2,
                 # STFT
                 nfft: int = 4096,
                 wiener_iters: int = 0,
                 end_iters: int = 0,
                 wiener_residual: bool = False,
                 cac: bool = True,
                 # Main structure
                 depth: int = 4,
                 rewrite: bool = True,
                 # Frequency branch
                 multi_freqs: tp.Optional[tp.Sequence[float]] = None,
                 multi_freqs_depth: int = 3,
                 freq_emb: float = 0.2,
                 emb_scale: float = 10,
                 emb_smooth: bool = True,
                 # Convolutions
                 kernel_size: int = 8,
                 time_stride: int = 2,
                 stride: int = 4,
                 context: int = 1,
                 context_enc: int = 0,
                 # Normalization
                 norm_starts: int = 4,
                 norm_groups: int = 4,
                 # DConv residual branch
                 dconv_mode: int = 1,
                 dconv_depth: int = 2,
                 dconv_comp: int = 8,
                 dconv_init: float = 1e-3,
                 # Before the transformer
                 bottom_channels: int = 0,
                 # Transformer
                 t_layers: int = 5,
                 t_emb: str = "sin",
                 t_hidden_scale: float = 4.0,
                 t_heads: int = 8,
                 t_dropout: float = 0.0,
                 t_max_positions: int = 10000,
                 t_norm_in: bool = True,
                 t_norm_in_group: bool = False,
                 t_group_norm: bool = False,
                 t_norm_first: bool = True,
                 t_norm_out: bool = True,
                 t_max_period: float = 10000.0,
                 t_weight_decay: float = 0.0,
                 t_lr: tp.Optional[float] = None,
                 t_layer_scale: bool = True,
                 t_gelu: bool = True,
                 t_weight_pos_embed: float = 1.0,
                 t_sin_random_shift: int = 0,
                 t_cape_mean_normalize: bool = True,
                 t_cape_augment: bool = True,
                 t_cape_glob_loc_scale: tp.Sequence[float] = (5000.0, 1.0, 1.4),
                 # Sparse attention (not available: see `transformer.check_dense_attention`)
                 t_sparse_self_attn: bool = False,
                 t_sparse_cross_attn: bool = False,
                 t_mask_type: str = "diag",
                 t_mask_random_seed: int = 42,
                 t_sparse_attn_window: int = 500,
                 t_global_window: int = 100,
                 t_sparsity: float = 0.95,
                 t_auto_sparsity: bool = False,
                 # Transformer layer order
                 t_cross_first: bool = False,
                 # Weight init
                 rescale: float = 0.1,
                 # Metadata
                 samplerate: int = 44100,
                 segment: Segment = 10,
                 use_train_segment: bool = True):
        super().__init__()
        if wiener_iters != end_iters:
            raise ValueError(f"HTDemucs needs wiener_iters == end_iters, got {wiener_iters} "
                             f"and {end_iters}.")
        _check_depth(nfft, depth, stride, kernel_size, transformer=t_layers > 0)
        if t_layers > 0:
            check_dense_attention(t_sparse_self_attn, t_sparse_cross_attn)
        self.cac = cac
        self.wiener_residual = wiener_residual
        self.audio_channels = audio_channels
        self.sources = sources
        self.kernel_size = kernel_size
        self.context = context
        self.stride = stride
        self.depth = depth
        self.bottom_channels = bottom_channels
        self.channels = channels
        self.samplerate = samplerate
        self.segment: Segment = segment
        self.use_train_segment = use_train_segment
        self.nfft = nfft
        self.hop_length = nfft // 4
        self.wiener_iters = wiener_iters
        self.end_iters = end_iters
        bottom = self._build_branches(
            channels=channels, channels_time=channels_time, growth=growth,
            time_stride=time_stride, rewrite=rewrite, context_enc=context_enc,
            norm_starts=norm_starts, norm_groups=norm_groups, dconv_mode=dconv_mode,
            dconv_kw={"depth": dconv_depth, "compress": dconv_comp, "init": dconv_init},
            multi_freqs=multi_freqs, multi_freqs_depth=multi_freqs_depth,
            freq_emb=freq_emb, emb_scale=emb_scale, emb_smooth=emb_smooth)
        if rescale:
            rescale_module(self, reference=rescale)

        self.crosstransformer: tp.Optional[CrossTransformerEncoder] = None
        dim, dim_t = self._build_bottom_convs(bottom.channels, bottom.channels_time,
                                              bottom_channels)
        if t_layers > 0:
            if dim != dim_t:
                raise ConfigError(
                    f"The transformer needs the same channels in both branches, got {dim} "
                    f"(freq) and {dim_t} (time, from channels_time); set bottom_channels, "
                    "or t_layers=0.")
            self.crosstransformer = CrossTransformerEncoder(
                dim=dim, emb=t_emb, hidden_scale=t_hidden_scale,
                num_heads=t_heads, num_layers=t_layers, cross_first=t_cross_first,
                dropout=t_dropout, max_positions=t_max_positions, norm_in=t_norm_in,
                norm_in_group=t_norm_in_group, group_norm=t_group_norm,
                norm_first=t_norm_first, norm_out=t_norm_out, max_period=t_max_period,
                weight_decay=t_weight_decay, lr=t_lr, layer_scale=t_layer_scale, gelu=t_gelu,
                sin_random_shift=t_sin_random_shift, weight_pos_embed=t_weight_pos_embed,
                cape_mean_normalize=t_cape_mean_normalize, cape_augment=t_cape_augment,
                cape_glob_loc_scale=t_cape_glob_loc_scale,
                sparse_self_attn=t_sparse_self_attn, sparse_cross_attn=t_sparse_cross_attn,
                mask_type=t_mask_type, mask_random_seed=t_mask_random_seed,
                sparse_attn_window=t_sparse_attn_window, global_window=t_global_window,
                sparsity=t_sparsity, auto_sparsity=t_auto_sparsity)

    def _build_bottom_convs(self, dim: int, dim_t: int, bottom_channels: int
                            ) -> tp.Tuple[int, int]:
        """1x1 convolutions from the bottleneck channels of each branch (`dim`, `dim_t`)
        to `bottom_channels` and back, if asked; returns the transformer's channels."""
        if not bottom_channels:
            return dim, dim_t
        self.channel_upsampler = nn.Conv1d(dim, bottom_channels, 1)
        self.channel_downsampler = nn.Conv1d(bottom_channels, dim, 1)
        self.channel_upsampler_t = nn.Conv1d(dim_t, bottom_channels, 1)
        self.channel_downsampler_t = nn.Conv1d(bottom_channels, dim_t, 1)
        return bottom_channels, bottom_channels

    # -----------------------------------------------------------------------------------
    # Lengths

    @property
    def training_length(self) -> int:
        """The training length in samples, `segment` seconds."""
        return int(self.segment * self.samplerate)

    @property
    def max_allowed_segment(self) -> float:
        """Longest input, in seconds, an evaluation forward accepts (inf without
        `use_train_segment`); `apply_model` never gives longer chunks."""
        return float(self.segment) if self.use_train_segment else math.inf

    def valid_length(self, length: int) -> int:
        """The input length to give to `forward` for `length` samples of audio: the
        training length (ValueError when `length` exceeds it) with `use_train_segment`."""
        if not self.use_train_segment:
            return length
        if length > self.training_length:
            raise ValueError(f"Given length {length} is longer than the training length "
                             f"{self.training_length} of this HTDemucs ({self.segment} s); "
                             "cut the input into chunks (apply_model does).")
        return self.training_length

    # -----------------------------------------------------------------------------------
    # Forward

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, C, T) mixture -> (B, S, C, T) estimated sources."""
        length = mix.shape[-1]
        mix = self._fit_training_length(mix)
        x, xt = self.core(mix, self.spectrogram_input(mix))
        return self.waveforms(mix, x, xt)[..., :length]

    def _fit_training_length(self, mix: torch.Tensor) -> torch.Tensor:
        """With `use_train_segment`: record the training length in training, pad to it in
        evaluation (inputs longer than it are refused)."""
        if not self.use_train_segment:
            return mix
        if self.training:
            self.segment = Fraction(mix.shape[-1], self.samplerate)
            return mix
        target = self.valid_length(mix.shape[-1])
        return F.pad(mix, (0, target - mix.shape[-1]))

    def _encode_decode(self, x: torch.Tensor, xt: torch.Tensor
                       ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Both U-Nets and the transformer on normalised inputs: the freq branch
        (B, C, Fr, T) and the time branch (B, C, T) -> (B, S * C', Fr, T), (B, S * C, T)."""
        saved: tp.List[torch.Tensor] = []  # skip connections, freq branch
        saved_t: tp.List[torch.Tensor] = []  # skip connections, time branch
        lengths: tp.List[int] = []  # lengths before each freq layer, to remove the padding
        lengths_t: tp.List[int] = []  # same for the time branch
        for idx, encode in enumerate(self.encoder):
            lengths.append(x.shape[-1])
            inject = None
            if idx < len(self.tencoder):
                lengths_t.append(xt.shape[-1])
                tenc = self.tencoder[idx]
                xt = tenc(xt)
                if tenc.empty:  # the branches merge here: xt now has the shape of x
                    inject = xt
                else:
                    saved_t.append(xt)
            x = encode(x, inject)
            if idx == 0 and self.freq_emb is not None:
                x = add_frequency_embedding(x, self.freq_emb, self.freq_emb_scale)
            saved.append(x)
            lean.release_freed_memory(x)

        # Unlike HDemucs, the decoders start from the transformer output.
        return self._decode(*self._bottleneck(x, xt), saved, saved_t, lengths, lengths_t)

    def _bottleneck(self, x: torch.Tensor, xt: torch.Tensor
                    ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """The transformer between the innermost layers, (B, C, Fr, T1) and (B, C, T2)."""
        if self.crosstransformer is None:
            return x, xt
        if self.bottom_channels:
            B, C, Fr, T1 = x.shape
            x = self.channel_upsampler(x.view(B, C, Fr * T1)).view(B, -1, Fr, T1)
            xt = self.channel_upsampler_t(xt)
        x, xt = self.crosstransformer(x, xt)
        if self.bottom_channels:
            B, C, Fr, T1 = x.shape
            x = self.channel_downsampler(x.reshape(B, C, Fr * T1)).view(B, -1, Fr, T1)
            xt = self.channel_downsampler_t(xt)
        return x, xt


def _check_depth(nfft: int, depth: int, stride: int, kernel_size: int,
                 transformer: bool) -> None:
    """`ConfigError` unless the branches line up where they merge (the frequency axis
    collapses to 1) and, with a transformer, the frequency axis lasts to the bottleneck."""
    freqs = nfft // 2
    for index in range(depth):
        if freqs == 1 and transformer:
            raise ConfigError(f"With nfft={nfft}, the frequencies are exhausted after "
                              f"{index} layers: the transformer needs depth <= {index}.")
        if 1 < freqs <= kernel_size and stride ** (index + 1) != nfft // 4:
            raise ConfigError(f"With nfft={nfft}, stride={stride} and kernel_size="
                              f"{kernel_size}, the branches merge at layer {index} where "
                              f"their time steps differ (they agree for nfft="
                              f"{4 * stride ** (index + 1)}).")
        freqs = 1 if freqs <= kernel_size else freqs // stride


__all__ = ["HTDemucs"]
