"""The cross-domain transformer of Hybrid Transformer Demucs (HTDemucs, Demucs v4).

At the bottleneck of HTDemucs, the spectral branch gives a (B, C, Fr, T1) map and the
temporal branch a (B, C, T2) sequence. `CrossTransformerEncoder` turns both into token
sequences (Fr * T1 and T2 tokens of C channels), adds positional embeddings, and runs
layers that alternate between self-attention within each branch and cross-attention
from one branch to the other (each branch has its own weights, `layers` and
`layers_t`).

Tensors inside the transformer are batch first and channel last: (B, tokens, C).
Sparse attention (t_sparse_self_attn / t_sparse_cross_attn in the config) needs the
xformers block-sparse kernels, which this implementation does not include: asking for
it raises a `ConfigError` at construction.
"""
from __future__ import annotations

import math
import random
import typing as tp

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .demucs import LayerScale
from .errors import ConfigError
from .hlayers import ScaledEmbedding
from .norm import GroupNorm
from .utils import made_once

Activation = tp.Callable[[torch.Tensor], torch.Tensor]
SCALED_EMB_WEIGHT = 0.2  # weight of the learnt ('scaled') positional embedding


# ---------------------------------------------------------------------------------------
# Positional embeddings


def create_sin_embedding(length: int, dim: int, shift: int = 0,
                         device: tp.Any = "cpu", max_period: float = 10000.) -> torch.Tensor:
    """1d sinusoidal embedding (length, 1, dim): cosines in the first half of the
    channels, sines in the second, periods from 2 pi to 2 pi * max_period."""
    if dim % 2:
        raise ValueError(f"A sinusoidal embedding needs an even dimension, got {dim}.")
    pos = shift + torch.arange(length, device=device).view(-1, 1, 1)  # (T, 1, 1)
    half_dim = dim // 2
    adim = torch.arange(half_dim, device=device).view(1, 1, -1)  # (1, 1, dim / 2)
    phase = pos / (max_period ** (adim / (half_dim - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


def create_2d_sin_embedding(dim: int, height: int, width: int, device: tp.Any = "cpu",
                            max_period: float = 10000.) -> torch.Tensor:
    """2d sinusoidal embedding (1, dim, height, width).

    The first half of the channels encodes the position along the width (time), the
    second half along the height (frequency); in each half, even channels hold sines
    and odd channels cosines.
    """
    if dim % 4:
        raise ValueError(f"A 2d sinusoidal embedding needs a dimension divisible by 4, "
                         f"got {dim}.")
    half = dim // 2
    inv_freqs = torch.exp(torch.arange(0., half, 2) * -(math.log(max_period) / half))
    phase_w = torch.arange(0., width)[:, None] * inv_freqs  # (W, dim / 4)
    phase_h = torch.arange(0., height)[:, None] * inv_freqs  # (H, dim / 4)
    emb = torch.zeros(dim, height, width)
    emb[0:half:2] = torch.sin(phase_w).t()[:, None, :].expand(-1, height, -1)
    emb[1:half:2] = torch.cos(phase_w).t()[:, None, :].expand(-1, height, -1)
    emb[half::2] = torch.sin(phase_h).t()[:, :, None].expand(-1, -1, width)
    emb[half + 1::2] = torch.cos(phase_h).t()[:, :, None].expand(-1, -1, width)
    return emb[None].to(device)


_made_2d_sin_embedding = made_once(create_2d_sin_embedding)  # a constant of each shape


def create_sin_embedding_cape(length: int, dim: int, batch_size: int, mean_normalize: bool,
                              augment: bool, max_global_shift: float = 0.,
                              max_local_shift: float = 0., max_scale: float = 1.,
                              device: tp.Any = "cpu", max_period: float = 10000.
                              ) -> torch.Tensor:
    """CAPE embedding (length, batch_size, dim): sinusoidal embedding of positions that
    are centred (`mean_normalize`) and, with `augment` (training only), randomly shifted
    globally, jittered locally and rescaled per batch item.

    The random draws come from numpy's global generator, in the original's order.
    """
    if dim % 2:
        raise ValueError(f"A sinusoidal embedding needs an even dimension, got {dim}.")
    pos = torch.arange(length, dtype=torch.float32).view(-1, 1, 1).repeat(1, batch_size, 1)
    if mean_normalize:
        pos = pos - pos.mean(dim=0, keepdim=True)  # (T, B, 1)
    if augment:
        delta = np.random.uniform(-max_global_shift, max_global_shift, size=[1, batch_size, 1])
        delta_local = np.random.uniform(-max_local_shift, max_local_shift,
                                        size=[length, batch_size, 1])
        log_lambdas = np.random.uniform(-np.log(max_scale), np.log(max_scale),
                                        size=[1, batch_size, 1])
        pos = ((pos + torch.from_numpy(delta) + torch.from_numpy(delta_local))
               * torch.from_numpy(np.exp(log_lambdas)))
    pos = pos.to(device)
    half_dim = dim // 2
    adim = torch.arange(half_dim, device=device).view(1, 1, -1)
    phase = pos / (max_period ** (adim / (half_dim - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1).float()


# ---------------------------------------------------------------------------------------
# Layers


class ChannelLastGroupNorm(GroupNorm):
    """GroupNorm of (B, T, C) sequences: with one group, normalises over T and C."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ChannelLastLayerScale(LayerScale):
    """LayerScale of (..., C) tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.to(x.dtype) * x


def check_dense_attention(sparse_self_attn: bool, sparse_cross_attn: bool) -> None:
    """`ConfigError` when sparse attention is asked for: its kernels are not available."""
    if not (sparse_self_attn or sparse_cross_attn):
        return
    try:
        import xformers  # noqa: F401
        reason = "this implementation does not include them"
    except ImportError:
        reason = "xformers is not installed"
    raise ConfigError(
        "Sparse attention (t_sparse_self_attn / t_sparse_cross_attn) needs the xformers "
        f"block-sparse kernels and {reason}; use dense attention "
        "(htdemucs.t_sparse_self_attn=false htdemucs.t_sparse_cross_attn=false).")


class _AttentionLayer(nn.Module):
    """What self- and cross-attention layers share: feed-forward block, norms, layer scale.

    Args:
        d_model: channels of the tokens.
        nhead: attention heads.
        dim_feedforward: hidden channels of the feed-forward block.
        dropout: dropout of attention weights and of both blocks.
        activation: activation of the feed-forward block.
        group_norm: number of groups of the norms (0: LayerNorm).
        norm_first: pre-norm layer (else post-norm).
        norm_out: add a one-group norm at the output of pre-norm layers.
        layer_scale: scale each residual branch by a learnt per-channel factor.
        init_values: initial layer scale.
        layer_norm_eps: epsilon of the norms.
        num_norms: how many input norms (2 for self-attention, 3 for cross-attention).
        attn_name: attribute name of the attention module.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: Activation = F.relu,
                 group_norm: int = 0, norm_first: bool = False, norm_out: bool = False,
                 layer_scale: bool = False, init_values: float = 1e-4,
                 layer_norm_eps: float = 1e-5, num_norms: int = 2, attn_name: str = "self_attn"):
        super().__init__()
        # Creation order (attention, linear1, linear2) fixes the random initialisation.
        self._attn_name = attn_name  # `self_attn` or `cross_attn`, as in the original
        setattr(self, attn_name, nn.MultiheadAttention(d_model, nhead, dropout=dropout,
                                                       batch_first=True))
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm_first = norm_first
        for index in range(1, num_norms + 1):
            norm: nn.Module = (ChannelLastGroupNorm(int(group_norm), d_model, eps=layer_norm_eps)
                               if group_norm else nn.LayerNorm(d_model, eps=layer_norm_eps))
            setattr(self, f"norm{index}", norm)
        self.norm_out: tp.Optional[nn.Module] = None
        if norm_first and norm_out:
            self.norm_out = ChannelLastGroupNorm(int(norm_out), d_model)
        self.gamma_1: nn.Module = (ChannelLastLayerScale(d_model, init_values)
                                   if layer_scale else nn.Identity())
        self.gamma_2: nn.Module = (ChannelLastLayerScale(d_model, init_values)
                                   if layer_scale else nn.Identity())
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation

    def _attend(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        attn: nn.MultiheadAttention = getattr(self, self._attn_name)
        out = attn(query, key, key, need_weights=False)[0]
        return self.dropout1(out)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout2(x)

    def _finish(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """Feed-forward block of a layer whose attention residual `x` is computed."""
        if self.norm_first:
            x = x + self.gamma_2(self._feed_forward(norm(x)))
            return self.norm_out(x) if self.norm_out is not None else x
        return norm(x + self.gamma_2(self._feed_forward(x)))


class SelfAttentionLayer(_AttentionLayer):
    """Transformer encoder layer (self-attention then feed-forward) on (B, T, C).

    Keys (`self_attn`, `linear1`, `linear2`, `norm1`, `norm2`, `norm_out`, `gamma_1`,
    `gamma_2`) are those of the original's layer. Args: see `_AttentionLayer`.
    """

    norm1: nn.Module
    norm2: nn.Module

    def __init__(self, d_model: int, nhead: int, **kwargs: tp.Any):
        super().__init__(d_model, nhead, num_norms=2, attn_name="self_attn", **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        if self.norm_first:
            y = self.norm1(x)
            x = x + self.gamma_1(self._attend(y, y))
            return self._finish(x, self.norm2)
        x = self.norm1(x + self.gamma_1(self._attend(x, x)))
        return self._finish(x, self.norm2)


class CrossAttentionLayer(_AttentionLayer):
    """Cross-attention layer: the queries of one branch attend to the other branch.

    Post-norm layers (`norm_first=False`) keep an unused `norm3`, as the original.
    Args: see `_AttentionLayer`.
    """

    norm1: nn.Module
    norm2: nn.Module
    norm3: nn.Module

    def __init__(self, d_model: int, nhead: int, **kwargs: tp.Any):
        super().__init__(d_model, nhead, num_norms=3, attn_name="cross_attn", **kwargs)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Queries (B, T, C), keys and values (B, S, C) -> (B, T, C)."""
        if self.norm_first:
            x = q + self.gamma_1(self._attend(self.norm1(q), self.norm2(k)))
            return self._finish(x, self.norm3)
        x = self.norm1(q + self.gamma_1(self._attend(q, k)))
        return self._finish(x, self.norm2)


# ---------------------------------------------------------------------------------------
# The cross-domain transformer


class CrossTransformerEncoder(nn.Module):
    """Transformer between the spectral and the temporal bottleneck of HTDemucs.

    Layers alternate: self-attention in each branch, then cross-attention (spectral
    queries on temporal tokens and the reverse, from the same inputs), and so on;
    `cross_first` starts with cross-attention.

    Args:
        dim: channels of both branches.
        emb: positional embedding of the temporal branch: 'sin', 'cape' or 'scaled'
            (a learnt embedding); the spectral branch always gets a 2d sinusoidal one.
        hidden_scale: feed-forward hidden channels, relative to `dim`.
        num_heads, num_layers: attention heads, number of layers in each branch.
        cross_first: the first layer is a cross-attention layer.
        dropout: dropout in every layer.
        max_positions: size of the 'scaled' embedding.
        norm_in: LayerNorm of the inputs; else `norm_in_group`: GroupNorm with that many
            groups; else none.
        group_norm: groups of the norms inside the layers (0: LayerNorm).
        norm_first, norm_out: pre-norm layers, with a final one-group norm.
        max_period: longest period of the sinusoidal embeddings.
        weight_decay, lr: not used by the module (the optimizer group of the transformer
            takes the model's `t_weight_decay` and `t_lr`: `train.param_groups`).
        layer_scale: LayerScale on the residual branches.
        gelu: GELU (else ReLU) in the feed-forward blocks.
        sin_random_shift: with 'sin', positions shifted by a random draw in
            [0, sin_random_shift] (Python's `random`, drawn at every forward).
        weight_pos_embed: weight of the positional embeddings.
        cape_mean_normalize, cape_augment, cape_glob_loc_scale: CAPE options (centred
            positions; random global shift, local shift, scale during training).
        sparse_self_attn, sparse_cross_attn, mask_type, mask_random_seed,
        sparse_attn_window, global_window, sparsity, auto_sparsity: sparse attention
            (not available here: asking for it raises a `ConfigError`).
    """

    def __init__(self, dim: int, emb: str = "sin", hidden_scale: float = 4.,
                 num_heads: int = 8, num_layers: int = 6, cross_first: bool = False,
                 dropout: float = 0., max_positions: int = 1000, norm_in: bool = True,
                 norm_in_group: bool = False, group_norm: int = False,
                 norm_first: bool = False, norm_out: bool = False,
                 max_period: float = 10000., weight_decay: float = 0.,
                 lr: tp.Optional[float] = None, layer_scale: bool = False, gelu: bool = True,
                 sin_random_shift: int = 0, weight_pos_embed: float = 1.,
                 cape_mean_normalize: bool = True, cape_augment: bool = True,
                 cape_glob_loc_scale: tp.Sequence[float] = (5000., 1., 1.4),
                 sparse_self_attn: bool = False, sparse_cross_attn: bool = False,
                 mask_type: str = "diag", mask_random_seed: int = 42,
                 sparse_attn_window: int = 500, global_window: int = 50,
                 auto_sparsity: bool = False, sparsity: float = 0.95):
        super().__init__()
        check_dense_attention(sparse_self_attn, sparse_cross_attn)
        if dim % num_heads:
            raise ConfigError(f"The transformer dimension {dim} must be divisible by its "
                              f"number of heads {num_heads}.")
        if emb not in ("sin", "cape", "scaled"):
            raise ConfigError(f"t_emb={emb!r} is not valid; use sin, cape or scaled.")
        self.num_layers = num_layers
        # Layer idx is a self-attention layer when idx % 2 == classic_parity.
        self.classic_parity = 1 if cross_first else 0
        self.emb = emb
        self.max_period = max_period
        self.weight_pos_embed = weight_pos_embed
        self.sin_random_shift = sin_random_shift
        self.cape_mean_normalize = cape_mean_normalize
        self.cape_augment = cape_augment
        self.cape_glob_loc_scale = list(cape_glob_loc_scale)
        if emb == "scaled":
            # Stored weights start as N(0, 1/15^2) and count 15 times; the embedding
            # enters at 0.2 of that (measured on the reference packages).
            self.position_embeddings = ScaledEmbedding(max_positions, dim, scale=15.)
        self.norm_in, self.norm_in_t = self._input_norms(dim, norm_in, norm_in_group)

        layer_kw: tp.Dict[str, tp.Any] = {
            "dim_feedforward": int(dim * hidden_scale), "dropout": dropout,
            "activation": F.gelu if gelu else F.relu, "group_norm": group_norm,
            "norm_first": norm_first, "norm_out": norm_out, "layer_scale": layer_scale,
        }
        self.layers = nn.ModuleList()  # spectral branch
        self.layers_t = nn.ModuleList()  # temporal branch
        for idx in range(num_layers):
            klass: tp.Type[nn.Module] = (SelfAttentionLayer if idx % 2 == self.classic_parity
                                         else CrossAttentionLayer)
            self.layers.append(klass(dim, num_heads, **layer_kw))
            self.layers_t.append(klass(dim, num_heads, **layer_kw))

    @staticmethod
    def _input_norms(dim: int, norm_in: bool, norm_in_group: int
                     ) -> tp.Tuple[nn.Module, nn.Module]:
        if norm_in:
            return nn.LayerNorm(dim), nn.LayerNorm(dim)
        if norm_in_group:
            return (ChannelLastGroupNorm(int(norm_in_group), dim),
                    ChannelLastGroupNorm(int(norm_in_group), dim))
        return nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor, xt: torch.Tensor
                ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Spectral (B, C, Fr, T1) and temporal (B, C, T2) maps -> the same shapes."""
        B, C, Fr, T1 = x.shape
        pos_emb_2d = _made_2d_sin_embedding(C, Fr, T1, x.device, self.max_period)
        pos_emb_2d = pos_emb_2d.permute(0, 3, 2, 1).reshape(1, T1 * Fr, C)  # time major
        x = x.permute(0, 3, 2, 1).reshape(B, T1 * Fr, C)  # (B, T1 * Fr, C)
        x = self.norm_in(x) + self.weight_pos_embed * pos_emb_2d

        B, C, T2 = xt.shape
        xt = xt.transpose(1, 2)  # (B, T2, C)
        pos_emb = self._pos_embedding(T2, B, C, x.device).transpose(0, 1)  # (B or 1, T2, C)
        xt = self.norm_in_t(xt) + self.weight_pos_embed * pos_emb

        for idx in range(self.num_layers):
            if idx % 2 == self.classic_parity:
                x = self.layers[idx](x)
                xt = self.layers_t[idx](xt)
            else:
                x, xt = self.layers[idx](x, xt), self.layers_t[idx](xt, x)

        x = x.view(B, T1, Fr, C).permute(0, 3, 2, 1)  # (B, C, Fr, T1)
        return x, xt.transpose(1, 2)

    def _pos_embedding(self, length: int, batch: int, dim: int, device: tp.Any
                       ) -> torch.Tensor:
        """Positional embedding of the temporal tokens, (length, batch or 1, dim)."""
        if self.emb == "sin":
            # Drawn at every call, as the original does (even with no shift).
            shift = random.randrange(self.sin_random_shift + 1)
            return create_sin_embedding(length, dim, shift=shift, device=device,
                                        max_period=self.max_period)
        if self.emb == "cape":
            global_shift, local_shift, scale = self.cape_glob_loc_scale
            return create_sin_embedding_cape(
                length, dim, batch, mean_normalize=self.cape_mean_normalize,
                augment=self.training and self.cape_augment, max_global_shift=global_shift,
                max_local_shift=local_shift, max_scale=scale, device=device,
                max_period=self.max_period)
        positions = torch.arange(length, device=device)
        return SCALED_EMB_WEIGHT * self.position_embeddings(positions)[:, None]
