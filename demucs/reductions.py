"""The means, deviations and group norms of the ONNX graphs, summed in float32 as
precisely as torch sums them.

The runtimes add up long runs of values one after the other (in a few SIMD lanes):
onnxruntime's `InstanceNormalization` (which a group norm becomes) over an HTDemucs
transformer layer's 512 channels x 2688 steps was 1.8e-5 of the output away from float64,
and OpenVINO's `ReduceSum` of a 44 s spectrogram's 7.8 million magnitudes (all positive,
the errors add up) 5.5e-5: a full-size HDemucs then separated 5.7e-4 (onnxruntime) and
1.1e-4 (OpenVINO) of its scale away from the torch path, against 5e-7 for torch
(bench/README.md).

`DECOMPOSITIONS` replaces these operators in an exported program
(`ExportedProgram.run_decompositions`), by sums that take a `MatMul` with ones, which
both runtimes compute in many partial sums (a row of 7.8 million positive values:
onnxruntime 3e-6, OpenVINO 4e-7 of the sum away; by `ReduceSum`, 8e-5 and 2e-5):
- A mean or a deviation over `LONG` values or more sums blocks of `BLOCK` values (padded
  with zeros to whole blocks), then the blocks' sums (`block_sum`); a deviation subtracts
  the mean first (two passes). Over fewer values, one axis after the other
  (`staged_sum`).
- The statistics of a group norm over `LONG` values or more per group sum its last axis
  (time) by a product with ones, then the other axes (`dot_sum`); smaller group norms
  stay an `InstanceNormalization`, faster and precise enough at that size.

Why two ways: a product along a whole row is as precise over the many rows of a group
norm, and without padding a full-size HDemucs exports in 110 s, not 174 (the time per
chunk is the same within the machine's noise); but not over the one row of 1.9 million
samples a Demucs normalizes its input by (its 44 s chunk 1.4e-5 of the output away from
torch with OpenVINO, 8.8e-7 by blocks; bench/README.md).

Which way is decided on the sizes of the example traced (`optimization_hint`), with no
guard on the symbols of a graph of any length: padding a symbolic size to whole blocks
makes the exporter's shape reasoning slow (a small dynamic HDemucs with every sum by
blocks exported in 3.5 minutes, not 1), so only the longest sums take it.
"""
from __future__ import annotations

import typing as tp

import torch
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.nn import functional as F

aten = torch.ops.aten
LONG = 2 ** 18
BLOCK = 1024


def staged_sum(x: torch.Tensor, dims: tp.Sequence[int]) -> torch.Tensor:
    """The sum of `x` over `dims` (kept, of size 1), one axis after the other."""
    for dim in sorted({dim % x.dim() for dim in dims}, reverse=True):
        x = x.sum(dim, keepdim=True)
    return x


def block_sum(x: torch.Tensor, dims: tp.Sequence[int]) -> torch.Tensor:
    """The sum of `x` over `dims` (kept, of size 1): their values are summed by blocks of
    `BLOCK` (padded with zeros to whole blocks), then the blocks' sums are; over fewer
    than `LONG` values (in the example traced), one axis after the other."""
    reduced = sorted({dim % x.dim() for dim in dims})
    if not _long(_count(x, reduced)):
        return staged_sum(x, reduced)
    kept = [dim for dim in range(x.dim()) if dim not in reduced]
    sizes = [x.shape[dim] for dim in kept]
    flat = x.permute(*kept, *reduced).reshape(*sizes, -1)
    padded = F.pad(flat, (0, (-flat.shape[-1]) % BLOCK))
    # Each block summed by a product with ones: OpenVINO's ReduceSum adds up even one
    # block's values one after the other (1.5e-4 off on a spectrogram's magnitudes,
    # its MatMul 7e-8); onnxruntime's is as good as its MatMul.
    ones = torch.ones(BLOCK, 1, dtype=x.dtype, device=x.device)
    sums = (padded.reshape(*sizes, -1, BLOCK) @ ones).sum((-1, -2))
    return sums.reshape([1 if dim in reduced else x.shape[dim] for dim in range(x.dim())])


def dot_sum(x: torch.Tensor, dims: tp.Sequence[int]) -> torch.Tensor:
    """The sum of `x` over `dims` (kept, of size 1), which include its last axis: that
    one by a product with ones (no padding), then the others one axis after the other."""
    ones = torch.ones(x.shape[-1], 1, dtype=x.dtype, device=x.device)
    return staged_sum(x @ ones, [dim for dim in dims if dim % x.dim() != x.dim() - 1])


def _long(count: tp.Any) -> bool:
    """Whether a sum of `count` values (a symbol: its size in the example traced) is
    long (`LONG`)."""
    return optimization_hint(count, fallback=LONG) >= LONG


def _dims(x: torch.Tensor, dims: tp.Optional[tp.Sequence[int]]) -> tp.List[int]:
    return list(range(x.dim())) if not dims else [dim % x.dim() for dim in dims]


def _count(x: torch.Tensor, dims: tp.Sequence[int]) -> tp.Any:
    count: tp.Any = 1
    for dim in dims:
        count = count * x.shape[dim]
    return count


def _squeeze(x: torch.Tensor, dims: tp.Sequence[int], keepdim: bool) -> torch.Tensor:
    return x if keepdim else x.squeeze(tuple(dims))


def mean(x: torch.Tensor, dims: tp.Optional[tp.Sequence[int]] = None, keepdim: bool = False,
         dtype: tp.Optional[torch.dtype] = None) -> torch.Tensor:
    """`aten.mean.dim`."""
    x = x if dtype is None else x.to(dtype)
    dims = _dims(x, dims)
    return _squeeze(block_sum(x, dims) / _count(x, dims), dims, keepdim)


Sum = tp.Callable[[torch.Tensor, tp.Sequence[int]], torch.Tensor]


def _centered(x: torch.Tensor, dims: tp.Sequence[int], correction: float,
              total: Sum = block_sum) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """`x` less its mean over `dims`, and its variance there (the squares of the centered
    values summed, over the count less `correction`), both with `dims` kept; the sums
    by `total`."""
    count = _count(x, dims)
    centered = x - total(x, dims) / count
    return centered, total(centered * centered, dims) / (count - correction)


def var(x: torch.Tensor, dims: tp.Optional[tp.Sequence[int]] = None, *,
        correction: tp.Optional[float] = None, keepdim: bool = False) -> torch.Tensor:
    """`aten.var.correction`: the mean of the squared deviations from the mean (two
    passes), divided by the count less `correction` (1 by default)."""
    dims = _dims(x, dims)
    variance = _centered(x, dims, 1 if correction is None else correction)[1]
    return _squeeze(variance, dims, keepdim)


def std(x: torch.Tensor, dims: tp.Optional[tp.Sequence[int]] = None, *,
        correction: tp.Optional[float] = None, keepdim: bool = False) -> torch.Tensor:
    """`aten.std.correction`: the square root of `var`."""
    return torch.sqrt(var(x, dims, correction=correction, keepdim=keepdim))


def var_unbiased(x: torch.Tensor, dims: tp.Optional[tp.Sequence[int]] = None,
                 unbiased: bool = True, keepdim: bool = False) -> torch.Tensor:
    """`aten.var.dim` (`Tensor.var(dim, unbiased)`)."""
    return var(x, dims, correction=int(unbiased), keepdim=keepdim)


def std_unbiased(x: torch.Tensor, dims: tp.Optional[tp.Sequence[int]] = None,
                 unbiased: bool = True, keepdim: bool = False) -> torch.Tensor:
    """`aten.std.dim` (`Tensor.std(dim, unbiased)`)."""
    return std(x, dims, correction=int(unbiased), keepdim=keepdim)


def group_norm(x: torch.Tensor, groups: int, weight: tp.Optional[torch.Tensor] = None,
               bias: tp.Optional[torch.Tensor] = None, eps: float = 1e-5,
               cudnn_enabled: bool = True) -> torch.Tensor:
    """`aten.group_norm` (`F.group_norm`): its statistics by `dot_sum` over `LONG`
    values or more per group (in the example traced); else the fused operator, which the
    runtimes compute faster (OpenVINO took 9 % longer on an HTDemucs 955717e8 chunk with
    every group norm decomposed)."""
    batch, channels = x.shape[:2]
    grouped = x.reshape(batch, groups, channels // groups, *x.shape[2:])
    axes = list(range(2, grouped.dim()))
    count = _count(grouped, axes)
    if not _long(count):
        return aten.native_group_norm.default(x, weight, bias, batch, channels,
                                              count * groups // channels, groups, eps)[0]
    centered, variance = _centered(grouped, axes, 0, dot_sum)
    out = (centered * torch.rsqrt(variance + eps)).reshape(x.shape)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


DECOMPOSITIONS: tp.Dict[tp.Any, tp.Callable] = {
    aten.mean.dim: mean,
    aten.var.correction: var,
    aten.std.correction: std,
    aten.var.dim: var_unbiased,
    aten.std.dim: std_unbiased,
    aten.group_norm.default: group_norm,
}
