"""Singular value penalty: keeps the largest singular value of the layers small.

For every weight bigger than `min_size` MB, the weight is seen as a matrix (out, in * k)
and its largest squared singular value is estimated, either with `torch.svd_lowrank` or
with a few power iterations on `W W^T`. The penalty is the sum of these estimates; the
solver adds `svd.penalty` times it to the training loss.
"""
from __future__ import annotations

import random
import typing as tp

import torch
from torch import nn

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d)


def power_iteration(matrix: torch.Tensor, niters: int = 1, bs: int = 1) -> torch.Tensor:
    """Largest eigenvalue of the symmetric positive matrix `matrix` (D, D).

    `bs` random start vectors are iterated `niters` times; their estimates are averaged.
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"power_iteration needs a square matrix, got {tuple(matrix.shape)}.")
    vectors = torch.randn(matrix.shape[0], bs, device=matrix.device, dtype=matrix.dtype)
    norm = vectors.norm(dim=0)
    for _ in range(max(1, niters)):
        product = matrix.mm(vectors)  # (D, bs)
        norm = product.norm(dim=0, keepdim=True)
        vectors = product / (1e-10 + norm)
    return norm.mean()


def _as_matrix(module: nn.Module, param: torch.Tensor, convtr: bool,
               conv_only: bool) -> tp.Optional[torch.Tensor]:
    """The weight as a matrix (out, rest), or None when the penalty ignores it."""
    if param.dim() == 1:
        return None
    if param.dim() == 2:
        return None if conv_only else param
    if convtr and isinstance(module, _CONV_TRANSPOSE):
        param = param.transpose(0, 1)  # (in, out, k...) -> (out, in, k...)
    return param.reshape(len(param), -1)


def top_singular_value_squared(matrix: torch.Tensor, dim: int = 1, niters: int = 2,
                               powm: bool = False, bs: int = 1,
                               exact: bool = False) -> torch.Tensor:
    """Estimate of the largest squared singular value of `matrix` (A, B)."""
    if exact:
        return torch.linalg.svdvals(matrix)[0].pow(2)
    if powm:
        rows, cols = matrix.shape
        gram = matrix.mm(matrix.t()) if rows < cols else matrix.t().mm(matrix)
        return power_iteration(gram, niters, bs)
    rank = min(dim, *matrix.shape)
    return torch.svd_lowrank(matrix, rank, niters)[1][0].pow(2)


# The keys of the `svd` config section that are arguments of `svd_penalty`.
SVD_KEYS = ("min_size", "dim", "niters", "powm", "convtr", "proba", "conv_only", "bs")


def svd_penalty(model: nn.Module, min_size: float = 0.1, dim: int = 1, niters: int = 2,
                powm: bool = False, convtr: bool = False, proba: float = 1,
                conv_only: bool = False, exact: bool = False, bs: int = 1,
                rng: tp.Optional[random.Random] = None) -> tp.Union[float, torch.Tensor]:
    """Sum of the largest squared singular values of the weights above `min_size` MB.

    Args:
        min_size: only weights of at least that size (MB, as float32) count.
        dim: rank of the low rank SVD (`torch.svd_lowrank`'s `q`).
        niters: subspace iterations of the low rank SVD, or power iterations with `powm`.
        powm: power iterations on W W^T (or W^T W) instead of the low rank SVD.
        convtr: transposed convolutions are seen as (out, in * k) rather than (in, out * k).
        proba: the penalty is only computed with this probability (drawn from `rng`),
            and then divided by it, so that its expectation does not depend on it.
        conv_only: skip the 2D weights (linear layers, LSTMs).
        exact: the exact singular value (slow, for tests).
        bs: start vectors of the power iteration.
    Returns 0. when skipped or when no weight qualifies.
    """
    draw = rng.random() if rng is not None else random.random()
    if draw > proba:
        return 0.
    total: tp.Union[float, torch.Tensor] = 0.
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.numel() / 2 ** 18 < min_size:  # 2 ** 18 float32 per MB
                continue
            matrix = _as_matrix(module, param, convtr, conv_only)
            if matrix is not None:
                total = total + top_singular_value_squared(matrix, dim, niters, powm, bs,
                                                           exact)
    return total / proba
