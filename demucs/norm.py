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

In a `FusedSequential` (the DConvs, Demucs' encoder and decoder layers), a norm on this
path, the GELU / GLU after it and a `ChannelScale` (the DConvs' LayerScale) run as one
autograd step, which keeps only the norm's input for the backward and computes the rest
again there, rather than keeping the input of each.
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

FAST_DEVICES: tuple[str, ...] = ("cuda",)  # device types that take the fast statistics
FAST_ROWS = 512  # below this many (example, group) rows; above, PyTorch's kernel is fine
HALF = (torch.float16, torch.bfloat16)  # taken whatever the row count (see above)


def _activation_of(module: tp.Optional[nn.Module]) -> tp.Optional[tuple[str, tp.Any]]:
    """("glu", dim) or ("gelu", approximate): the activations `_GroupNorm` can apply
    after the norm; None for any other module."""
    if isinstance(module, nn.GLU):
        return "glu", module.dim
    if isinstance(module, nn.GELU):
        return "gelu", module.approximate
    return None


def _statistics(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1 / std of each (example, group) row of `x`, in float32: (N, G) each."""
    rows = x.reshape(x.shape[0], groups, -1).float()  # a copy for half inputs only
    var, mean = torch.var_mean(rows, dim=-1, correction=0)
    return mean, (var + eps).rsqrt_()


def _affine(mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (example, channel) scale and shift of the normalisation: (N, C) each, float32."""
    per_group = weight.shape[0] // mean.shape[1]
    scale = rstd.repeat_interleave(per_group, dim=1) * weight.float()
    shift = bias.float() - mean.repeat_interleave(per_group, dim=1) * scale
    return scale, shift


def _normalise(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`x` (N, C, ...) times `scale` plus `shift`, computed in float32, stored in x's dtype."""
    flat = x.reshape(*x.shape[:2], -1)
    out = torch.empty_like(flat)
    torch.addcmul(shift[..., None], flat, scale[..., None], out=out)
    return out.view_as(x)


def _activate(y: torch.Tensor, act: tuple[str, tp.Any]) -> torch.Tensor:
    kind, arg = act
    return F.glu(y, dim=arg) if kind == "glu" else F.gelu(y, approximate=arg)


def _activation_backward(grad: torch.Tensor, y: torch.Tensor,
                         act: tuple[str, tp.Any]) -> torch.Tensor:
    """The gradient autograd computes for `_activate(y, act)`, with the same kernel."""
    kind, arg = act
    if kind == "glu":
        return torch.ops.aten.glu_backward(grad, y, arg)
    return torch.ops.aten.gelu_backward(grad, y, approximate=arg)


def _channel_scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`scale` (C,) times `x` (N, C, T) per channel, in x's dtype."""
    return scale[:, None].to(x.dtype) * x


class ChannelScale(nn.Module):
    """A learnt per-channel `scale` (C,) applied to `x` (N, C, T) in x's dtype: under
    mixed precision the stream it scales stays in half precision. After a group norm and
    its activation in a `FusedSequential`, it joins their step (`_GroupNorm`)."""

    scale: nn.Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channel_scaled(x, self.scale)


class _GroupNorm(torch.autograd.Function):
    """Group norm of `x` (N, C, ...) with affine `weight`, `bias` (C,), then the
    activation `act` (`_activation_of`) if given, and after it the channel scale `gain`
    (`ChannelScale`) if given.

    With an activation, the norm's output is not kept for the activation's backward: the
    backward computes it again from `x` (which the norm's own backward keeps anyway) and
    the (N, C) scale and shift, with the same multiply-add under the same autocast state;
    with a channel scale, the activation's output is computed again too, for the scale's
    gradient. The gradients are those of the steps run apart, bit for bit (the same
    kernels on the same values), and one or two tensors of the norm's size fewer are kept
    until the backward.
    """

    @staticmethod
    def forward(ctx: tp.Any, x: torch.Tensor, groups: int, weight: torch.Tensor,
                bias: torch.Tensor, eps: float, act: tp.Optional[tuple[str, tp.Any]] = None,
                gain: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        mean, rstd = _statistics(x, groups, eps)
        scale, shift = _affine(mean, rstd, weight, bias)
        out = _normalise(x, scale, shift)
        if act is None:
            ctx.save_for_backward(x, mean, rstd, weight, None, None, None)
        else:  # (N, C) each: the output again is one multiply-add over `x`
            ctx.save_for_backward(x, mean, rstd, weight, scale, shift, gain)
            out = _activate(out, act)
            if gain is not None:
                out = _channel_scaled(out, gain)
        ctx.groups, ctx.act = groups, act
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device),
                        torch.get_autocast_dtype(device))
        return out

    @staticmethod
    def backward(ctx: tp.Any, grad: torch.Tensor) -> tuple[tp.Optional[torch.Tensor], ...]:
        x, mean, rstd, weight, scale, shift, gain = ctx.saved_tensors
        grad_gain = None
        if ctx.act is not None:
            device, enabled, dtype = ctx.autocast
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                y = _normalise(x, scale, shift)
                if gain is not None:
                    # What autograd does for `_channel_scaled`: the product's gradients,
                    # the gain's summed to its (C, 1) shape, then cast back and squeezed.
                    z = _activate(y, ctx.act)
                    gain_like = gain[:, None].to(z.dtype)
                    if ctx.needs_input_grad[6]:
                        grad_gain = (grad * z).sum_to_size(gain_like.shape)
                        grad_gain = grad_gain.to(gain.dtype).squeeze(1)
                    del z
                    grad = grad * gain_like
            grad = _activation_backward(grad, y, ctx.act)
            del y
        batch, channels = x.shape[:2]
        length = x[0, 0].numel()
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
            grad.float().contiguous(), x.float().contiguous(), mean, rstd, weight.float(),
            batch, channels, length, ctx.groups, needs)
        grad_x, grad_w, grad_b = (None if value is None else value.to(like.dtype)
                                  for value, like in [(grad_x, x), (grad_w, weight),
                                                      (grad_b, weight)])
        return grad_x, None, grad_w, grad_b, None, None, grad_gain


def _fast(x: torch.Tensor, groups: int, weight: tp.Optional[torch.Tensor],
          bias: tp.Optional[torch.Tensor]) -> bool:
    """Whether the group norm of `x` takes `_GroupNorm` rather than `F.group_norm`."""
    few_rows = x.shape[0] * groups < FAST_ROWS
    return (weight is not None and bias is not None and x.device.type in FAST_DEVICES
            and (few_rows or x.dtype in HALF) and x.numel() > 0)


def group_norm(x: torch.Tensor, groups: int, weight: tp.Optional[torch.Tensor],
               bias: tp.Optional[torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """`F.group_norm(x, groups, weight, bias, eps)` of `x` (N, C, ...)."""
    if not _fast(x, groups, weight, bias):
        return F.group_norm(x, groups, weight, bias, eps)
    return _GroupNorm.apply(x, groups, weight, bias, eps, None, None)


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same arguments and state) computed by `group_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class FusedSequential(nn.Sequential):
    """`nn.Sequential` (same arguments and state) where a `GroupNorm` followed by a GELU
    or a GLU, and by a `ChannelScale` if one comes next, runs as one step when the norm
    takes the fast path: what is in between is then not kept for the backward
    (`_GroupNorm`). Elsewhere, and for any other module, each module is called in turn,
    hooks included."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self)
        index = 0
        while index < len(modules):
            module = modules[index]
            then = modules[index + 1] if index + 1 < len(modules) else None
            gain = modules[index + 2] if index + 2 < len(modules) else None
            act = _activation_of(then)
            if (type(module) is GroupNorm and act is not None
                    and _fast(x, module.num_groups, module.weight, module.bias)):
                gain = gain if isinstance(gain, ChannelScale) else None
                x = _GroupNorm.apply(x, module.num_groups, module.weight, module.bias,
                                     module.eps, act, None if gain is None else gain.scale)
                index += 2 if gain is None else 3
            else:
                x = module(x)
                index += 1
        return x
