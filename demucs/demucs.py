"""Demucs v3, the time-domain model, and the building blocks shared with HDemucs.

The model is a U-Net over the waveform: `depth` strided convolutions (encoder) and as
many transposed convolutions (decoder), with skip connections, optional BLSTM in the
bottleneck, and in each layer an optional residual branch `DConv` made of dilated
convolutions, LayerScale, and optionally local attention and a BLSTM.
"""
from __future__ import annotations

import math
import typing as tp

import julius
import torch
from torch import nn
from torch.nn import functional as F

from .norm import ChannelScale, FusedSequential, GroupNorm
from .utils import capture_init, center_trim, made_once


class _Resample(julius.ResampleFrac):
    """`julius.ResampleFrac`, with its downsampling in float32 on the CPU run as a
    depthwise convolution.

    julius convolves every row of the signal, as a batch of one-channel signals, with the
    `new_sr` filters at stride `old_sr`. For a downsampling (stride 2 at the end of a
    resampling Demucs), oneDNN's plain one-channel strided convolution is slow: its
    backward took 195 ms of a 2 x 4 s training step on two threads, the forward 49 ms.
    The rows as the channels of one example, each convolved with its own copy of the
    filters (`groups`), take 12 ms forward and 13 ms backward, with the same outputs bit
    for bit (tests/test_models.py) and the input gradient up to float rounding.
    """

    def forward(self, x: torch.Tensor, output_length: tp.Optional[int] = None,
                full: bool = False) -> torch.Tensor:
        if isinstance(x.shape[-1], torch.SymInt) and output_length is None and not full:
            return self._traced(x)
        if (self.old_sr == 1 or x.device.type != "cpu" or x.dtype != torch.float32
                or output_length is not None or full):
            return super().forward(x, output_length, full)
        *shape, length = x.shape
        rows = x.reshape(-1, length)  # (R, T)
        count = len(rows)
        padded = F.pad(rows[:, None], (self._width, self._width + self.old_sr),
                       mode="replicate")
        kernel = tp.cast(torch.Tensor, self.kernel)  # (new_sr, 1, W)
        filters = kernel.repeat(count, 1, 1)  # (R * new_sr, 1, W): one copy per row
        out = F.conv1d(padded.view(1, count, -1), filters, stride=self.old_sr, groups=count)
        y = out.view(count, self.new_sr, -1).transpose(1, 2).reshape(*shape, -1)
        # julius's length: the floor of new_sr * length / old_sr in float32
        kept = int(torch.floor(torch.tensor(self.new_sr * length / self.old_sr)))
        return y[..., :kept]

    def _traced(self, x: torch.Tensor) -> torch.Tensor:
        """julius's computation on a symbolic length (an ONNX export of any length),
        where it would make a tensor of the length."""
        *shape, length = x.shape
        rows = x.reshape(-1, length)[:, None]
        padded = F.pad(rows, (self._width, self._width + self.old_sr), mode="replicate")
        y = F.conv1d(padded, tp.cast(torch.Tensor, self.kernel), stride=self.old_sr)
        y = y.transpose(1, 2).reshape(*shape, -1)
        return y[..., :self.new_sr * length // self.old_sr]


@made_once
def _resampler(old: int, new: int, device: torch.device,
               dtype: torch.dtype) -> julius.ResampleFrac:
    """`julius.resample_frac(x, old, new)` as a module built once per device and dtype
    (the function computes its kernel on the CPU at each call and copies it)."""
    return _Resample(old, new).to(device, dtype)


@torch.library.custom_op("demucs::lstm", mutates_args=())
def traced_lstm(x: torch.Tensor, h0: torch.Tensor, weights: tp.List[torch.Tensor],
                layers: int) -> torch.Tensor:
    """A bidirectional `nn.LSTM` with biases over (T, B, C) from the initial states `h0`
    (2 * layers, B, H) for both the hidden and cell states: its output (T, B, 2H),
    `weights` in the order of `nn.LSTM._flat_weights`. One operator for an export with a
    symbolic T: the tracer would unroll `torch.lstm` step by step (and fix T);
    `demucs.graphs` gives the ONNX LSTM for it."""
    return torch.lstm(x, (h0, h0), weights, True, layers, 0., False, True, False)[0]


@traced_lstm.register_fake
def _traced_lstm_shape(x: torch.Tensor, h0: torch.Tensor, weights: tp.List[torch.Tensor],
                       layers: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1], 2 * h0.shape[2])


class BLSTM(nn.Module):
    """Bidirectional LSTM over (B, C, T), projected back to C channels.

    With `max_steps`, long inputs are cut into overlapping frames of `max_steps` steps
    (hop `max_steps // 2`); each frame keeps its central part when frames are stitched.
    With `skip`, the input is added to the output.
    """

    def __init__(self, dim: int, layers: int = 1, max_steps: tp.Optional[int] = None,
                 skip: bool = False):
        super().__init__()
        if max_steps is not None and max_steps % 4 != 0:
            raise ValueError("max_steps must be a multiple of 4.")
        self.max_steps = max_steps
        self.lstm = nn.LSTM(bidirectional=True, num_layers=layers, hidden_size=dim,
                            input_size=dim)
        self.linear = nn.Linear(2 * dim, dim)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-1]
        traced = isinstance(T, torch.SymInt)
        if self.max_steps is not None and traced:
            # Traced with a symbolic length (an ONNX export of any length): both ways
            # are in the graph, the length picks one when it runs.
            # (flat outputs: the branches' strides must be provably the same)
            out = torch.cond(T > self.max_steps,
                             lambda x: self._framed(x, traced=True).reshape(-1),
                             lambda x: self._whole(x, traced=True).reshape(-1),
                             (x,)).view(x.shape)
        elif self.max_steps is not None and T > self.max_steps:
            out = self._framed(x)
        else:
            out = self._whole(x, traced)
        return out + x if self.skip else out

    def _whole(self, x: torch.Tensor, traced: bool = False) -> torch.Tensor:
        """The LSTM over the whole sequence: (B, C, T) -> (B, C, T). `traced`: in a
        branch of `torch.cond`, where the module may not update its weight list."""
        x = x.permute(2, 0, 1)  # (T, B, C)
        x = self._lstm_function(x) if traced else self.lstm(x)[0]
        x = self.linear(x)
        return x.permute(1, 2, 0)  # (B, C, T)

    def _lstm_function(self, x: torch.Tensor) -> torch.Tensor:
        """`self.lstm(x)[0]` as one operator (`traced_lstm`)."""
        lstm = self.lstm
        h0 = x.new_zeros(2 * lstm.num_layers, x.shape[1], lstm.hidden_size)
        weights = [getattr(lstm, name) for name in lstm._flat_weights_names]
        return traced_lstm(x, h0, weights, lstm.num_layers)

    def _framed(self, x: torch.Tensor, traced: bool = False) -> torch.Tensor:
        """The LSTM over overlapping frames of `max_steps`, the centre of each kept:
        (B, C, T) -> (B, C, T), T > `max_steps` (at least 3 frames). The frames are
        those of `utils.unfold` (zeros after the end)."""
        assert self.max_steps is not None
        B, C, T = x.shape
        width = self.max_steps
        stride = width // 2
        nframes = (T + stride - 1) // stride
        padded = F.pad(x, (0, (nframes - 1) * stride + width - T))
        frames = padded.unfold(-1, width, stride)  # (B, C, n_frames, width)
        x = self._whole(frames.permute(0, 2, 1, 3).reshape(-1, C, width), traced)
        return self._stitch(x.reshape(B, -1, C, width), stride // 2)[..., :T]

    @staticmethod
    def _stitch(frames: torch.Tensor, limit: int) -> torch.Tensor:
        """Keep the centre of each frame (B, n_frames, C, width), n_frames >= 2, and
        concatenate: (B, C, steps); the first and last frames keep their outer ends."""
        B, _, C, _ = frames.shape
        middle = frames[:, 1:-1, :, limit:-limit].permute(0, 2, 1, 3).reshape(B, C, -1)
        return torch.cat([frames[:, 0, :, :-limit], middle, frames[:, -1, :, limit:]], -1)


def rescale_conv(conv: tp.Any, reference: float) -> None:
    """Rescale a convolution so that its weight std moves towards `reference`."""
    std = conv.weight.std().detach()
    scale = (std / reference) ** 0.5
    conv.weight.data /= scale
    if conv.bias is not None:
        conv.bias.data /= scale


def rescale_module(module: nn.Module, reference: float) -> None:
    """Apply `rescale_conv` to every (transposed) 1d/2d convolution of `module`."""
    for sub in module.modules():
        if isinstance(sub, (nn.Conv1d, nn.ConvTranspose1d, nn.Conv2d, nn.ConvTranspose2d)):
            rescale_conv(sub, reference)


class LayerScale(ChannelScale):
    """Per-channel learnt scale of a residual branch, initialised to `init`."""

    def __init__(self, channels: int, init: float = 0):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(channels, requires_grad=True))
        self.scale.data[:] = init


class LocalState(nn.Module):
    """Local attention over time with learnt decay (and optional periodic) kernels.

    Each query attends to every other time step; `ndecay` learnt decays penalise far
    away keys, `nfreqs` cosine kernels add a periodic prior.
    """

    def __init__(self, channels: int, heads: int = 4, nfreqs: int = 0, ndecay: int = 4):
        super().__init__()
        if channels % heads != 0:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads}).")
        self.heads = heads
        self.nfreqs = nfreqs
        self.ndecay = ndecay
        self.content = nn.Conv1d(channels, channels, 1)
        self.query = nn.Conv1d(channels, channels, 1)
        self.key = nn.Conv1d(channels, channels, 1)
        if nfreqs:
            self.query_freqs = nn.Conv1d(channels, heads * nfreqs, 1)
        if ndecay:
            self.query_decay = nn.Conv1d(channels, heads * ndecay, 1)
            # Small decays at init (after the sigmoid): the widest window to start with.
            self.query_decay.weight.data *= 0.01
            assert self.query_decay.bias is not None
            self.query_decay.bias.data[:] = -2
        self.proj = nn.Conv1d(channels + heads * nfreqs, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T = x.shape
        heads = self.heads
        indexes = torch.arange(T, device=x.device, dtype=x.dtype)
        delta = indexes[:, None] - indexes[None, :]  # (T keys, T queries)

        queries = self.query(x).view(B, heads, -1, T)
        keys = self.key(x).view(B, heads, -1, T)
        dots = torch.einsum("bhct,bhcs->bhts", keys, queries)  # t: keys, s: queries
        dots /= keys.shape[2] ** 0.5
        if self.nfreqs:
            periods = torch.arange(1, self.nfreqs + 1, device=x.device, dtype=x.dtype)
            freq_kernel = torch.cos(2 * math.pi * delta / periods.view(-1, 1, 1))
            freq_q = self.query_freqs(x).view(B, heads, -1, T) / self.nfreqs ** 0.5
            dots += torch.einsum("fts,bhfs->bhts", freq_kernel, freq_q)
        if self.ndecay:
            decays = torch.arange(1, self.ndecay + 1, device=x.device, dtype=x.dtype)
            decay_q = torch.sigmoid(self.query_decay(x).view(B, heads, -1, T)) / 2
            decay_kernel = -decays.view(-1, 1, 1) * delta.abs() / self.ndecay ** 0.5
            dots += torch.einsum("fts,bhfs->bhts", decay_kernel, decay_q)

        # A step never attends to itself.
        dots.masked_fill_(torch.eye(T, device=dots.device, dtype=torch.bool), -100)
        weights = torch.softmax(dots, dim=2)

        content = self.content(x).view(B, heads, -1, T)
        result = torch.einsum("bhts,bhct->bhcs", weights, content)
        if self.nfreqs:
            time_sig = torch.einsum("bhts,fts->bhfs", weights, freq_kernel)
            result = torch.cat([result, time_sig], 2)
        result = result.reshape(B, -1, T)
        return x + self.proj(result)


class DConv(nn.Module):
    """Residual branch of dilated 1d convolutions, applied on (B, C, T).

    Args:
        channels: input/output channels.
        compress: the hidden dimension is `channels / compress`.
        depth: number of layers; a negative value disables the dilation.
        init: initial LayerScale value.
        norm: group norm (1 group) after each convolution.
        attn: add local attention (`LocalState`).
        heads, ndecay: attention heads and decay kernels.
        lstm: add a BLSTM (frames of 200 steps).
        gelu: GELU activation instead of ReLU.
        kernel: kernel size of the dilated convolutions (odd).
    """

    def __init__(self, channels: int, compress: float = 4, depth: int = 2, init: float = 1e-4,
                 norm: bool = True, attn: bool = False, heads: int = 4, ndecay: int = 4,
                 lstm: bool = False, gelu: bool = True, kernel: int = 3, dilate: bool = True):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError("DConv kernel size must be odd.")
        self.channels = channels
        self.compress = compress
        self.depth = abs(depth)
        dilate = depth > 0
        hidden = int(channels / compress)
        act: tp.Type[nn.Module] = nn.GELU if gelu else nn.ReLU

        def norm_fn(dim: int) -> nn.Module:
            return GroupNorm(1, dim) if norm else nn.Identity()

        self.layers = nn.ModuleList([])
        for d in range(self.depth):
            dilation = 2 ** d if dilate else 1
            padding = dilation * (kernel // 2)
            mods: tp.List[nn.Module] = [
                nn.Conv1d(channels, hidden, kernel, dilation=dilation, padding=padding),
                norm_fn(hidden), act(),
                nn.Conv1d(hidden, 2 * channels, 1),
                norm_fn(2 * channels), nn.GLU(1),
                LayerScale(channels, init),
            ]
            if attn:
                mods.insert(3, LocalState(hidden, heads=heads, ndecay=ndecay))
            if lstm:
                mods.insert(3, BLSTM(hidden, layers=2, max_steps=200, skip=True))
            self.layers.append(FusedSequential(*mods))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


class Demucs(nn.Module):
    """Demucs v3 time-domain source separation model.

    Args:
        sources: names of the sources to separate.
        audio_channels: input/output audio channels.
        channels: channels of the first encoder layer.
        growth: channel multiplier from one layer to the next.
        depth: number of encoder/decoder layers.
        rewrite: add a 1x1 convolution (encoder) or context convolution (decoder).
        lstm_layers: BLSTM layers in the bottleneck (0 for none).
        kernel_size, stride: of the encoder/decoder convolutions.
        context: context of the decoder's rewrite convolution.
        gelu: GELU instead of ReLU; glu: GLU after the rewrite convolutions.
        norm_starts: layer index from which group norm is used.
        norm_groups: number of groups of the group norms.
        dconv_mode: 1 = DConv in the encoder, 2 = in the decoder, 3 = both.
        dconv_depth, dconv_comp, dconv_init: DConv depth, compression, LayerScale init.
        dconv_attn, dconv_lstm: layer index from which DConv uses attention / BLSTM.
        normalize: normalise the input by its own mean and std.
        resample: upsample the input by 2 before the model and downsample after.
        rescale: rescale the initial weights (0 to disable).
        samplerate: sample rate of the audio.
        segment: duration in seconds of the segments used by `apply_model`.
    """

    @capture_init
    def __init__(self,
                 sources: tp.List[str],
                 # Channels
                 audio_channels: int = 2,
                 channels: int = 64,
                 growth: float = 2.,
                 # Main structure
                 depth: int = 6,
                 rewrite: bool = True,
                 lstm_layers: int = 0,
                 # Convolutions
                 kernel_size: int = 8,
                 stride: int = 4,
                 context: int = 1,
                 # Activations
                 gelu: bool = True,
                 glu: bool = True,
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
                 # Pre/post processing
                 normalize: bool = True,
                 resample: bool = True,
                 # Weight init
                 rescale: float = 0.1,
                 # Metadata
                 samplerate: int = 44100,
                 segment: float = 4 * 10):
        super().__init__()
        self.audio_channels = audio_channels
        self.sources = sources
        self.kernel_size = kernel_size
        self.context = context
        self.stride = stride
        self.depth = depth
        self.resample = resample
        self.channels = channels
        self.normalize = normalize
        self.samplerate = samplerate
        self.segment = segment
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.skip_scales = nn.ModuleList()

        ch_scale = 2 if glu else 1
        act2: tp.Type[nn.Module] = nn.GELU if gelu else nn.ReLU

        def activation() -> nn.Module:
            return nn.GLU(dim=1) if glu else nn.ReLU()

        in_channels = audio_channels
        for index in range(depth):
            def norm_fn(dim: int, index: int = index) -> nn.Module:
                if index >= norm_starts:
                    return GroupNorm(norm_groups, dim)
                return nn.Identity()

            dconv_kw = dict(depth=dconv_depth, init=dconv_init, compress=dconv_comp,
                            attn=index >= dconv_attn, lstm=index >= dconv_lstm)
            encode: tp.List[nn.Module] = [
                nn.Conv1d(in_channels, channels, kernel_size, stride),
                norm_fn(channels), act2()]
            if dconv_mode & 1:
                encode += [DConv(channels, **dconv_kw)]  # type: ignore[arg-type]
            if rewrite:
                encode += [nn.Conv1d(channels, ch_scale * channels, 1),
                           norm_fn(ch_scale * channels), activation()]
            self.encoder.append(FusedSequential(*encode))

            out_channels = in_channels if index > 0 else len(self.sources) * audio_channels
            decode: tp.List[nn.Module] = []
            if rewrite:
                decode += [nn.Conv1d(channels, ch_scale * channels, 2 * context + 1,
                                     padding=context),
                           norm_fn(ch_scale * channels), activation()]
            if dconv_mode & 2:
                decode += [DConv(channels, **dconv_kw)]  # type: ignore[arg-type]
            decode += [nn.ConvTranspose1d(channels, out_channels, kernel_size, stride)]
            if index > 0:
                decode += [norm_fn(out_channels), act2()]
            self.decoder.insert(0, FusedSequential(*decode))
            in_channels = channels
            channels = int(growth * channels)

        channels = in_channels
        self.lstm: tp.Optional[BLSTM] = BLSTM(channels, lstm_layers) if lstm_layers else None
        if rescale:
            rescale_module(self, reference=rescale)

    def valid_length(self, length: int) -> int:
        """Smallest input length >= `length` for which every convolution window is full.

        The model output is then center-trimmed back to the input length.
        """
        if self.resample:
            length *= 2
        for _ in range(self.depth):
            length = math.ceil((length - self.kernel_size) / self.stride) + 1
            length = max(1, length)
        for _ in range(self.depth):
            length = (length - 1) * self.stride + self.kernel_size
        if self.resample:
            length = math.ceil(length / 2)
        return int(length)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, C, T) mixture -> (B, S, C, T) estimated sources."""
        x = mix
        length = x.shape[-1]
        mean: tp.Union[torch.Tensor, float] = 0.
        std: tp.Union[torch.Tensor, float] = 1.
        if self.normalize:
            mono = mix.mean(dim=1, keepdim=True)
            mean = mono.mean(dim=-1, keepdim=True)
            std = mono.std(dim=-1, keepdim=True)
            x = (x - mean) / (1e-5 + std)

        # A symbolic length (an ONNX export) is a valid one (`graphs.length_axis`).
        delta = 0 if isinstance(length, torch.SymInt) else self.valid_length(length) - length
        x = F.pad(x, (delta // 2, delta - delta // 2))
        if self.resample:
            x = _resampler(1, 2, x.device, x.dtype)(x)

        saved = []
        for encode in self.encoder:
            x = encode(x)
            saved.append(x)
        if self.lstm is not None:
            x = self.lstm(x)
        for decode in self.decoder:
            skip = center_trim(saved.pop(-1), x)
            x = decode(x + skip)

        if self.resample:
            x = _resampler(2, 1, x.device, x.dtype)(x)
        x = x * std + mean
        x = center_trim(x, mix)  # (the length of `mix`, symbolic too)
        return x.view(x.size(0), len(self.sources), self.audio_channels, x.size(-1))

    def load_state_dict(self, state: tp.Mapping[str, tp.Any], strict: bool = True,
                        assign: bool = False) -> tp.Any:
        """Also accept the key layout of the previous Demucs generation."""
        state = dict(state)
        for idx in range(self.depth):
            for part in ["encoder", "decoder"]:
                for name in ["bias", "weight"]:
                    new = f"{part}.{idx}.3.{name}"
                    old = f"{part}.{idx}.2.{name}"
                    if old in state and new not in state:
                        state[new] = state.pop(old)
        return super().load_state_dict(state, strict=strict, assign=assign)
