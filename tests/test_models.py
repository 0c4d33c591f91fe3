"""Shapes and behaviour of Demucs and HDemucs over various configurations and lengths."""
from __future__ import annotations

import pytest
import torch

from demucs.demucs import BLSTM, Demucs, LocalState
from demucs.hdemucs import HDemucs, pad1d
from demucs.utils import center_trim, unfold

SOURCES = ["drums", "bass", "other", "vocals"]


def small_hdemucs(**kwargs) -> HDemucs:
    return HDemucs(SOURCES, channels=4, **kwargs).eval()


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
def test_hdemucs_shapes(kwargs: dict, length: int) -> None:
    torch.manual_seed(0)
    model = small_hdemucs(**kwargs)
    with torch.no_grad():
        out = model(torch.randn(1, 2, length))
    assert out.shape == (1, 4, 2, length)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs", [
    {},
    {"lstm_layers": 2, "resample": False, "glu": False, "dconv_mode": 2, "context": 3},
    {"rewrite": False, "normalize": True, "gelu": False},
])
@pytest.mark.parametrize("length", [1000, 8001, 22050])
def test_demucs_shapes(kwargs: dict, length: int) -> None:
    model = Demucs(SOURCES, channels=4, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 2, length))
    assert out.shape == (1, 4, 2, length)
    valid = model.valid_length(length)
    assert valid >= length
    assert model.valid_length(valid) == valid


def test_capture_init_records_kwargs() -> None:
    model = HDemucs(SOURCES, channels=4, depth=5)
    assert model._init_args_kwargs == ((SOURCES,), {"channels": 4, "depth": 5})


def test_hdemucs_training_mode_backward() -> None:
    model = small_hdemucs(cac=False, wiener_iters=1, end_iters=1).train()
    out = model(torch.randn(1, 2, 8192))
    out.abs().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_invalid_hybrid_options() -> None:
    with pytest.raises(ValueError, match="hybrid_old"):
        HDemucs(SOURCES, hybrid=False, hybrid_old=True)
    with pytest.raises(ValueError, match="wiener_iters"):
        HDemucs(SOURCES, wiener_iters=1, end_iters=0)


def test_blstm_framed_matches_shape_and_skip() -> None:
    lstm = BLSTM(8, layers=1, max_steps=20, skip=True)
    x = torch.randn(2, 8, 57)
    assert lstm(x).shape == x.shape


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
    torch.manual_seed(0)
    model = HDemucs(SOURCES, channels=4, cac=False).eval()
    z = model._spec(torch.randn(1, 2, 30000))
    z[..., 3, 5] = 0  # an exact zero bin reads as 1 + 0j in the reference phase
    mag = torch.rand(1, 4, 2, *z.shape[-2:]) - 0.2
    assert torch.equal(model._mask(z, mag), model._wiener(mag, z, 0))
