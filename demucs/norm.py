"""GroupNorm, with statistics that parallelise when there are few groups.

PyTorch's CUDA group norm reduces each (example, group) row with a single thread block:
with GroupNorm(1, C) on a batch of 4 that is 4 blocks for the whole tensor, and the
norms of an HTDemucs took a third of its bf16 training step on an H100. `group_norm`
computes the statistics with an ordinary reduction (spread over the GPU whatever the row
count), normalises in one fused pass and reuses PyTorch's group norm backward. It gives
the same values as `F.group_norm` up to float rounding; elsewhere (CPU, many rows) it is
`F.group_norm` itself, so CPU results are unchanged bit for bit.

Under mixed precision the output keeps the input's dtype (bf16 / fp16): the statistics
and the normalisation run in float32, but the (large) output is stored in half precision,
where CUDA autocast's `F.group_norm` would store it in float32. Half inputs take this
path whatever their row count: in an HDemucs the freq branch's DConv norms see
example x frequency rows (thousands), and their float32 outputs, kept for the backward
of the GELU / GLU that follow, took 1 GB of the 7.9 GB peak of a bf16 step (H100,
batch 4 x 7.8 s).
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

FAST_DEVICES = ("cuda",)  # device types that take the fast statistics
FAST_ROWS = 512  # below this many (example, group) rows; above, PyTorch's kernel is fine
HALF = (torch.float16, torch.bfloat16)  # taken whatever the row count (see above)


class _GroupNorm(torch.autograd.Function):
    """Group norm of `x` (N, C, ...) with affine `weight`, `bias` (C,)."""

    @staticmethod
    def forward(ctx: tp.Any, x: torch.Tensor, groups: int, weight: torch.Tensor,
                bias: torch.Tensor, eps: float) -> torch.Tensor:
        batch, channels = x.shape[:2]
        rows = x.reshape(batch, groups, -1).float()  # a copy for half inputs only
        var, mean = torch.var_mean(rows, dim=-1, correction=0)  # (N, G)
        del rows
        rstd = (var + eps).rsqrt_()
        per_group = channels // groups
        scale = rstd.repeat_interleave(per_group, dim=1) * weight.float()  # (N, C)
        shift = bias.float() - mean.repeat_interleave(per_group, dim=1) * scale
        flat = x.reshape(batch, channels, -1)
        out = torch.empty_like(flat)  # computed in float32, stored in x's dtype
        torch.addcmul(shift[..., None], flat, scale[..., None], out=out)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.groups = groups
        return out.view_as(x)

    @staticmethod
    def backward(ctx: tp.Any, grad: torch.Tensor) -> tuple[tp.Optional[torch.Tensor], ...]:
        x, mean, rstd, weight = ctx.saved_tensors
        batch, channels = x.shape[:2]
        length = x[0, 0].numel()
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
            grad.float().contiguous(), x.float().contiguous(), mean, rstd, weight.float(),
            batch, channels, length, ctx.groups, needs)
        grad_x, grad_w, grad_b = (None if value is None else value.to(like.dtype)
                                  for value, like in [(grad_x, x), (grad_w, weight),
                                                      (grad_b, weight)])
        return grad_x, None, grad_w, grad_b, None


def group_norm(x: torch.Tensor, groups: int, weight: tp.Optional[torch.Tensor],
               bias: tp.Optional[torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """`F.group_norm(x, groups, weight, bias, eps)` of `x` (N, C, ...)."""
    few_rows = x.shape[0] * groups < FAST_ROWS
    if (weight is None or bias is None or x.device.type not in FAST_DEVICES
            or not (few_rows or x.dtype in HALF) or x.numel() == 0):
        return F.group_norm(x, groups, weight, bias, eps)
    return _GroupNorm.apply(x, groups, weight, bias, eps)


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same arguments and state) computed by `group_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
