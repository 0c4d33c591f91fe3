"""Shapes and behaviour of Demucs and HDemucs over various configurations and lengths."""
from __future__ import annotations

import typing as tp

import julius
import pytest
import torch

from demucs.demucs import BLSTM, LocalState, _resampler
from demucs.hdemucs import HDemucs, pad1d
from demucs.utils import center_trim, unfold

from helpers import SOURCES, saved_for_backward, tiny_demucs, tiny_hdemucs


def check_per_example_and_scale_equivariant(model: torch.nn.Module, length: int) -> None:
    """Forward [x, 3 x] as one batch: (B, S, C, T) outputs, finite and not all zero, and
    the second is 3 times the first. Each example is normalised by its own statistics and
    rescaled at the end, so the other example of the batch and the level of the input do
    not change the estimate."""
    x = torch.randn(1, 2, length)
    with torch.no_grad():
        out = model(torch.cat([x, 3 * x]))
    assert out.shape == (2, len(SOURCES), 2, length)
    assert torch.isfinite(out).all() and out[0].abs().max() > 1e-3
    torch.testing.assert_close(out[1], 3 * out[0], rtol=0, atol=1e-3 * out[1].abs().max().item())


@pytest.mark.parametrize("kwargs", [
    {},
    {"cac": False},
    {"cac": False, "hybrid_old": True},
    {"hybrid": False, "dconv_mode": 3, "context_enc": 1},
    {"channels_time": 6, "depth": 5, "freq_emb": 0},
    {"multi_freqs": [0.1, 0.3], "multi_freqs_depth": 2, "norm_starts": 999},
    {"cac": False, "wiener_iters": 1, "end_iters": 1, "wiener_residual": True},
    {"cac": False, "wiener_iters": -1, "end_iters": -1},
])
@pytest.mark.parametrize("length", [3001, 12345])
def test_hdemucs_shape_and_scale_equivariance(kwargs: dict[str, tp.Any], length: int) -> None:
    check_per_example_and_scale_equivariant(tiny_hdemucs(**kwargs).eval(), length)


@pytest.mark.parametrize("kwargs", [
    {},
    {"lstm_layers": 2, "resample": False, "glu": False, "dconv_mode": 2, "context": 3},
    {"rewrite": False, "normalize": True, "gelu": False},
])
@pytest.mark.parametrize("length", [1000, 8001, 22050])
def test_demucs_shape_scale_equivariance_and_valid_length(kwargs: dict[str, tp.Any],
                                                          length: int) -> None:
    model = tiny_demucs(**kwargs).eval()
    check_per_example_and_scale_equivariant(model, length)
    valid = model.valid_length(length)
    assert valid >= length
    assert model.valid_length(valid) == valid


def test_capture_init_records_kwargs() -> None:
    model = HDemucs(SOURCES, channels=4, depth=5)
    assert model._init_args_kwargs == ((SOURCES,), {"channels": 4, "depth": 5})


def test_hdemucs_training_mode_backward() -> None:
    model = tiny_hdemucs(cac=False, wiener_iters=1, end_iters=1).train()
    out = model(torch.randn(1, 2, 8192))
    out.abs().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_invalid_hybrid_options() -> None:
    with pytest.raises(ValueError, match="hybrid_old"):
        HDemucs(SOURCES, hybrid=False, hybrid_old=True)
    with pytest.raises(ValueError, match="wiener_iters"):
        HDemucs(SOURCES, wiener_iters=1, end_iters=0)


def test_blstm_framed_matches_unframed_frames_plus_skip() -> None:
    torch.manual_seed(0)
    framed = BLSTM(8, layers=1, max_steps=20, skip=True)
    whole = BLSTM(8, layers=1)  # the same weights, neither framing nor skip
    whole.load_state_dict(framed.state_dict())
    x = torch.randn(2, 8, 57)
    with torch.no_grad():
        out = framed(x)
        assert out.shape == x.shape
        # Frame k covers steps [10 k, 10 k + 20); the first keeps its first 15 steps, the
        # next ones their steps 5 to 15. Each adds the input (skip).
        torch.testing.assert_close(out[..., :15], x[..., :15] + whole(x[..., :20])[..., :15])
        torch.testing.assert_close(out[..., 15:25],
                                   x[..., 15:25] + whole(x[..., 10:30])[..., 5:15])
        short = x[..., :20]  # no longer than max_steps: a single pass
        torch.testing.assert_close(framed(short), short + whole(short))


def test_local_state_shape() -> None:
    attn = LocalState(8, heads=4, nfreqs=2, ndecay=4)
    x = torch.randn(2, 8, 33)
    assert attn(x).shape == x.shape


def test_helpers() -> None:
    x = torch.arange(10.)
    assert center_trim(x, 6).tolist() == [2., 3., 4., 5., 6., 7.]
    assert center_trim(x, 7).tolist() == [1., 2., 3., 4., 5., 6., 7.]
    with pytest.raises(ValueError):
        center_trim(x, 11)
    frames = unfold(x[None], 4, 2)
    assert frames.shape == (1, 5, 4)
    assert frames[0, 1].tolist() == [2., 3., 4., 5.]
    assert frames[0, -1].tolist() == [8., 9., 0., 0.]
    short = torch.arange(3.)[None]
    padded = pad1d(short, (5, 5), mode="reflect")
    assert padded.shape[-1] == 13
    assert padded[0, 5:8].tolist() == [0., 1., 2.]


def test_hybrid_needs_enough_depth() -> None:
    with pytest.raises(ValueError, match="increase depth"):
        HDemucs(SOURCES, channels=4, depth=4)
    assert HDemucs(SOURCES, channels=4, depth=4, hybrid=False).depth == 4


def test_mixture_phase_fast_path_is_bitwise_the_wiener_path() -> None:
    """`wiener_iters=0` skips the time-major transpositions, not a single rounding."""
    model = tiny_hdemucs(cac=False).eval()
    z = model._spec(torch.randn(1, 2, 30000))
    z[..., 3, 5] = 0  # an exact zero bin reads as 1 + 0j in the reference phase
    mag = torch.rand(1, 4, 2, *z.shape[-2:]) - 0.2
    assert torch.equal(model._mask(z, mag), model._wiener(mag, z, 0))


def test_mixture_phase_keeps_only_the_phase_for_backward() -> None:
    """Training through the mixture-phase filter keeps the mixture's cos and sin (one
    source's size each) for the backward, not the (B, S, C, Fr, T) source parts; the
    gradient is the Wiener path's."""
    model = tiny_hdemucs(cac=False).train()
    z = model._spec(torch.randn(1, 2, 30000))
    mag = torch.rand(1, 4, 2, *z.shape[-2:], requires_grad=True)
    out, kept = saved_for_backward(lambda: model._mask(z, mag))
    assert kept and all(shape[1] == 1 for shape in kept), kept
    weights = torch.randn(out.shape, dtype=out.dtype)
    grad, = torch.autograd.grad((out * weights).real.sum(), mag)
    reference, = torch.autograd.grad((model._wiener(mag, z, 0) * weights).real.sum(), mag)
    assert torch.equal(grad, reference)


def test_frequency_embedding_keeps_the_input_dtype() -> None:
    """The freq branch's embedding: in float32 the original's sum, bit for bit; under
    mixed precision a bf16 input stays bf16 (the embedding itself is float32)."""
    from demucs.hlayers import ScaledEmbedding, add_frequency_embedding
    torch.manual_seed(0)
    embedding = ScaledEmbedding(16, 4, smooth=True)
    x = torch.randn(2, 4, 16, 5)
    rows = embedding(torch.arange(16)).t()[None, :, :, None]
    assert torch.equal(add_frequency_embedding(x, embedding, 0.2), x + 0.2 * rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = add_frequency_embedding(x.bfloat16(), embedding, 0.2)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), x + 0.2 * rows, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("shape", [(1, 1000), (2, 8, 12345), (3, 5, 88200), (16, 999)])
def test_downsampling_gives_julius_outputs(shape: tuple[int, ...]) -> None:
    """Demucs' downsampling by 2 on the CPU (a depthwise convolution over the rows): the
    outputs of `julius.resample_frac` bit for bit, its input gradient up to rounding;
    other factors, `full` and `output_length` are julius's own path."""
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    resampler = _resampler(2, 1, x.device, x.dtype)
    ours = resampler(x)
    reference = julius.resample_frac(x, 2, 1)
    assert torch.equal(ours, reference)
    grad = torch.randn_like(reference)
    ours_grad, = torch.autograd.grad(ours, x, grad)
    reference_grad, = torch.autograd.grad(reference, x, grad)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-5,
                               atol=1e-6 * float(reference_grad.abs().max()))
    options: list[dict[str, tp.Any]] = [{"full": True}, {"output_length": shape[-1] // 3}]
    for kwargs in options:
        assert torch.equal(resampler(x, **kwargs), julius.resample_frac(x, 2, 1, **kwargs))
    assert torch.equal(_resampler(1, 2, x.device, x.dtype)(x), julius.resample_frac(x, 1, 2))
