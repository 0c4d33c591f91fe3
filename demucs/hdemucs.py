"""Hybrid Demucs: a U-Net over the spectrogram and one over the waveform.

The spectrogram branch ("freq") convolves along frequency, the waveform branch
("time") along time; the strides are chosen so that both reach the same shape after
five layers, where they merge into a single branch for the innermost layers and split
again on the way back. The spectrogram output is either a complex spectrogram
(`cac`, complex-as-channels) or a magnitude turned into a complex spectrogram by
masking or Wiener filtering; it is added to the waveform output.
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from . import lean
from .demucs import rescale_module
from .hlayers import (HDecLayer, HEncLayer, MultiWrap, ScaledEmbedding,
                      add_frequency_embedding)
from .spec import ispectro, spectro
from .utils import capture_init
from .wiener import mixture_phase_filter, wiener


def pad1d(x: torch.Tensor, paddings: tp.Tuple[int, int], mode: str = "constant",
          value: float = 0.) -> torch.Tensor:
    """`F.pad` on the last axis that also allows reflect padding of short inputs.

    When the input is not longer than the padding, it is first zero padded on the
    right (then left) just enough for the reflection to be defined.
    """
    length = x.shape[-1]
    padding_left, padding_right = paddings
    if mode == "reflect":
        max_pad = max(padding_left, padding_right)
        if length <= max_pad:
            extra_pad = max_pad - length + 1
            extra_pad_right = min(padding_right, extra_pad)
            extra_pad_left = extra_pad - extra_pad_right
            paddings = (padding_left - extra_pad_left, padding_right - extra_pad_right)
            x = F.pad(x, (extra_pad_left, extra_pad_right))
    return F.pad(x, paddings, mode, value)


def normalize(x: torch.Tensor, dims: tp.Tuple[int, ...]
              ) -> tp.Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x - mean) / (1e-5 + std) over `dims`, with the mean and std (kept dims)."""
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / (1e-5 + std), mean, std


class Bottleneck(tp.NamedTuple):
    """What `HybridSpectrogram._build_branches` leaves at the innermost layer."""
    channels: int  # of the freq branch
    channels_time: int  # of the time branch
    freqs: int  # frequencies left (1 once the freq axis has collapsed)


class HybridSpectrogram:
    """What HDemucs and HTDemucs share: the encoders and decoders of both branches
    (`_build_branches`), STFT and inverse aligned with the time branch, the freq branch
    input, the masks (complex-as-channels, mixture phase or Wiener filtering), and the
    decoding.

    Needs the attributes `audio_channels`, `sources`, `nfft`, `hop_length`, `cac`,
    `wiener_iters`, `end_iters`, `wiener_residual`, `hybrid`, `hybrid_old`, `depth`,
    `kernel_size`, `stride`, `context` and `training` (from `nn.Module`).
    """
    encoder: nn.ModuleList
    decoder: nn.ModuleList
    tencoder: nn.ModuleList
    tdecoder: nn.ModuleList
    freq_emb: tp.Optional[ScaledEmbedding]
    freq_emb_scale: float
    audio_channels: int
    sources: tp.List[str]
    nfft: int
    hop_length: int
    cac: bool
    wiener_iters: int
    end_iters: int
    wiener_residual: bool
    hybrid: bool
    hybrid_old: bool
    depth: int
    kernel_size: int
    stride: int
    context: int
    training: bool

    def _build_branches(self, *, channels: int, channels_time: tp.Optional[int],
                        growth: float, time_stride: int, rewrite: bool, context_enc: int,
                        norm_starts: int, norm_groups: int, dconv_mode: int,
                        dconv_kw: tp.Dict[str, tp.Any],
                        multi_freqs: tp.Optional[tp.Sequence[float]], multi_freqs_depth: int,
                        freq_emb: float, emb_scale: float, emb_smooth: bool,
                        dconv_lstm: tp.Optional[int] = None,
                        dconv_attn: tp.Optional[int] = None) -> Bottleneck:
        """Make `encoder` and `decoder` (freq branch), `tencoder` and `tdecoder` (time
        branch, when hybrid) and `freq_emb`, in the order that fixes the seeded weights
        and the state_dict keys. The arguments are the constructors' (see `HDemucs`);
        `dconv_kw` holds the DConvs' options, to which the layers from `dconv_lstm` and
        `dconv_attn` on (None: none) add a BLSTM and attention.

        The freq layers stride along frequency until a single frequency is left: the
        layer where that happens has a kernel as large as the frequencies left and no
        padding, and its time layer only the first convolution (`empty`), whose output
        the freq layer adds (the branches merge there). The layers after that one stride
        along time, `time_stride`, and have no time twin.
        """
        self.freq_emb = None
        self.freq_emb_scale = freq_emb
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        if self.hybrid:
            self.tencoder = nn.ModuleList()
            self.tdecoder = nn.ModuleList()
        bands = list(multi_freqs or [])
        chin = self.audio_channels
        chin_z = chin * 2 if self.cac else chin  # channels of the freq branch
        chout, chout_z = channels_time or channels, channels
        freqs = self.nfft // 2
        common = {"rewrite": rewrite, "norm_groups": norm_groups}
        for index in range(self.depth):
            freq = freqs > 1
            last_freq = freq and freqs <= self.kernel_size
            if last_freq:  # the branches merge: the same channels
                chout = chout_z = max(chout, chout_z)
            kw = self._layer_kw(index, freqs, time_stride, norm_starts, common, dconv_kw,
                                dconv_lstm, dconv_attn)
            kwt = dict(kw, freq=0, kernel_size=self.kernel_size, stride=self.stride, pad=True)
            multi = bool(bands) and index < multi_freqs_depth
            twin = self.hybrid and freq
            self._add_encoders(chin, chout, chin_z, chout_z, bands if multi else None,
                               kw, kwt if twin else None, empty=last_freq,
                               dconv=bool(dconv_mode & 1), context=context_enc)
            if index == 0:  # the decoders' outputs: the sources
                chin = self.audio_channels * len(self.sources)
                chin_z = chin * 2 if self.cac else chin
            self._add_decoders(chin, chout, chin_z, chout_z, bands if multi else None,
                               kw, kwt if twin else None, empty=last_freq,
                               dconv=bool(dconv_mode & 2), last=index == 0)
            chin, chin_z = chout, chout_z
            chout, chout_z = int(growth * chout), int(growth * chout_z)
            if freq:
                freqs = 1 if freqs <= self.kernel_size else freqs // self.stride
            if index == 0 and freq_emb:
                self.freq_emb = ScaledEmbedding(freqs, chin_z, smooth=emb_smooth,
                                                scale=emb_scale)
        return Bottleneck(chin_z, chin, freqs)

    def _layer_kw(self, index: int, freqs: int, time_stride: int, norm_starts: int,
                  common: tp.Dict[str, tp.Any], dconv_kw: tp.Dict[str, tp.Any],
                  dconv_lstm: tp.Optional[int], dconv_attn: tp.Optional[int]
                  ) -> tp.Dict[str, tp.Any]:
        """The options of the freq layer `index`, `freqs` frequencies before it (see
        `_build_branches`), beyond the `common` ones."""
        freq, last_freq = freqs > 1, 1 < freqs <= self.kernel_size
        dconv = dict(dconv_kw, gelu=True)
        if dconv_lstm is not None:
            dconv["lstm"] = index >= dconv_lstm
        if dconv_attn is not None:
            dconv["attn"] = index >= dconv_attn
        ker, stri = (self.kernel_size, self.stride) if freq else (2 * time_stride, time_stride)
        return dict(common, kernel_size=freqs if last_freq else ker, stride=stri, freq=freq,
                    pad=not last_freq, norm=index >= norm_starts, dconv_kw=dconv)

    def _add_encoders(self, chin: int, chout: int, chin_z: int, chout_z: int,
                      bands: tp.Optional[tp.List[float]], kw: tp.Dict[str, tp.Any],
                      kwt: tp.Optional[tp.Dict[str, tp.Any]], empty: bool, dconv: bool,
                      context: int) -> None:
        """A freq encoder layer (in `bands` when given) and its time twin (with the
        options `kwt`, when given; only its first convolution when `empty`)."""
        enc: nn.Module = HEncLayer(chin_z, chout_z, dconv=dconv, context=context, **kw)
        if kwt is not None:
            self.tencoder.append(HEncLayer(chin, chout, dconv=dconv, context=context,
                                           empty=empty, **kwt))
        self.encoder.append(MultiWrap(enc, bands) if bands else enc)

    def _add_decoders(self, chin: int, chout: int, chin_z: int, chout_z: int,
                      bands: tp.Optional[tp.List[float]], kw: tp.Dict[str, tp.Any],
                      kwt: tp.Optional[tp.Dict[str, tp.Any]], empty: bool, dconv: bool,
                      last: bool) -> None:
        """The decoder layers mirroring the encoders of `_add_encoders`, from `chout` to
        `chin` channels, inserted first: the decoders run innermost first. The layers in
        bands look along time only (`context_freq=False`); the `last` has no final GELU."""
        context = self.context
        kw_dec = dict(kw, context_freq=False) if bands else kw
        dec: nn.Module = HDecLayer(chout_z, chin_z, dconv=dconv, last=last, context=context,
                                   **kw_dec)
        if bands:
            dec = MultiWrap(dec, bands)
        if kwt is not None:
            self.tdecoder.insert(0, HDecLayer(chout, chin, dconv=dconv, empty=empty,
                                              last=last, context=context, **kwt))
        self.decoder.insert(0, dec)

    # The three steps of a forward: `spectrogram_input` (the STFT), `core` (the network)
    # and `waveforms` (masks and inverse STFT). The ONNX graphs (`demucs.graphs`) hold
    # `core` only: runners compute the two others with these same methods.

    def spectrogram_input(self, mix: torch.Tensor) -> torch.Tensor:
        """The freq branch input of `mix` (B, C, T): real, (B, 2C, Fr, frames) with
        `cac` (complex as channels), else the magnitude (B, C, Fr, frames)."""
        return self._magnitude(self._spec(mix))

    def core(self, mix: torch.Tensor, spec: torch.Tensor
             ) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        """The network on `mix` (B, C, T) and its `spectrogram_input` `spec`: both inputs
        normalised, both U-Nets, outputs denormalised. Returns the freq branch output
        (B, S, C', Fr, frames) and the time branch output (B, S, C, T), None without the
        time branch."""
        x, mean, std = normalize(spec, dims=(1, 2, 3))  # always normalised
        xt, meant, stdt = normalize(mix, dims=(1, 2)) if self.hybrid else (mix, None, None)
        x, xt = self._encode_decode(x, xt)
        B, S = x.shape[0], len(self.sources)
        x = lean.scale_shift(x.view(B, S, -1, *x.shape[-2:]), std[:, None], mean[:, None])
        if stdt is None or meant is None:
            return x, None
        return x, lean.scale_shift(xt.view(B, S, -1, mix.shape[-1]), stdt[:, None],
                                   meant[:, None])

    def waveforms(self, mix: torch.Tensor, x: torch.Tensor,
                  xt: tp.Optional[torch.Tensor]) -> torch.Tensor:
        """The estimated sources (B, S, C, T) from the outputs of `core` for `mix`."""
        return self._waveforms(mix, x, add_to=xt)

    def _encode_decode(self, x: torch.Tensor, xt: torch.Tensor
                       ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """The network on normalised inputs; each hybrid model (HDemucs, HTDemucs) has its
        own."""
        raise NotImplementedError(f"{type(self).__name__} defines no _encode_decode.")

    def _spec(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> complex (B, C, nfft // 2, ceil(T / hop)) when hybrid."""
        hl = self.hop_length
        nfft = self.nfft
        if self.hybrid:
            # Pad so that the number of frames is exactly ceil(T / hop): the time and
            # frequency branches then line up frame for frame.
            le = int(math.ceil(x.shape[-1] / hl))
            pad = hl // 2 * 3
            mode = "constant" if self.hybrid_old else "reflect"
            x = pad1d(x, (pad, pad + le * hl - x.shape[-1]), mode=mode)
        z = spectro(x, nfft, hl)[..., :-1, :]
        if self.hybrid:
            z = z[..., 2:2 + le]
        return z

    def _ispec(self, z: torch.Tensor, length: int, scale: int = 0) -> torch.Tensor:
        """Inverse of `_spec`: complex (..., F, frames) -> (..., length)."""
        hl = self.hop_length // (4 ** scale)
        if not self.hybrid:
            return ispectro(F.pad(z, (0, 0, 0, 1)), hl, length)
        z = F.pad(z, (2, 2, 0, 1))  # the last frequency, and the frames `_spec` dropped
        pad = hl // 2 * 3
        if self.hybrid_old:
            x = ispectro(z, hl, length=hl * int(math.ceil(length / hl)))
            return x[..., :length]
        x = ispectro(z, hl, length=hl * int(math.ceil(length / hl)) + 2 * pad)
        return x[..., pad:pad + length]

    def _decode(self, x: torch.Tensor, xt: torch.Tensor, saved: tp.List[torch.Tensor],
                saved_t: tp.List[torch.Tensor], lengths: tp.List[int],
                lengths_t: tp.List[int]) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Both decoders, innermost layer first, consuming the skips and lengths the
        encoders saved; returns the outputs of the freq and time branches.

        The time decoder has the innermost layers fewer: its first layer takes `pre`, the
        input of the last transposed convolution of the freq layer where the branches
        split. Outside of that layer the two branches are independent and the time layer
        runs first, so that its skip and state are gone before the freq layer, the larger.
        """
        tdecoders = list(self.tdecoder) if self.hybrid else []
        offset = len(self.decoder) - len(tdecoders)
        for idx, decode in enumerate(self.decoder):
            tdec = tdecoders[idx - offset] if idx >= offset else None
            if tdec is not None and not tdec.empty:
                xt = tdec(xt, saved_t.pop(-1), lengths_t.pop(-1))[0]
            x, pre = decode(x, saved.pop(-1), lengths.pop(-1))
            if tdec is not None and tdec.empty:
                xt = tdec(pre[:, :, 0], None, lengths_t.pop(-1))[0]
            del pre  # not kept alive through the next, larger, layer
            lean.release_freed_memory(x)
        assert not saved and not saved_t and not lengths_t
        return x, xt

    def _waveforms(self, mix: torch.Tensor, m: torch.Tensor,
                   add_to: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """`add_to` (B, S, C, T) plus the waveforms of the freq branch output `m`
        (B, S, C', Fr, frames) for the mixture `mix` (B, C, T): `_mask`, then `_ispec`.

        The mixture spectrogram is computed again here (the same values) rather than kept
        through the U-Nets. Lean, one source at a time unless Wiener filtering couples
        them (`lean.add_sources`).
        """
        z, length = self._spec(mix), mix.shape[-1]
        niters = self.end_iters if self.training else self.wiener_iters
        coupled = not self.cac and niters >= 0 and (niters > 0 or self.wiener_residual)
        return lean.add_sources(lambda sources: self._ispec(self._mask(z, sources), length),
                                m, add_to, coupled)

    def _magnitude(self, z: torch.Tensor) -> torch.Tensor:
        """Input of the freq branch: the magnitude, or real and imaginary parts as
        channels with `cac` ((B, C, Fr, T) -> (B, 2C, Fr, T))."""
        if not self.cac:
            return z.abs()
        B, C, Fr, T = z.shape
        m = torch.view_as_real(z).permute(0, 1, 4, 2, 3)
        return m.reshape(B, C * 2, Fr, T)

    def _mask(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Complex source spectrograms (B, S, C, Fr, T) from the freq branch output `m`.

        With `cac`, `m` holds them already; otherwise `m` is a magnitude that takes the
        mixture phase (`niters < 0`) or goes through Wiener filtering. Always float32
        (complex64), under mixed precision too.
        """
        if m.dtype in (torch.float16, torch.bfloat16):
            m = m.float()
        if self.cac:
            B, S, C, Fr, T = m.shape
            out = m.view(B, S, -1, 2, Fr, T).permute(0, 1, 2, 4, 5, 3)
            return torch.view_as_complex(out.contiguous())
        niters = self.end_iters if self.training else self.wiener_iters
        if niters < 0:
            z = z[:, None]
            return z / (1e-8 + z.abs()) * m
        if niters == 0 and not self.wiener_residual:
            return mixture_phase_filter(z, m).to(z.dtype)
        return self._wiener(m, z, niters)

    def _wiener(self, mag_out: torch.Tensor, mix_stft: torch.Tensor, niters: int
                ) -> torch.Tensor:
        """Wiener filtering per batch item, in windows of 300 frames."""
        init = mix_stft.dtype
        wiener_win_len = 300
        residual = self.wiener_residual
        B, S, C, Fq, T = mag_out.shape
        mag_out = mag_out.permute(0, 4, 3, 2, 1)  # (B, T, Fq, C, S)
        mix_stft = torch.view_as_real(mix_stft.permute(0, 3, 2, 1))  # (B, T, Fq, C, 2)
        outs = []
        for sample in range(B):
            out = []
            for pos in range(0, T, wiener_win_len):
                frame = slice(pos, pos + wiener_win_len)
                z_out = wiener(mag_out[sample, frame], mix_stft[sample, frame], niters,
                               residual=residual)
                out.append(z_out.transpose(-1, -2))  # (t, Fq, C, S, 2)
            outs.append(torch.cat(out, dim=0))
        result = torch.view_as_complex(torch.stack(outs, 0))
        result = result.permute(0, 4, 3, 2, 1).contiguous()  # (B, S', C, Fq, T)
        if residual:
            result = result[:, :-1]
        return result.to(init)


class HDemucs(HybridSpectrogram, nn.Module):
    """Hybrid Demucs: spectrogram and waveform U-Nets with shared inner layers.

    Args:
        sources: names of the sources to separate.
        audio_channels: input/output audio channels.
        channels: channels of the first layer (freq branch); `channels_time` for the
            time branch if different.
        growth: channel multiplier from one layer to the next.
        nfft: STFT size (hop nfft // 4).
        wiener_iters: Wiener EM iterations at evaluation when masking (`cac=False`);
            a negative value keeps the mixture phase without filtering.
        end_iters: the same during training.
        wiener_residual: add a residual source to the Wiener filter.
        cac: complex-as-channels: the freq branch predicts the complex spectrogram.
        depth: number of layers.
        rewrite: add rewrite convolutions (1x1 or with context) followed by GLU.
        hybrid: add the time branch (else spectrogram only).
        hybrid_old: the padding of the first hybrid models (zero padding, shifted iSTFT).
        multi_freqs: split the frequency axis into bands with these ratios for the first
            `multi_freqs_depth` layers, each band with its own weights.
        freq_emb: weight of the frequency embedding added after the first layer (0: none).
        emb_scale, emb_smooth: learning rate scale and smooth init of that embedding.
        kernel_size, stride: of the freq layers and the time layers.
        time_stride: stride of the time-only inner layers.
        context: decoder rewrite context; context_enc: encoder rewrite context.
        norm_starts, norm_groups: layer from which group norm is used, and its groups.
        dconv_mode: 1 = DConv in the encoder, 2 = in the decoder, 3 = both.
        dconv_depth, dconv_comp, dconv_init: DConv depth, compression, LayerScale init.
        dconv_attn, dconv_lstm: layer index from which DConv uses attention / BLSTM.
        rescale: rescale the initial weights (0 to disable).
        samplerate: sample rate of the audio.
        segment: duration in seconds of the segments used by `apply_model`.
    """

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
                 depth: int = 6,
                 rewrite: bool = True,
                 hybrid: bool = True,
                 hybrid_old: bool = False,
                 # Frequency branch
                 multi_freqs: tp.Optional[tp.Sequence[float]] = None,
                 multi_freqs_depth: int = 2,
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
                 dconv_comp: int = 4,
                 dconv_attn: int = 4,
                 dconv_lstm: int = 4,
                 dconv_init: float = 1e-4,
                 # Weight init
                 rescale: float = 0.1,
                 # Metadata
                 samplerate: int = 44100,
                 segment: float = 4 * 10):
        super().__init__()
        if hybrid_old and not hybrid:
            raise ValueError("hybrid_old=True needs hybrid=True.")
        if hybrid and wiener_iters != end_iters:
            raise ValueError("A hybrid model needs wiener_iters == end_iters.")
        self.cac = cac
        self.wiener_residual = wiener_residual
        self.audio_channels = audio_channels
        self.sources = sources
        self.kernel_size = kernel_size
        self.context = context
        self.stride = stride
        self.depth = depth
        self.channels = channels
        self.samplerate = samplerate
        self.segment = segment
        self.nfft = nfft
        self.hop_length = nfft // 4
        self.wiener_iters = wiener_iters
        self.end_iters = end_iters
        self.hybrid = hybrid
        self.hybrid_old = hybrid_old
        bottom = self._build_branches(
            channels=channels, channels_time=channels_time, growth=growth,
            time_stride=time_stride, rewrite=rewrite, context_enc=context_enc,
            norm_starts=norm_starts, norm_groups=norm_groups, dconv_mode=dconv_mode,
            dconv_kw={"depth": dconv_depth, "compress": dconv_comp, "init": dconv_init},
            dconv_lstm=dconv_lstm, dconv_attn=dconv_attn, multi_freqs=multi_freqs,
            multi_freqs_depth=multi_freqs_depth, freq_emb=freq_emb, emb_scale=emb_scale,
            emb_smooth=emb_smooth)
        if hybrid and bottom.freqs > 1:
            raise ValueError(f"A hybrid model needs the frequency axis to collapse before the "
                             f"last layer: with nfft={nfft}, stride={stride} and depth={depth}, "
                             f"{bottom.freqs} frequencies remain; increase depth or disable "
                             "hybrid.")
        if rescale:
            rescale_module(self, reference=rescale)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, C, T) mixture -> (B, S, C, T) estimated sources."""
        x, xt = self.core(mix, self.spectrogram_input(mix))
        return self.waveforms(mix, x, xt)

    def _encode_decode(self, x: torch.Tensor, xt: torch.Tensor
                       ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Run both U-Nets on normalised inputs; returns the freq and time outputs."""
        saved = []  # skip connections, freq branch
        saved_t = []  # skip connections, time branch
        lengths = []  # lengths before each freq layer, to remove the padding
        lengths_t = []  # same for the time branch
        for idx, encode in enumerate(self.encoder):
            lengths.append(x.shape[-1])
            inject = None
            if self.hybrid and idx < len(self.tencoder):
                # The branches are still separate.
                lengths_t.append(xt.shape[-1])
                tenc = self.tencoder[idx]
                xt = tenc(xt)
                if not tenc.empty:
                    saved_t.append(xt)
                else:
                    # Only the first conv of this time layer: the branches now have the
                    # same shape and merge.
                    inject = xt
            x = encode(x, inject)
            if idx == 0 and self.freq_emb is not None:
                x = add_frequency_embedding(x, self.freq_emb, self.freq_emb_scale)
            saved.append(x)
            lean.release_freed_memory(x)

        # The decoders start from zeros: the signal comes through the skips.
        x = torch.zeros_like(x)
        if self.hybrid:
            xt = torch.zeros_like(x)
        return self._decode(x, xt, saved, saved_t, lengths, lengths_t)


__all__ = ["HDemucs", "HDecLayer", "HEncLayer", "MultiWrap", "ScaledEmbedding", "pad1d"]
