"""The group norm with parallel statistics (the path CUDA takes), checked on the CPU by
forcing it."""
from __future__ import annotations

import typing as tp

import pytest
import torch
from torch.nn import functional as F

from demucs import norm
from helpers import (norm_steps, saved_for_backward, tiny_demucs, tiny_hdemucs,
                     tiny_htdemucs)


@pytest.fixture
def fast_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(norm, "FAST_DEVICES", ("cpu",))


def grads(output: torch.Tensor, inputs: tuple[torch.Tensor, ...],
          seed: int = 1) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)  # the same values whatever the output's memory layout
    return torch.autograd.grad(output, inputs, torch.randn(output.shape, dtype=output.dtype))


@pytest.mark.parametrize("groups,shape", [(1, (4, 48, 1000)), (4, (2, 16, 30, 20)),
                                          (2, (3, 8, 5)), (1, (1, 6, 1))])
def test_fast_group_norm_equals_pytorch(fast_on_cpu: None, groups: int,
                                        shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = (torch.randn(*shape) * 3 + 1).requires_grad_()
    weight = torch.randn(shape[1], requires_grad=True)
    bias = torch.randn(shape[1], requires_grad=True)
    ours = norm.group_norm(x, groups, weight, bias)
    theirs = F.group_norm(x, groups, weight, bias)
    assert type(ours.grad_fn).__name__ == "_GroupNormBackward"  # the fast path
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(ours, (x, weight, bias)), grads(theirs, (x, weight, bias))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 8, 4000), (600, 8, 40)])
def test_fast_group_norm_keeps_half_precision(fast_on_cpu: None,
                                              shape: tuple[int, ...]) -> None:
    """Few rows or many (600 examples > FAST_ROWS, the freq branch's DConv norms), a
    half input gives a half output."""
    torch.manual_seed(0)
    x = torch.randn(*shape).bfloat16().requires_grad_()
    module = norm.GroupNorm(1, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert type(out.grad_fn).__name__ == "_GroupNormBackward"
    assert out.dtype == torch.bfloat16  # stored in half precision, computed in float32
    reference = F.group_norm(x.float(), 1, module.weight, module.bias)
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=1e-2)
    grad_x, grad_w = grads(out, (x, module.weight))
    assert grad_x.dtype == torch.bfloat16 and grad_w.dtype == torch.float32


def test_cpu_keeps_pytorch_group_norm() -> None:
    """Off the fast devices, the module is `nn.GroupNorm` bit for bit (golden histories)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 300)
    module = norm.GroupNorm(4, 16)
    torch.nn.init.normal_(module.weight)
    assert torch.equal(module(x), F.group_norm(x, 4, module.weight, module.bias))
    assert isinstance(module, torch.nn.GroupNorm)
    assert set(module.state_dict()) == {"weight", "bias"}


def test_many_float32_rows_keep_pytorch_group_norm(fast_on_cpu: None) -> None:
    """On a fast device, float32 inputs with many (example, group) rows stay with
    PyTorch's kernel (fast enough there), bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(norm.FAST_ROWS, 4, 30, requires_grad=True)
    module = norm.GroupNorm(2, 4)
    out = module(x)
    assert type(out.grad_fn).__name__ == "NativeGroupNormBackward0"
    assert torch.equal(out, F.group_norm(x, 2, module.weight, module.bias))


@pytest.mark.parametrize("make", [tiny_hdemucs, tiny_demucs])
def test_models_through_the_fast_norm(monkeypatch: pytest.MonkeyPatch,
                                      make: tp.Callable[..., torch.nn.Module]) -> None:
    """A model with group norms everywhere (encoder, decoder and DConv) gives the same
    output and gradients with the fast statistics, its norms and activations fused."""
    model = make(norm_starts=0, channels=8)
    assert any(isinstance(m, norm.GroupNorm) for m in model.modules())
    mix = torch.randn(2, 2, 44100)
    reference = model(mix)
    weights = tuple(model.parameters())
    expected = grads(reference, weights)
    monkeypatch.setattr(norm, "FAST_DEVICES", ("cpu",))
    activations: list[tp.Any] = []
    apply = norm._GroupNorm.apply

    def counted(*args: tp.Any) -> torch.Tensor:
        activations.append(args[5])
        return apply(*args)
    monkeypatch.setattr(norm._GroupNorm, "apply", counted)
    out = model(mix)
    assert {("gelu", "none"), ("glu", 1)} <= set(activations)  # fused on the fast path
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads(out, weights), expected):  # float rounding, amplified by norms
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-6


def test_fast_group_norm_partial_gradients(fast_on_cpu: None) -> None:
    """Only the bias learns (frozen weight, input without gradient)."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 50)
    weight = torch.randn(6)
    bias = torch.zeros(6, requires_grad=True)
    out = norm.group_norm(x, 3, weight, bias)
    grad_b, = torch.autograd.grad(out.sum(), bias)
    torch.testing.assert_close(grad_b, torch.full((6,), 100.))


def test_fast_group_norm_of_channel_last_sequences(fast_on_cpu: None) -> None:
    """The transformer's norm of (B, T, C) sequences: a transposed, non-contiguous input."""
    from demucs.transformer import ChannelLastGroupNorm
    torch.manual_seed(0)
    module = ChannelLastGroupNorm(1, 16)
    torch.nn.init.normal_(module.weight)
    x = torch.randn(3, 50, 16, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_GroupNormBackward"
    reference = F.group_norm(x.transpose(1, 2), 1, module.weight, module.bias).transpose(1, 2)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(out, (x, module.weight)), grads(reference, (x, module.weight))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def saved_sizes(run: tp.Callable[[], torch.Tensor]) -> list[int]:
    """Element counts of the tensors autograd keeps for the backward of `run()`."""
    return [shape.numel() for shape in saved_for_backward(run)[1]]


@pytest.mark.parametrize("then", [torch.nn.GLU(1), torch.nn.GELU(), torch.nn.GELU("tanh")])
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (4, 16, 300)),
                                         (torch.bfloat16, (600, 16, 40))])
@pytest.mark.parametrize("with_gain", [False, True])
def test_norm_then_activation_in_one_step(fast_on_cpu: None, then: torch.nn.Module,
                                          dtype: torch.dtype, shape: tuple[int, ...],
                                          with_gain: bool) -> None:
    """A norm, the activation after it and a LayerScale if any as one step: the values
    and gradients of the steps apart, bit for bit, without keeping the norm's output (or
    the activation's) for the backward."""
    torch.manual_seed(0)
    x = (torch.randn(*shape) * 2 + 1).to(dtype).requires_grad_()
    steps = norm_steps(shape[1], then, with_gain)
    inputs = tuple([x] + [p for step in steps for p in step.parameters()])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        fused = norm.FusedSequential(*steps)(x)
        apart = torch.nn.Sequential(*steps)(x)
        kept_fused = saved_sizes(lambda: norm.FusedSequential(*steps)(x))
        kept_apart = saved_sizes(lambda: torch.nn.Sequential(*steps)(x))
    assert type(fused.grad_fn).__name__ == "_GroupNormBackward"
    assert fused.dtype == dtype and torch.equal(fused, apart)
    for a, b in zip(grads(fused, inputs), grads(apart, inputs)):
        assert torch.equal(a, b)
    large = fused.numel()  # the activation's output; the norm's is as large or larger
    assert sum(size >= large for size in kept_fused) == 1  # x
    assert sum(size >= large for size in kept_apart) == len(steps)


@pytest.mark.parametrize("fast", [False, True])
def test_norm_then_other_module_or_pytorch_path(monkeypatch: pytest.MonkeyPatch,
                                                fast: bool) -> None:
    """Off the fast path every module runs in turn, forward hooks included; on it, a
    norm followed by a module it cannot take too."""
    if fast:
        monkeypatch.setattr(norm, "FAST_DEVICES", ("cpu",))
    torch.manual_seed(0)
    x = torch.randn(2, 8, 50)
    module = norm.GroupNorm(2, 8)
    seen: list[torch.nn.Module] = []
    for then in [torch.nn.ReLU()] + ([] if fast else [torch.nn.GLU(1)]):
        seen.clear()
        hooks = [m.register_forward_hook(lambda m, i, o: seen.append(m)) for m in [module, then]]
        assert torch.equal(norm.FusedSequential(module, then)(x), then(module(x)))
        assert seen == [module, then] * 2
        for hook in hooks:
            hook.remove()


def test_dconv_runs_norms_with_their_activations(fast_on_cpu: None) -> None:
    """A DConv (with LSTM and attention) gives the same outputs and gradients as its layers
    run as plain `nn.Sequential`s, bit for bit, its norms fused with their activations
    (its layers are `FusedSequential`s: same state as before)."""
    from demucs.demucs import DConv
    torch.manual_seed(0)
    dconv = DConv(16, compress=2, depth=2, lstm=True, attn=True)
    x = torch.randn(3, 16, 120, requires_grad=True)
    def plain(y: torch.Tensor) -> torch.Tensor:
        for layer in dconv.layers:
            y = y + torch.nn.Sequential(*layer.children())(y)
        return y
    out, reference = dconv(x), plain(x)
    assert torch.equal(out, reference)
    inputs = (x, *dconv.parameters())
    for a, b in zip(grads(out, inputs), grads(reference, inputs)):
        assert torch.equal(a, b)
    # Per layer, the outputs of its two norms (3 x 8 x 120 and 3 x 32 x 120) and of its
    # GLU (3 x 16 x 120, the LayerScale's input) are no longer kept; the norms' scales and
    # shifts (3 x 8 and 3 x 32, two each) are.
    kept_fused = sum(saved_sizes(lambda: dconv(x)))
    kept_apart = sum(saved_sizes(lambda: plain(x)))
    assert kept_apart - kept_fused == 2 * (3 * (8 + 32) * (120 - 2) + 3 * 16 * 120)


@pytest.mark.parametrize("make", [tiny_hdemucs, tiny_demucs, tiny_htdemucs])
def test_models_fused_equal_unfused_under_bf16(fast_on_cpu: None,
                                               monkeypatch: pytest.MonkeyPatch,
                                               make: tp.Callable[..., torch.nn.Module]) -> None:
    """A whole training forward and backward under bf16 autocast on the CUDA path: the
    fused steps give the outputs and gradients of the modules run one by one, bit for
    bit, while keeping less for the backward."""
    model = make() if make is tiny_htdemucs else make(channels=8)
    mix = torch.randn(2, 2, 8000 if make is tiny_htdemucs else 44100)
    weights = tuple(model.parameters())

    def run() -> tuple[torch.Tensor, int]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, kept = saved_for_backward(lambda: model(mix))
        return out, sum(shape.numel() for shape in kept)

    fused, kept_fused = run()
    fused_grads = grads(fused, weights)
    monkeypatch.setattr(norm.FusedSequential, "forward", torch.nn.Sequential.forward)
    apart, kept_apart = run()
    assert torch.equal(fused, apart)
    for a, b in zip(fused_grads, grads(apart, weights)):
        assert torch.equal(a, b)
    assert kept_fused < kept_apart
