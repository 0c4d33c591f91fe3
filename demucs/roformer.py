"""What the band-split RoFormers share (`bs_roformer`, `mel_roformer`): layers, STFT, loss.

Both models embed bands of a complex spectrogram (`BandSplit`), run transformers along
time and along bands in turn (`Transformer`, attention with rotary positions), and
estimate a complex mask per source and band (`MaskEstimator`). The submodules and their
attribute names give the `state_dict` keys of ZFTurbo's Music-Source-Separation-Training
(MSST) checkpoints, so that its files load as they are: e.g. a feed-forward is a
`net` Sequential of (RMSNorm, Linear, GELU, Dropout, Linear, Dropout), keys `net.0.gamma`,
`net.1.weight`, `net.4.weight`.

Attention runs through `torch.nn.functional.scaled_dot_product_attention` (the same
values as the explicit softmax, within float rounding; fused kernels where there are).
"""
from __future__ import annotations

import typing as tp
from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .losses import MultiStftSettings
from .utils import TrainingChunk


class RMSNorm(nn.Module):
    """x / |x| * sqrt(dim) * gamma over the last axis."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * (self.gamma * self.scale)


class RotaryEmbedding(nn.Module):
    """Rotary positions on interleaved pairs of features: pair k of position n turns by
    n * freqs[k]. `freqs` is a (frozen) parameter, as MSST's checkpoints hold it."""

    def __init__(self, dim: int, theta: float = 10000.):
        super().__init__()
        freqs = 1. / theta ** (torch.arange(0, dim, 2)[:dim // 2].float() / dim)
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def turns(self, length: int, device: torch.device) -> torch.Tensor:
        """(N, D' / 2) complex: the turn of each pair at each position."""
        positions = torch.arange(length, device=device, dtype=self.freqs.dtype)
        angles = positions[:, None] * self.freqs
        return torch.complex(angles.cos(), angles.sin())

    def rotate(self, x: torch.Tensor, turns: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """(..., N, D) -> (..., N, D), position n along N (`turns`: from `turns(N)`)."""
        if turns is None:
            turns = self.turns(x.shape[-2], x.device)
        rot = 2 * turns.shape[-1]
        head, tail = x[..., :rot], x[..., rot:]
        if complex_view_ok(head):  # one complex product, on the input's memory
            turned = torch.view_as_complex(head.unflatten(-1, (-1, 2))) * turns.to(
                torch.complex128 if x.dtype == torch.float64 else torch.complex64)
            head = torch.view_as_real(turned).flatten(-2)
        else:  # half precision: the same product in real arithmetic
            pairs = head.unflatten(-1, (-1, 2))
            turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
            cos = turns.real.repeat_interleave(2, dim=-1).to(x.dtype)
            sin = turns.imag.repeat_interleave(2, dim=-1).to(x.dtype)
            head = head * cos + turned * sin
        return torch.cat((head, tail), dim=-1) if tail.shape[-1] else head


def complex_view_ok(x: torch.Tensor) -> bool:
    """Whether `view_as_complex` takes x's pairs of features as they lie (float32/64)."""
    return (x.dtype in (torch.float32, torch.float64) and x.stride(-1) == 1
            and x.storage_offset() % 2 == 0 and all(step % 2 == 0 for step in x.stride()[:-1]))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(RMSNorm(dim), nn.Linear(dim, inner), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention with rotary positions and a sigmoid gate per head."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.,
                 rotary_embed: tp.Optional[RotaryEmbedding] = None):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        inner = heads * dim_head
        self.rotary_embed = rotary_embed
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_gates = nn.Linear(dim, heads)
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=False), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)."""
        x = self.norm(x)
        B, N, _ = x.shape
        q, k, v = self.to_qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.rotary_embed is not None:
            turns = self.rotary_embed.turns(N, x.device)
            q, k = self.rotary_embed.rotate(q, turns), self.rotary_embed.rotate(k, turns)
        dropout = self.dropout if self.training else 0.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, H, N, Dh)
        out = out * self.to_gates(x).transpose(1, 2).sigmoid()[..., None]
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


class LinearAttention(nn.Module):
    """Attention across features (cross-covariance), linear in the sequence length:
    l2-normalised queries and keys, a learned temperature per head, scale 8."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 32, dropout: float = 0.,
                 scale: float = 8.):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.scale = scale
        inner = heads * dim_head
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Sequential(nn.Linear(dim, inner * 3, bias=False))
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.to_out = nn.Sequential(nn.Identity(), nn.Linear(inner, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)."""
        x = self.norm(x)
        B, N, _ = x.shape
        q, k, v = self.to_qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 4, 1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # (B, H, Dh, N)
        q = q * self.temperature.exp()
        dropout = self.dropout if self.training else 0.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        return self.to_out(out.permute(0, 3, 1, 2).reshape(B, N, -1))


class Transformer(nn.Module):
    """`depth` pre-norm blocks of attention and feed-forward, each with its residual;
    a final RMSNorm `norm` when `norm_output` (the Mel-Band RoFormer's layout)."""

    def __init__(self, dim: int, depth: int, dim_head: int = 64, heads: int = 8,
                 attn_dropout: float = 0., ff_dropout: float = 0., ff_mult: int = 4,
                 norm_output: bool = True, rotary_embed: tp.Optional[RotaryEmbedding] = None,
                 linear_attn: bool = False):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            attn: nn.Module
            if linear_attn:
                attn = LinearAttention(dim, heads=heads, dim_head=dim_head, dropout=attn_dropout)
            else:
                attn = Attention(dim, heads=heads, dim_head=dim_head, dropout=attn_dropout,
                                 rotary_embed=rotary_embed)
            self.layers.append(nn.ModuleList([attn, FeedForward(dim, ff_mult, ff_dropout)]))
        self.norm = RMSNorm(dim) if norm_output else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in tp.cast(tp.Iterable[nn.ModuleList], self.layers):
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


def equal_runs(sizes: tp.Sequence[int]) -> tp.List[tp.Tuple[int, int]]:
    """[start, end) of each run of consecutive bands of the same size."""
    runs: tp.List[tp.Tuple[int, int]] = []
    start = 0
    for index in range(1, len(sizes) + 1):
        if index == len(sizes) or sizes[index] != sizes[start]:
            runs.append((start, index))
            start = index
    return runs


def stacked(layers: tp.Sequence[nn.Module], name: str) -> torch.Tensor:
    """The parameter `name` of each of `layers`, stacked (a copy, through which gradients
    reach each layer's own parameter)."""
    return torch.stack([getattr(layer, name) for layer in layers])


def stacked_view(params: tp.Sequence[torch.Tensor]) -> torch.Tensor:
    """(K, ...) tensor whose entry k is params[k], read from their memory without a copy.

    The parameters of same-shaped layers of the bands are moved, once, into one tensor of
    which each becomes a view (`.data`: the same Parameter objects, values and
    `state_dict` keys); a batched product then reads them in place rather than stacking
    copies at every step. Moved again where something gave them memories of their own
    (`.to(...)`, `load_state_dict(assign=True)`). No gradient flows through the result.
    """
    first = params[0]
    size = first.numel()
    if not all(param.is_contiguous() and param.dtype == first.dtype
               and param.device == first.device and param.shape == first.shape
               and param.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
               and param.storage_offset() == first.storage_offset() + index * size
               for index, param in enumerate(params)):
        with torch.no_grad():
            joined = torch.stack([param.detach() for param in params])
        for param, part in zip(params, joined):
            param.data = part
        first = params[0]
    return first.detach().as_strided((len(params), *first.shape),
                                     (size, *first.stride()), first.storage_offset())


class BandLinear(torch.autograd.Function):
    """Per band k, x[k] @ weights[k].T + biases[k] as one batched product: (K, N, in) ->
    (K, N, out), the weights read in place (`stacked_view`); gradients to each band's
    own parameters."""

    @staticmethod
    def forward(ctx: tp.Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias[:, None], x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: tp.Any, grad: torch.Tensor) -> tp.Tuple[tp.Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad, weight.to(grad.dtype))
        grad_weights = torch.bmm(grad.transpose(1, 2), x.to(grad.dtype))  # (K, out, in)
        return (grad_x, None, None, *grad_weights.unbind(0), *grad.sum(dim=1).unbind(0))


def band_linear(x: torch.Tensor, layers: tp.Sequence[nn.Linear]) -> torch.Tensor:
    """(K, N, in) -> (K, N, out): `layers[k]` applied to x[k] (see `BandLinear`)."""
    weights = [layer.weight for layer in layers]
    biases = [layer.bias for layer in layers]
    weight, bias = stacked_view(weights), stacked_view(biases)
    if not (torch.is_grad_enabled() and (x.requires_grad or weights[0].requires_grad)):
        return torch.baddbmm(bias[:, None], x, weight.transpose(1, 2))
    return tp.cast(torch.Tensor, BandLinear.apply(x, weight, bias, *weights, *biases))


class BandSplit(nn.Module):
    """(B, T, sum(dims)) features of each band -> (B, T, K, D): per band, RMSNorm then a
    linear map to `dim` (`to_features.k.0`, `.1`).

    The parameters stay per band (MSST's keys); consecutive bands of one size run as one
    batched matrix product, with the RMSNorm's gain folded into the weights."""

    def __init__(self, dim: int, dim_inputs: tp.Sequence[int]):
        super().__init__()
        self.dim_inputs = tuple(dim_inputs)
        self.runs = equal_runs(self.dim_inputs)
        self.to_features = nn.ModuleList(
            nn.Sequential(RMSNorm(size), nn.Linear(size, dim)) for size in self.dim_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        outputs = []
        offset = 0
        for start, end in self.runs:
            size = self.dim_inputs[start]
            nets = tp.cast(tp.Sequence[nn.Sequential], self.to_features[start:end])
            norms, linears = [net[0] for net in nets], [net[1] for net in nets]
            bands = x[..., offset:offset + (end - start) * size]
            bands = bands.reshape(B * T, end - start, size).transpose(0, 1)  # (K', B * T, s)
            offset += (end - start) * size
            gains = stacked(norms, "gamma") * tp.cast(RMSNorm, norms[0]).scale  # (K', s)
            weight = stacked(linears, "weight") * gains[:, None]  # (K', D, s)
            bias = stacked(linears, "bias")[:, None]  # (K', 1, D)
            outputs.append(torch.baddbmm(bias, F.normalize(bands, dim=-1), weight.transpose(1, 2)))
        out = torch.cat(outputs)  # (K, B * T, D)
        return out.transpose(0, 1).reshape(B, T, len(self.dim_inputs), -1)


def mlp(dim_in: int, dim_out: int, dim_hidden: int, linears: int) -> nn.Sequential:
    """`linears` linear layers with Tanh between them."""
    dims = [dim_in] + [dim_hidden] * (linears - 1) + [dim_out]
    layers: tp.List[nn.Module] = []
    for index, (size_in, size_out) in enumerate(zip(dims[:-1], dims[1:])):
        if index:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(size_in, size_out))
    return nn.Sequential(*layers)


class MaskEstimator(nn.Module):
    """(B, T, K, D) -> (B, T, sum(dims)): per band an MLP of `linears` layers to twice
    the band's size, then a GLU (`to_freqs.k.0` the MLP, `.1` the GLU), run as batched
    matrix products over the bands (the last layer per run of bands of one size). MSST's
    `mask_estimator_depth` d gives d linear layers in a BS-RoFormer, d + 1 in a
    Mel-Band RoFormer."""

    def __init__(self, dim: int, dim_inputs: tp.Sequence[int], linears: int,
                 mlp_expansion_factor: int = 4):
        super().__init__()
        self.dim_inputs = tuple(dim_inputs)
        self.runs = equal_runs(self.dim_inputs)
        hidden = dim * mlp_expansion_factor
        self.to_freqs = nn.ModuleList(
            nn.Sequential(mlp(dim, size * 2, hidden, linears), nn.GLU(dim=-1))
            for size in self.dim_inputs)
        # the weights laid out for the batched products now, not at the first forward
        linears_of_bands = self._linears()
        for index in range(linears):
            layers = [band[index] for band in linears_of_bands]
            for start, end in (self.runs if index == linears - 1 else [(0, len(layers))]):
                stacked_view([layer.weight for layer in layers[start:end]])
                stacked_view([layer.bias for layer in layers[start:end]])

    def _linears(self) -> tp.List[tp.List[nn.Linear]]:
        """The linear layers of each band's MLP."""
        return [[layer for layer in tp.cast(nn.Sequential, net[0]) if isinstance(layer, nn.Linear)]
                for net in tp.cast(tp.Sequence[nn.Sequential], self.to_freqs)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, K, D = x.shape
        linears = self._linears()
        # the hidden layers, the same sizes for every band: one batched product each
        h = x.reshape(B * T, K, D).transpose(0, 1)  # (K, B * T, D)
        for index in range(len(linears[0]) - 1):
            layers = [band[index] for band in linears]
            h = band_linear(h, layers).tanh()
        # the last layer and the GLU, for each run of bands of one size
        outputs = []
        runs = h.split([end - start for start, end in self.runs])  # (one cat backward)
        for (start, end), run in zip(self.runs, runs):
            out = band_linear(run, [band[-1] for band in linears[start:end]])  # (K', B * T, 2s)
            outputs.append(F.glu(out, dim=-1).transpose(0, 1).flatten(1))
        return torch.cat(outputs, dim=-1).view(B, T, -1)


def axial_layers(dim: int, depth: int, time_transformer_depth: int,
                 freq_transformer_depth: int, linear_transformer_depth: int,
                 norm_output: bool, **transformer: tp.Any) -> nn.ModuleList:
    """The stack of a RoFormer (its `layers`): `depth` layers, each an optional
    linear-attention transformer over all (time, band) positions, then a transformer
    along time, then one along bands, in that order (MSST's keys `layers.i.j`)."""
    time_rotary = RotaryEmbedding(transformer["dim_head"])
    freq_rotary = RotaryEmbedding(transformer["dim_head"])
    common = dict(dim=dim, norm_output=norm_output, **transformer)
    layers = nn.ModuleList()
    for _ in range(depth):
        block = []
        if linear_transformer_depth > 0:
            block.append(Transformer(depth=linear_transformer_depth, linear_attn=True, **common))
        block.append(Transformer(depth=time_transformer_depth, rotary_embed=time_rotary,
                                 **common))
        block.append(Transformer(depth=freq_transformer_depth, rotary_embed=freq_rotary,
                                 **common))
        layers.append(nn.ModuleList(block))
    return layers

Segment = tp.Union[float, Fraction]
WINDOWS = ("hann_window", "hamming_window", "blackman_window", "bartlett_window")
# MSST's default training chunk of the RoFormers: 131584 samples (about 2.98 s at 44.1 kHz)
ROFORMER_CHUNK = 131584


def window_function(name: str) -> tp.Callable[..., torch.Tensor]:
    """The torch window function called `name` (MSST passes the function itself)."""
    if name not in WINDOWS:
        raise ValueError(f"Window {name!r} is not supported; use one of {', '.join(WINDOWS)}.")
    return tp.cast(tp.Callable[..., torch.Tensor], getattr(torch, name))


def check_stems(sources: tp.Sequence[str], audio_channels: int, stereo: tp.Optional[bool],
                num_stems: tp.Optional[int]) -> None:
    """MSST's `stereo` and `num_stems`, where given, must agree with our `audio_channels`
    and `sources` (which the model takes from the dataset)."""
    if audio_channels not in (1, 2):
        raise ValueError(f"audio_channels={audio_channels}: a RoFormer is mono or stereo.")
    if stereo is not None and stereo != (audio_channels == 2):
        raise ValueError(f"stereo={stereo} disagrees with audio_channels={audio_channels}.")
    if num_stems is not None and num_stems != len(sources):
        raise ValueError(f"num_stems={num_stems} disagrees with the {len(sources)} sources "
                         f"{list(sources)}.")


class RoformerBase(TrainingChunk, nn.Module):
    """The STFT, the axial transformers and the training loss of both RoFormers.

    Subclasses build `band_split` and `mask_estimators`, and implement `forward` from
    `spectrogram`, `layers` and `waveforms`.
    """
    sources: tp.List[str]
    samplerate: int
    audio_channels: int
    segment: Segment
    layers: nn.ModuleList
    band_split: nn.Module
    final_norm: nn.Module
    mask_estimators: nn.ModuleList

    def _setup_audio(self, sources: tp.Sequence[str], audio_channels: int, samplerate: int,
                     segment: Segment, stereo: tp.Optional[bool], num_stems: tp.Optional[int],
                     use_pope: bool, stft_n_fft: int, stft_hop_length: int,
                     stft_win_length: int, stft_normalized: bool,
                     stft_window_fn: tp.Optional[str], zero_dc: bool) -> None:
        check_stems(sources, audio_channels, stereo, num_stems)
        if use_pope:
            raise ValueError("use_pope=true (polar positional embedding) is not supported.")
        self.sources = list(sources)
        self.audio_channels = audio_channels
        self.samplerate = samplerate
        self.segment = segment
        self.stft_kwargs: tp.Dict[str, tp.Any] = dict(n_fft=stft_n_fft, hop_length=stft_hop_length,
                                win_length=stft_win_length, normalized=stft_normalized)
        self.stft_window = window_function(stft_window_fn or "hann_window")
        self.zero_dc = zero_dc

    def _setup_layers(self, dim: int, depth: int, time_transformer_depth: int,
                      freq_transformer_depth: int, linear_transformer_depth: int,
                      norm_output: bool, skip_connection: bool, use_torch_checkpoint: bool,
                      **transformer: tp.Any) -> None:
        self.skip_connection = skip_connection
        self.use_torch_checkpoint = use_torch_checkpoint
        self.layers = axial_layers(dim, depth, time_transformer_depth, freq_transformer_depth,
                                   linear_transformer_depth, norm_output, **transformer)

    def _setup_loss(self, multi_stft_resolution_loss_weight: float,
                    multi_stft_resolutions_window_sizes: tp.Sequence[int],
                    multi_stft_hop_size: int, multi_stft_normalized: bool,
                    multi_stft_window_fn: str) -> None:
        window_function(multi_stft_window_fn)
        self.multi_stft = MultiStftSettings(
            weight=multi_stft_resolution_loss_weight,
            window_sizes=tuple(multi_stft_resolutions_window_sizes),
            min_n_fft=tp.cast(int, self.stft_kwargs["n_fft"]), hop_size=multi_stft_hop_size,
            normalized=multi_stft_normalized, window_fn=multi_stft_window_fn)

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        return self.stft_window(tp.cast(int, self.stft_kwargs["win_length"]), device=x.device)

    def spectrogram(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, Fr * C, frames, 2): the real STFT, channels interleaved in the
        frequencies (bin f of channel c at f * C + c), complex as the last axis."""
        B, C, T = mix.shape
        if C != self.audio_channels:
            raise ValueError(f"This model takes {self.audio_channels} audio channels, "
                             f"the input has {C}.")
        with torch.autocast(mix.device.type, enabled=False):
            z = torch.stft(mix.reshape(B * C, T).float(), **self.stft_kwargs,
                           window=self._window(mix), return_complex=True)
        z = torch.view_as_real(z)  # (B * C, Fr, frames, 2)
        return z.view(B, C, *z.shape[1:]).transpose(1, 2).flatten(1, 2)

    def waveforms(self, spec: torch.Tensor, length: tp.Optional[int]) -> torch.Tensor:
        """Complex (B, S, Fr * C, frames) -> (B, S, C, length) (length None: the frames'
        own length, a multiple of the hop)."""
        B, S, FC, frames = spec.shape
        C = self.audio_channels
        spec = spec.view(B, S, FC // C, C, frames).transpose(2, 3).reshape(B * S * C, -1, frames)
        if self.zero_dc:
            spec = spec.index_fill(1, torch.tensor(0, device=spec.device), 0.)
        with torch.autocast(spec.device.type, enabled=False):
            out = torch.istft(spec, **self.stft_kwargs, window=self._window(spec).float(),
                              return_complex=False, length=length)
        return out.view(B, S, C, -1)

    def _run(self, transformer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_torch_checkpoint and self.training:
            return tp.cast(torch.Tensor, checkpoint(transformer, x, use_reentrant=False))
        return tp.cast(torch.Tensor, transformer(x))

    def run_layers(self, x: torch.Tensor) -> torch.Tensor:
        """The axial transformers (`layers`, see `axial_layers`): (B, T, K, D) -> same."""
        B, T, K, D = x.shape
        stored: tp.List[torch.Tensor] = []
        for block in tp.cast(tp.Iterable[nn.ModuleList], self.layers):
            *linear, time_transformer, freq_transformer = block
            if linear:
                x = self._run(linear[0], x.reshape(B, T * K, D)).view(B, T, K, D)
            if self.skip_connection:
                for earlier in stored:
                    x = x + earlier
            x = x.transpose(1, 2).reshape(B * K, T, D)
            x = self._run(time_transformer, x)
            x = x.view(B, K, T, D).transpose(1, 2).reshape(B * T, K, D)
            x = self._run(freq_transformer, x).view(B, T, K, D)
            if self.skip_connection:
                stored.append(x)
        return x

    def forward_stack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, features) of the bands -> (B, S, T, features) of the masks."""
        x = self.band_split(x)
        x = self.run_layers(x)
        x = self.final_norm(x)
        return torch.stack([estimate(x) for estimate in self.mask_estimators], dim=1)

