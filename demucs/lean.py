"""Memory-lean inference of the hybrid models: the same outputs, in less memory.

Separating a long track needs no gradients, so a forward pass need not hold what autograd
would, nor make every intermediate tensor whole. The layers of `HDemucs` and `HTDemucs`
(`hlayers`, `hdemucs`, `htdemucs`) call the functions below at the steps where the lean
computation differs from the plain one. Each function is the plain operation unless the
lean path is `engaged()`, and then computes the same values (up to the float rounding of
sums taken by blocks) in less memory (bench/README.md, `bench_memory.py`):

- convolutions whose whole output would be large run by blocks of time steps: the freq
  branch's (k, 1) convolutions (`per_time_step`), the time branch's transposed ones
  (`transposed_conv1d`), and the rewrite convolutions with their GLU, their input sum
  `x + skip` made by block too (`rewrite_glu`);
- the DConvs over frequencies run on blocks of rows, written in place (`by_rows`);
- GELU (`gelu`) and the output's denormalisation (`scale_shift`) in place of the layer's
  own tensors, never of its inputs;
- one source at a time through the mask and the inverse STFT (`add_sources`);
- the C heap trimmed after each large layer (`release_freed_memory`, glibc only).

The switch: `lean_inference()` turns gradients off and the lean path on, in the current
thread; `apply_model` (hence evaluation and the `demucs` command) separates within it.
`lean_inference(False)` turns gradients off and computes whole tensors, as a training
forward does. With gradients enabled the path is always the plain one: the in-place steps
would break autograd.

A bare `model(x)` under `torch.no_grad()` (or inference mode), inside no `lean_inference`,
takes the lean path: that was the behaviour before the switch existed, and we kept it (the
solver's validation forward and `bench_memory.py --floor` run that way).

`block_sizes` sets the sizes that decide when and by how much the lean path splits its
work (`BlockSizes`); tests shrink them to exercise the blocks on tiny models.
"""
from __future__ import annotations

import typing as tp
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .utils import trim_heap

MB = 2 ** 20


@dataclass(frozen=True)
class BlockSizes:
    """When and by how much the lean path splits its work.

    Args:
        lean_bytes: a convolution whose whole output (double-width for a rewrite, the
            column buffer for a transposed one) would take this many bytes or more runs
            by blocks of time steps; smaller ones (chunks of a few seconds) run whole,
            which is faster.
        block_bytes: the output of one such block stays under this size.
        dconv_rows: a DConv over frequencies runs on this many (batch, frequency) rows
            at a time: each row is independent, and its wide GLU intermediates stay small.
        trim_bytes: after a layer with an output this large or larger, what the layer
            freed goes back to the system; below, it is too little to be worth it
            (trimming costs page faults later): the inner layers never trim.
    """
    lean_bytes: int = 64 * MB
    block_bytes: int = 4 * MB
    dconv_rows: int = 16
    trim_bytes: int = 16 * MB


# The switch (None: not set, lean whenever gradients are off) and the sizes, per thread.
_SWITCH: ContextVar[tp.Optional[bool]] = ContextVar("lean_inference", default=None)
_SIZES: ContextVar[tp.Optional[BlockSizes]] = ContextVar("lean_block_sizes", default=None)
DEFAULT_SIZES = BlockSizes()


def _sizes() -> BlockSizes:
    return _SIZES.get() or DEFAULT_SIZES


@contextmanager
def lean_inference(enabled: bool = True) -> tp.Iterator[None]:
    """Within: no gradients, and the lean path on (or off with `enabled=False`)."""
    token = _SWITCH.set(enabled)
    try:
        with torch.no_grad():
            yield
    finally:
        _SWITCH.reset(token)


@contextmanager
def block_sizes(sizes: BlockSizes) -> tp.Iterator[None]:
    """Within: the lean path splits its work by `sizes` (in the current thread)."""
    token = _SIZES.set(sizes)
    try:
        yield
    finally:
        _SIZES.reset(token)


def engaged() -> bool:
    """Whether a forward now takes the lean path: gradients off, and not switched off."""
    return _SWITCH.get() is not False and not torch.is_grad_enabled()


def requested() -> tp.Optional[bool]:
    """The switch as the innermost `lean_inference` set it (None outside of any)."""
    return _SWITCH.get()


# ---------------------------------------------------------------------------------------
# Between layers, and the model's output


def release_freed_memory(output: torch.Tensor) -> None:
    """Between two lean layers, after a large one (judged by its `output`): the memory the
    layer freed goes back to the system (`trim_heap`) rather than staying in a fragmented
    heap that grows from chunk to chunk."""
    if engaged() and output.nbytes >= _sizes().trim_bytes:
        trim_heap()


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`x * scale + shift`; lean, in place of `x`, a tensor the caller owns."""
    if not engaged():
        return x * scale + shift
    return x.mul_(scale).add_(shift)


def add_sources(waveforms: tp.Callable[[torch.Tensor], torch.Tensor], m: torch.Tensor,
                add_to: tp.Optional[torch.Tensor], coupled: bool) -> torch.Tensor:
    """`add_to + waveforms(m)` (or `waveforms(m)` when `add_to` is None), where
    `waveforms` turns the freq branch output `m` (B, S, ...) into (B, S, C, T).

    Lean, unless Wiener filtering couples the sources (`coupled`): one source at a time,
    summed in place into `add_to`, so that the complex spectrograms of all sources and
    their inverse transforms never exist together.
    """
    if not engaged() or coupled or add_to is None:
        x = waveforms(m)
        return x if add_to is None else add_to + x
    for source in range(m.shape[1]):
        add_to[:, source] += waveforms(m[:, source:source + 1])[:, 0]
    return add_to


# ---------------------------------------------------------------------------------------
# Inside a layer


def gelu(y: torch.Tensor) -> torch.Tensor:
    """GELU of a tensor the layer owns; lean, in place of it."""
    return torch.ops.aten.gelu_(y) if engaged() else F.gelu(y)


def by_rows(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """`module(rows)` for a module that treats each row (first axis) of `rows` on its
    own, such as a DConv over the frequencies of a layer; lean, on blocks of rows
    written in place of `rows`, a tensor the caller owns."""
    block = _sizes().dconv_rows
    if not engaged() or len(rows) <= block:
        return module(rows)
    for start in range(0, len(rows), block):
        rows[start:start + block] = module(rows[start:start + block])
    return rows


def _block_steps(step_bytes: int, length: int) -> int:
    """Lean: time steps per block for outputs of `step_bytes` per step (0: run whole)."""
    sizes = _sizes()
    if not engaged() or step_bytes * length < sizes.lean_bytes:
        return 0
    return max(1, sizes.block_bytes // step_bytes)


def per_time_step(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for a layer that treats each time step (last axis) on its own, such as
    the (k, 1) convolutions of the freq branch; lean, on blocks of time steps written
    into the output, which avoids the convolutions' whole-size buffers."""
    length = x.shape[-1]
    if not engaged() or length == 1:
        return layer(x)
    first = layer(x[..., :1])
    step = _block_steps(first.numel() * first.element_size(), length)
    if not step:
        return layer(x)
    out = first.new_empty(*first.shape[:-1], length)
    out[..., :1] = first
    for start in range(1, length, step):
        out[..., start:start + step] = layer(x[..., start:start + step])
    return out


def transposed_conv1d(conv_tr: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """`conv_tr(y)` for a ConvTranspose1d of the time branch; lean, on blocks of input
    steps whose outputs overlap-add into the result, the bias added once at the end,
    which avoids the whole-size column buffer of the convolution."""
    assert isinstance(conv_tr, nn.ConvTranspose1d)
    stride, kernel = conv_tr.stride[0], conv_tr.kernel_size[0]
    length = y.shape[-1]
    step = _block_steps(conv_tr.out_channels * kernel * y.shape[0] * y.element_size(),
                        length)
    if not step or conv_tr.padding[0] != 0:
        return conv_tr(y)
    out = y.new_zeros(y.shape[0], conv_tr.out_channels, (length - 1) * stride + kernel)
    for start in range(0, length, step):
        block = F.conv_transpose1d(y[..., start:start + step], conv_tr.weight, None, stride)
        out[..., start * stride:start * stride + block.shape[-1]] += block
    if conv_tr.bias is not None:
        out += conv_tr.bias[:, None]
    return out


def rewrite_glu(conv: nn.Module, norm: nn.Module, x: torch.Tensor,
                skip: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """GLU(norm(conv(x + skip))) over channels: (B, C, [Fr,] T) -> same shape.

    Lean, for a large input, blocks of time steps are computed one after the other, each
    with the `context` steps around it (zeros beyond the ends, as the convolution pads),
    so neither `x + skip` nor the double-width convolution output exists as a whole. A
    group norm needs whole-tensor statistics: it runs whole.
    """
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d))
    length = x.shape[-1]
    step = _block_steps(conv.out_channels * x[:, 0, ..., 0].numel() * x.element_size(),
                        length)
    if not step or not isinstance(norm, nn.Identity):
        return F.glu(norm(conv(x if skip is None else x + skip)), dim=1)
    context = int(conv.padding[-1])
    convolve = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
    padding = [int(pad) for pad in conv.padding[:-1]] + [0]  # time: real neighbours
    out = x.new_empty(x.shape[0], conv.out_channels // 2, *x.shape[2:])
    for start in range(0, length, step):
        end = min(length, start + step)
        low, high = max(0, start - context), min(length, end + context)
        block = x[..., low:high]
        if skip is not None:
            block = block + skip[..., low:high]
        block = F.pad(block, (context - (start - low), context - (high - end)))
        block = convolve(block, conv.weight, conv.bias, 1, padding)
        out[..., start:end] = F.glu(block, dim=1)
    return out
