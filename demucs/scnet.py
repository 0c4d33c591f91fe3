"""SCNet (Tong et al., "SCNet: Sparse Compression Network for Music Source Separation",
2024), compatible with the checkpoints of ZFTurbo's Music-Source-Separation-Training
(MSST, `--model_type scnet`).

The complex STFT (real and imaginary parts of each channel as feature maps) goes through
an encoder of sparse down-sampling blocks: the frequencies are cut into a low, a middle
and a high band (shares `band_SR`), each convolved with its own stride (`band_stride`)
and then by a stack of 1-D convolution modules along time; a dual-path RNN (along
frequencies, then along time, every other layer in the Fourier domain of time) separates;
a decoder of fusion layers and sparse up-sampling (transposed convolutions per band)
returns (B, S * C * 2, Fr, frames) spectrograms, inverted by the STFT.

As MSST's: the STFT has no window (rectangular), the input is padded so that the frame
count is odd (then `num_dplayer` must be even so that the RNN ends in the time domain).
The constructor takes MSST's `model:` options under their names, plus `samplerate` and
`segment`. `forward` returns (B, S, C, T).
"""
from __future__ import annotations

import math
import typing as tp
from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional as F

from .utils import TrainingChunk, capture_init

Segment = tp.Union[float, Fraction]
# MSST's training chunk of SCNet on MUSDB18: 485100 samples (11 s at 44.1 kHz)
SCNET_CHUNK = 485100


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.sigmoid()


class ConvolutionModule(nn.Module):
    """`depth` residual blocks along time (B, C, T): GroupNorm, pointwise conv to 2 * C /
    compress with a GLU, depthwise conv, GroupNorm, Swish, pointwise conv back to C."""

    def __init__(self, channels: int, depth: int = 2, compress: float = 4, kernel: int = 3):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"conv_kernel={kernel} must be odd.")
        hidden = int(channels / compress)
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.GroupNorm(1, channels),
                nn.Conv1d(channels, hidden * 2, kernel, padding=kernel // 2),
                nn.GLU(1),
                nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden),
                nn.GroupNorm(1, hidden),
                Swish(),
                nn.Conv1d(hidden, channels, 1))
            for _ in range(abs(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


class Band(tp.NamedTuple):
    share: float  # of the frequencies (band_SR)
    stride: int  # along frequencies (band_stride)
    kernel: int  # along frequencies (band_kernel)


def band_limits(freqs: int, bands: tp.Sequence[Band]) -> tp.List[tp.Tuple[int, int]]:
    """[start, end) of the low, middle and high bands among `freqs` rows."""
    low = math.ceil(freqs * bands[0].share)
    mid = math.ceil(freqs * (bands[0].share + bands[1].share))
    return [(0, low), (low, mid), (mid, freqs)]


class SDlayer(nn.Module):
    """Sparse down-sampling: per band a (kernel, 1) convolution of stride (stride, 1)."""

    def __init__(self, channels_in: int, channels_out: int, bands: tp.Sequence[Band]):
        super().__init__()
        self.bands = list(bands)
        self.convs = nn.ModuleList(
            nn.Conv2d(channels_in, channels_out, (band.kernel, 1), (band.stride, 1))
            for band in bands)

    def forward(self, x: torch.Tensor) -> tp.Tuple[tp.List[torch.Tensor], tp.List[int]]:
        """(B, C, Fr, T) -> the bands (B, C', Fr_k, T) and their input sizes Fr_k."""
        outputs, sizes = [], []
        for conv, band, (start, end) in zip(self.convs, self.bands,
                                            band_limits(x.shape[2], self.bands)):
            size = end - start
            if band.stride == 1:
                padding = band.kernel - 1
            else:
                padding = (band.stride - size % band.stride) % band.stride
            part = F.pad(x[:, :, start:end], (0, 0, padding // 2, padding - padding // 2))
            outputs.append(conv(part))
            sizes.append(size)
        return outputs, sizes


class SUlayer(nn.Module):
    """Sparse up-sampling: per band a (kernel, 1) transposed convolution of stride
    (stride, 1), cut back to the band's size before the down-sampling."""

    def __init__(self, channels_in: int, channels_out: int, bands: tp.Sequence[Band]):
        super().__init__()
        self.convtrs = nn.ModuleList(
            nn.ConvTranspose2d(channels_in, channels_out, (band.kernel, 1), (band.stride, 1))
            for band in bands)

    def forward(self, x: torch.Tensor, lengths: tp.Sequence[int],
                sizes: tp.Sequence[int]) -> torch.Tensor:
        """(B, C, sum(lengths), T) -> (B, C', sum(sizes), T)."""
        outputs = []
        start = 0
        for index, (convtr, size) in enumerate(zip(self.convtrs, sizes)):
            end = start + lengths[index] if index < len(lengths) - 1 else x.shape[2]
            out = convtr(x[:, :, start:end])
            trim = abs(size - out.shape[2]) // 2
            outputs.append(out[:, :, trim:trim + size])
            start = end
        return torch.cat(outputs, dim=2)


class SDblock(nn.Module):
    """An encoder block: sparse down-sampling, per band convolution modules along time
    (GELU after), then a 3x3 convolution over the joined bands. Returns the output, the
    skip (the joined bands), the bands' sizes after and before the down-sampling."""

    def __init__(self, channels_in: int, channels_out: int, bands: tp.Sequence[Band],
                 depths: tp.Sequence[int], compress: float, conv_kernel: int,
                 kernel_size: int = 3):
        super().__init__()
        self.SDlayer = SDlayer(channels_in, channels_out, bands)
        self.conv_modules = nn.ModuleList(
            ConvolutionModule(channels_out, depth, compress, conv_kernel) for depth in depths)
        self.globalconv = nn.Conv2d(channels_out, channels_out, kernel_size, 1,
                                    (kernel_size - 1) // 2)

    def forward(self, x: torch.Tensor
                ) -> tp.Tuple[torch.Tensor, torch.Tensor, tp.List[int], tp.List[int]]:
        bands, sizes = self.SDlayer(x)
        processed = []
        for conv, band in zip(self.conv_modules, bands):
            B, C, Fr, T = band.shape
            rows = band.permute(0, 2, 1, 3).reshape(B * Fr, C, T)
            processed.append(F.gelu(conv(rows).view(B, Fr, C, T).permute(0, 2, 1, 3)))
        lengths = [band.shape[2] for band in processed]
        skip = torch.cat(processed, dim=2)
        return self.globalconv(skip), skip, lengths, sizes


class FusionLayer(nn.Module):
    """Adds the skip, doubles the channels, 3x3 convolution and GLU (MSST's layout: the
    convolution `conv` takes the channels twice)."""

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(channels * 2, channels * 2, kernel_size, stride=stride,
                              padding=padding)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # the convolution of the doubled input, as one of the input with the two halves
        # of the weight summed (half the work, no copy)
        C = x.shape[1]
        weight = self.conv.weight[:, :C] + self.conv.weight[:, C:]
        x = F.conv2d(x + skip, weight, self.conv.bias, self.conv.stride, self.conv.padding)
        return F.glu(x, dim=1)


class DualPathRNN(nn.Module):
    """A bidirectional LSTM along frequencies then one along time, each after a GroupNorm,
    projected back to `d_model` and added to its input. (B, C, Fr, T) -> same."""

    def __init__(self, d_model: int, expand: int):
        super().__init__()
        hidden = d_model * expand
        self.lstm_layers = nn.ModuleList(
            nn.LSTM(d_model, hidden, num_layers=1, bidirectional=True, batch_first=True)
            for _ in range(2))
        self.linear_layers = nn.ModuleList(nn.Linear(hidden * 2, d_model) for _ in range(2))
        self.norm_layers = nn.ModuleList(nn.GroupNorm(1, d_model) for _ in range(2))

    def _path(self, index: int, x: torch.Tensor, along_time: bool) -> torch.Tensor:
        B, C, Fr, T = x.shape
        y = self.norm_layers[index](x)
        y = y.permute(0, 2, 3, 1) if along_time else y.permute(0, 3, 2, 1)  # (B, ., ., C)
        rows = y.reshape(-1, y.shape[2], C)
        y, _ = self.lstm_layers[index](rows)
        y = self.linear_layers[index](y).view(B, -1, rows.shape[1], C)
        y = y.permute(0, 3, 1, 2) if along_time else y.permute(0, 3, 2, 1)
        return x + y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._path(0, x, along_time=False)
        return self._path(1, x, along_time=True)


def fourier_features(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The RNN's change of domain along time: an orthonormal real FFT, its real and
    imaginary parts as channels (B, 2C, Fr, T // 2 + 1), or back (to 2 * (T' - 1) steps)."""
    x = x.float()
    if inverse:
        half = x.shape[1] // 2
        return torch.fft.irfft(torch.complex(x[:, :half], x[:, half:]), dim=3, norm="ortho")
    z = torch.fft.rfft(x, dim=3, norm="ortho")
    return torch.cat([z.real, z.imag], dim=1)


class SeparationNet(nn.Module):
    """`num_layers` dual-path RNNs, alternately in the time domain (C channels) and the
    Fourier domain of time (2C channels)."""

    def __init__(self, channels: int, expand: int = 1, num_layers: int = 6):
        super().__init__()
        self.dp_modules = nn.ModuleList(
            DualPathRNN(channels * (2 if index % 2 else 1), expand)
            for index in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.dp_modules):
            x = fourier_features(layer(x), inverse=bool(index % 2))
        return x


class SCNet(TrainingChunk, nn.Module):
    """SCNet.

    Args:
        sources: names of the sources.
        audio_channels: input/output audio channels.
        samplerate: sample rate of the audio.
        segment: training chunk in seconds (MSST's `audio.chunk_size` over the rate); the
            longest chunk separation gives the model.
        dims: channels of the input (4: real and imaginary parts of 2 channels) and of
            each encoder level.
        nfft, hop_size, win_size, normalized: the STFT (no window).
        band_SR, band_stride, band_kernel: per band (low, middle, high): share of the
            frequencies, stride and kernel along frequencies of the sparse down-sampling.
        conv_depths: per band, residual blocks of the convolution modules.
        compress, conv_kernel: channel compression and kernel of those blocks.
        num_dplayer: dual-path RNN layers (even). expand: LSTM hidden size / channels.
    """

    @capture_init
    def __init__(self,
                 sources: tp.Sequence[str],
                 audio_channels: int = 2,
                 samplerate: int = 44100,
                 segment: Segment = Fraction(SCNET_CHUNK, 44100),
                 # main structure
                 dims: tp.Sequence[int] = (4, 32, 64, 128),
                 # STFT
                 nfft: int = 4096,
                 hop_size: int = 1024,
                 win_size: int = 4096,
                 normalized: bool = True,
                 # SD/SU layers
                 band_SR: tp.Sequence[float] = (0.175, 0.392, 0.433),
                 band_stride: tp.Sequence[int] = (1, 4, 16),
                 band_kernel: tp.Sequence[int] = (3, 4, 16),
                 # convolution modules
                 conv_depths: tp.Sequence[int] = (3, 2, 1),
                 compress: float = 4,
                 conv_kernel: int = 3,
                 # dual-path RNN
                 num_dplayer: int = 6,
                 expand: int = 1):
        super().__init__()
        check_scnet(dims, audio_channels, band_SR, band_stride, band_kernel, conv_depths,
                    num_dplayer)
        self.sources = list(sources)
        self.audio_channels = audio_channels
        self.samplerate = samplerate
        self.segment = segment
        self.dims = list(dims)
        self.hop_length = hop_size
        self.stft_config: tp.Dict[str, tp.Any] = dict(
            n_fft=nfft, hop_length=hop_size, win_length=win_size, center=True,
            normalized=normalized)
        bands = [Band(*band) for band in zip(band_SR, band_stride, band_kernel)]
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for index in range(len(dims) - 1):
            self.encoder.append(SDblock(dims[index], dims[index + 1], bands, conv_depths,
                                        compress, conv_kernel))
            out = dims[index] * (len(self.sources) if index == 0 else 1)
            self.decoder.insert(0, nn.Sequential(FusionLayer(dims[index + 1]),
                                                 SUlayer(dims[index + 1], out, bands)))
        self.separation_net = SeparationNet(dims[-1], expand, num_dplayer)

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        """The rectangular window (what torch uses when given none, without its warning)."""
        return torch.ones(tp.cast(int, self.stft_config["win_length"]), device=x.device)

    def _padding(self, length: int) -> int:
        """Samples added at the end: at least one, so that the frames are odd in number."""
        padding = self.hop_length - length % self.hop_length
        if (length + padding) // self.hop_length % 2 == 0:
            padding += self.hop_length
        return padding

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, C, T) mixture -> (B, S, C, T) estimated sources."""
        B, C, length = mix.shape
        padding = self._padding(length)
        x = F.pad(mix, (0, padding))
        with torch.autocast(mix.device.type, enabled=False):
            z = torch.stft(x.reshape(B * C, -1).float(), **self.stft_config,
                           window=self._window(mix), return_complex=True)
        z = torch.view_as_real(z)  # (B * C, Fr, frames, 2)
        Fr, frames = z.shape[1], z.shape[2]
        x = z.permute(0, 3, 1, 2).reshape(B, C * 2, Fr, frames).to(mix.dtype)
        skips, lengths, sizes = [], [], []
        for block in self.encoder:
            x, skip, band_lengths, band_sizes = block(x)
            skips.append(skip)
            lengths.append(band_lengths)
            sizes.append(band_sizes)
        x = self.separation_net(x)
        for fusion, up in tp.cast(tp.Iterable[nn.Sequential], self.decoder):
            x = up(fusion(x, skips.pop()), lengths.pop(), sizes.pop())
        x = x.float().reshape(-1, 2, Fr, frames).permute(0, 2, 3, 1)  # (B * S * C, Fr, T, 2)
        with torch.autocast(mix.device.type, enabled=False):
            out = torch.istft(torch.view_as_complex(x.contiguous()), **self.stft_config,
                              window=self._window(mix))
        out = out.view(B, len(self.sources), C, -1)[..., :length]
        return out.to(mix.dtype)


def check_scnet(dims: tp.Sequence[int], audio_channels: int, band_SR: tp.Sequence[float],
                band_stride: tp.Sequence[int], band_kernel: tp.Sequence[int],
                conv_depths: tp.Sequence[int], num_dplayer: int) -> None:
    """One-line errors for settings MSST's SCNet would fail on later."""
    if dims[0] != 2 * audio_channels:
        raise ValueError(f"dims[0]={dims[0]} must be 2 * audio_channels = "
                         f"{2 * audio_channels} (real and imaginary parts).")
    for name, values in [("band_SR", band_SR), ("band_stride", band_stride),
                         ("band_kernel", band_kernel), ("conv_depths", conv_depths)]:
        if len(values) != 3:
            raise ValueError(f"{name} must have 3 values (low, middle, high), not {len(values)}.")
    if num_dplayer % 2:
        raise ValueError(f"num_dplayer={num_dplayer} must be even (the dual-path RNN must "
                         f"end in the time domain).")
