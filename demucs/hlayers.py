"""Layers of Hybrid Demucs: the encoder/decoder layers of both branches, the frequency
band wrapper and the scaled frequency embedding.

They are importable from `demucs.hdemucs` too, where the original code defined them.
The steps that inference without gradients computes in less memory (convolutions by
blocks, GELU in place) go through `demucs.lean`, the plain operation otherwise.
"""
from __future__ import annotations

import typing as tp
from copy import deepcopy

import torch
from torch import nn
from torch.nn import functional as F

from . import lean
from .demucs import DConv
from .norm import GroupNorm


class ScaledEmbedding(nn.Module):
    """Embedding with a larger effective learning rate (weights stored divided by `scale`).

    With `smooth`, the initial embedding is a normalised cumulative sum, so that
    neighbouring frequencies start with similar embeddings.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float = 10.,
                 smooth: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        if smooth:
            weight = torch.cumsum(self.embedding.weight.data, dim=0)
            # A sum of n Gaussians grows like sqrt(n).
            weight = weight / torch.arange(1, num_embeddings + 1).to(weight).sqrt()[:, None]
            self.embedding.weight.data[:] = weight
        self.embedding.weight.data /= scale
        self.scale = scale

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x) * self.scale


def add_frequency_embedding(x: torch.Tensor, embedding: ScaledEmbedding,
                            weight: float) -> torch.Tensor:
    """`x` (B, C, Fr, T) plus `weight` times the embedding of each frequency row, so that
    convolutions along frequency need not be equivariant. The sum keeps x's dtype: under
    mixed precision the (float32) embedding would otherwise turn the first freq layer's
    output, and the skip the decoder keeps of it, into float32."""
    rows = torch.arange(x.shape[-2], device=x.device)
    emb = embedding(rows).t()[None, :, :, None].expand_as(x)
    return x + (weight * emb).to(x.dtype)


def _norm_fn(norm: bool, groups: int) -> tp.Callable[[int], nn.Module]:
    def make(dim: int) -> nn.Module:
        return GroupNorm(groups, dim) if norm else nn.Identity()
    return make


def _dconv_on_freq(dconv: nn.Module, y: torch.Tensor, freq: bool) -> torch.Tensor:
    """Apply a DConv over time, independently for each frequency when `freq`."""
    if not freq:
        return dconv(y)
    B, C, Fr, T = y.shape
    rows = y.permute(0, 2, 1, 3).reshape(-1, C, T)  # (B * Fr, C, T)
    del y
    return lean.by_rows(dconv, rows).view(B, Fr, C, T).permute(0, 2, 1, 3)


class HEncLayer(nn.Module):
    """Encoder layer of either branch: conv, norm, GELU, DConv, rewrite + GLU.

    Args:
        chin, chout: input and output channels.
        kernel_size, stride: along frequency (freq branch) or time.
        norm_groups: groups of the group norms; norm: use group norm.
        empty: only the first convolution (the time layer merged into the freq one).
        freq: 2d convolutions over (frequency, time) with kernel (k, 1).
        dconv: add a DConv residual branch, with `dconv_kw`.
        context: context of the rewrite convolution.
        pad: pad by kernel_size // 4 so that the length is divided by the stride.
        rewrite: add the 1x1 (or context) convolution followed by GLU.
    """

    def __init__(self, chin: int, chout: int, kernel_size: int = 8, stride: int = 4,
                 norm_groups: int = 1, empty: bool = False, freq: bool = True,
                 dconv: bool = True, norm: bool = True, context: int = 0,
                 dconv_kw: tp.Optional[dict] = None, pad: bool = True, rewrite: bool = True):
        super().__init__()
        norm_fn = _norm_fn(norm, norm_groups)
        padding = kernel_size // 4 if pad else 0
        self.freq = freq
        self.kernel_size = kernel_size
        self.stride = stride
        self.empty = empty
        self.norm = norm
        self.pad = padding
        klass: tp.Type[nn.Module] = nn.Conv1d
        ker: tp.Any = kernel_size
        stri: tp.Any = stride
        padd: tp.Any = padding
        if freq:
            ker, stri, padd = [kernel_size, 1], [stride, 1], [padding, 0]
            klass = nn.Conv2d
        self.conv = klass(chin, chout, ker, stri, padd)
        if self.empty:
            return
        self.norm1 = norm_fn(chout)
        self.rewrite: tp.Optional[nn.Module] = None
        if rewrite:
            self.rewrite = klass(chout, 2 * chout, 1 + 2 * context, 1, context)
            self.norm2 = norm_fn(2 * chout)
        self.dconv: tp.Optional[nn.Module] = None
        if dconv:
            self.dconv = DConv(chout, **(dconv_kw or {}))

    def forward(self, x: torch.Tensor, inject: tp.Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """(B, C, Fr, T) or (B, C, T) -> (B, chout, Fr / stride, T) or (B, chout, T / stride).

        `inject` (the time branch output) is added after the first convolution.
        """
        if not self.freq and x.dim() == 4:
            B, C, Fr, T = x.shape
            x = x.view(B, -1, T)
        if not self.freq:
            le = x.shape[-1]
            if isinstance(le, torch.SymInt) or le % self.stride != 0:
                # (a symbolic length, in an ONNX export: whatever it is; by 0 is a copy)
                x = F.pad(x, (0, -le % self.stride))
        y = lean.per_time_step(self.conv, x) if self.freq else self.conv(x)
        if self.empty:
            return y
        if inject is not None:
            if inject.shape[-1] != y.shape[-1]:
                raise RuntimeError(f"Time and frequency branches disagree: "
                                   f"{tuple(inject.shape)} vs {tuple(y.shape)}.")
            if inject.dim() == 3 and y.dim() == 4:
                inject = inject[:, :, None]
            y = y + inject
        y = lean.gelu(self.norm1(y))
        if self.dconv is not None:
            y = _dconv_on_freq(self.dconv, y, self.freq)
        if self.rewrite is not None:
            return lean.rewrite_glu(self.rewrite, self.norm2, y)
        return y


class MultiWrap(nn.Module):
    """Split the frequency axis into bands, each processed by its own copy of a layer.

    `split_ratios` are the band limits as fractions of the frequency axis; each band
    gets a fresh copy of `layer` (an HEncLayer or an HDecLayer of the freq branch).
    """

    def __init__(self, layer: tp.Any, split_ratios: tp.Sequence[float]):
        super().__init__()
        self.split_ratios = split_ratios
        self.layers = nn.ModuleList()
        self.conv = isinstance(layer, HEncLayer)
        if layer.norm or not layer.freq or not layer.pad:
            raise ValueError("MultiWrap needs a freq layer without norm and with padding.")
        if not self.conv and layer.context_freq:
            raise ValueError("MultiWrap needs a decoder layer with context_freq=False.")
        for _ in range(len(split_ratios) + 1):
            lay: tp.Any = deepcopy(layer)
            if self.conv:
                lay.conv.padding = (0, 0)
            else:
                lay.pad = False
            for m in lay.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            self.layers.append(lay)

    def forward(self, x: torch.Tensor, skip: tp.Optional[torch.Tensor] = None,
                length: tp.Optional[int] = None) -> tp.Any:
        if self.conv:
            return self._forward_encoder(x)
        return self._forward_decoder(x, skip)

    def _forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        B, C, Fr, T = x.shape
        ratios = list(self.split_ratios) + [1]
        start = 0
        outs = []
        layer: tp.Any
        for ratio, layer in zip(ratios, self.layers):
            pad = layer.kernel_size // 4
            if ratio == 1:
                limit = Fr
            else:
                limit = int(round(Fr * ratio))
                le = limit - start
                if start == 0:
                    le += pad
                frames = round((le - layer.kernel_size) / layer.stride + 1)
                limit = start + (frames - 1) * layer.stride + layer.kernel_size
                if start == 0:
                    limit -= pad
            y = x[:, :, start:limit, :]
            if start == 0:
                y = F.pad(y, (0, 0, pad, 0))
            if ratio == 1:
                y = F.pad(y, (0, 0, 0, pad))
            outs.append(layer(y))
            start = limit - layer.kernel_size + layer.stride
        return torch.cat(outs, dim=2)

    def _forward_decoder(self, x: torch.Tensor, skip: tp.Optional[torch.Tensor]
                         ) -> tp.Tuple[torch.Tensor, None]:
        assert skip is not None
        B, C, Fr, T = x.shape
        ratios = list(self.split_ratios) + [1]
        start = 0
        outs: tp.List[torch.Tensor] = []
        last = False
        layer: tp.Any
        for ratio, layer in zip(ratios, self.layers):
            limit = Fr if ratio == 1 else int(round(Fr * ratio))
            last = layer.last
            layer.last = True
            out, _ = layer(x[:, :, start:limit], skip[:, :, start:limit], None)
            if outs:
                # Overlap-add the first `stride` rows with the previous band, counting
                # the transposed convolution bias once.
                outs[-1][:, :, -layer.stride:] += (
                    out[:, :, :layer.stride] - layer.conv_tr.bias.view(1, -1, 1, 1))
                out = out[:, :, layer.stride:]
            if ratio == 1:
                out = out[:, :, :-layer.stride // 2, :]
            if start == 0:
                out = out[:, :, layer.stride // 2:, :]
            outs.append(out)
            layer.last = last
            start = limit
        out = torch.cat(outs, dim=2)
        if not last:
            out = F.gelu(out)
        return out, None


class HDecLayer(nn.Module):
    """Decoder layer of either branch: skip add, rewrite + GLU, DConv, transposed conv.

    Args mirror `HEncLayer`; `last` skips the final GELU; `context_freq` lets the
    rewrite convolution look at neighbouring frequencies (else only along time).
    """

    def __init__(self, chin: int, chout: int, last: bool = False, kernel_size: int = 8,
                 stride: int = 4, norm_groups: int = 1, empty: bool = False,
                 freq: bool = True, dconv: bool = True, norm: bool = True, context: int = 1,
                 dconv_kw: tp.Optional[dict] = None, pad: bool = True,
                 context_freq: bool = True, rewrite: bool = True):
        super().__init__()
        norm_fn = _norm_fn(norm, norm_groups)
        self.pad = kernel_size // 4 if pad else 0
        self.last = last
        self.freq = freq
        self.chin = chin
        self.empty = empty
        self.stride = stride
        self.kernel_size = kernel_size
        self.norm = norm
        self.context_freq = context_freq
        klass: tp.Type[nn.Module] = nn.Conv1d
        klass_tr: tp.Type[nn.Module] = nn.ConvTranspose1d
        ker: tp.Any = kernel_size
        stri: tp.Any = stride
        if freq:
            ker, stri = [kernel_size, 1], [stride, 1]
            klass, klass_tr = nn.Conv2d, nn.ConvTranspose2d
        self.conv_tr = klass_tr(chin, chout, ker, stri)
        self.norm2 = norm_fn(chout)
        if self.empty:
            return
        self.rewrite: tp.Optional[nn.Module] = None
        if rewrite:
            if context_freq:
                self.rewrite = klass(chin, 2 * chin, 1 + 2 * context, 1, context)
            else:
                self.rewrite = klass(chin, 2 * chin, [1, 1 + 2 * context], 1, [0, context])
            self.norm1 = norm_fn(2 * chin)
        self.dconv: tp.Optional[nn.Module] = None
        if dconv:
            self.dconv = DConv(chin, **(dconv_kw or {}))

    def forward(self, x: torch.Tensor, skip: tp.Optional[torch.Tensor],
                length: tp.Optional[int]) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Returns the layer output and `y`, the input of the transposed convolution."""
        if self.freq and x.dim() == 3:
            B, C, T = x.shape
            x = x.view(B, self.chin, -1, T)
        if self.empty:
            y = x
        else:
            assert skip is not None
            if self.rewrite is not None:
                y = lean.rewrite_glu(self.rewrite, self.norm1, x, skip)
            else:
                y = x + skip
            if self.dconv is not None:
                y = _dconv_on_freq(self.dconv, y, self.freq)
        z = self.norm2(lean.per_time_step(self.conv_tr, y) if self.freq
                       else lean.transposed_conv1d(self.conv_tr, y))
        if self.freq:
            if self.pad:
                z = z[..., self.pad:-self.pad, :]
        else:
            assert length is not None
            z = z[..., self.pad:self.pad + length]
        if not self.last:
            z = lean.gelu(z)
        return z, y
