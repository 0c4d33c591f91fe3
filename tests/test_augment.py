"""Tests of demucs.augment: the effect of each augmentation, eval mode and the builder."""
from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf

from demucs.augment import FlipChannels, FlipSign, Remix, Scale, Shift, get_augmentations
from demucs.errors import ConfigError


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)
    random.seed(0)


def batch(B: int = 8, S: int = 4, C: int = 2, T: int = 64) -> torch.Tensor:
    return torch.randn(B, S, C, T)  # (B, S, C, T)


def offset_of(out: torch.Tensor, ref: torch.Tensor) -> int:
    """Offset at which the 1D `out` appears in `ref`."""
    for offset in range(len(ref) - len(out) + 1):
        if torch.equal(ref[offset:offset + len(out)], out):
            return offset
    raise AssertionError("not a slice of the input")


@pytest.mark.parametrize("same", [False, True])
def test_shift(same: bool) -> None:
    wav = batch()
    out = Shift(shift=16, same=same)(wav)
    assert out.shape == (8, 4, 2, 48)
    offsets = torch.tensor([[offset_of(out[b, s, 0], wav[b, s, 0]) for s in range(4)]
                            for b in range(8)])
    assert offsets.min() >= 0 and offsets.max() < 16
    for b in range(8):
        for s in range(4):  # both channels move together
            start = int(offsets[b, s])
            assert torch.equal(out[b, s], wav[b, s, :, start:start + 48])
    if same:
        assert (offsets == offsets[:, :1]).all()
    else:
        assert len(set(offsets.flatten().tolist())) > 1


def test_shift_eval_crops() -> None:
    wav = batch()
    assert torch.equal(Shift(shift=16).eval()(wav), wav[..., :48])
    assert torch.equal(Shift(shift=0)(wav), wav)


def test_flip_channels() -> None:
    wav = batch(B=16)
    out = FlipChannels()(wav)
    same = (out == wav).flatten(2).all(-1)  # (B, S)
    swapped = (out == wav.flip(2)).flatten(2).all(-1)
    assert (same | swapped).all() and same.any() and swapped.any()
    mono = batch(C=1)
    assert torch.equal(FlipChannels()(mono), mono)


def test_flip_sign_keeps_mixture_sum() -> None:
    wav = batch(B=16)
    out = FlipSign()(wav)
    signs = (out / wav).mean(dim=(2, 3))  # (B, S)
    assert torch.allclose(signs.abs(), torch.ones_like(signs))
    assert (signs > 0).any() and (signs < 0).any()
    # mixture = sum of sources still holds for the flipped sources
    torch.testing.assert_close(out.sum(1), (signs[..., None, None] * wav).sum(1))


def test_scale() -> None:
    wav = batch(B=16)
    out = Scale(proba=1., min=0.25, max=1.25)(wav)
    gains = out / wav  # (B, S, C, T), constant per (item, source)
    assert torch.allclose(gains, gains[..., :1, :1].expand_as(gains))
    assert gains.min() >= 0.25 and gains.max() <= 1.25 and gains.std() > 0
    assert torch.equal(Scale(proba=0.)(wav), wav)


@pytest.mark.parametrize("group_size", [4, 0])
def test_remix_permutes_sources_within_groups(group_size: int) -> None:
    wav = batch(B=8)
    out = Remix(proba=1, group_size=group_size)(wav)
    size = group_size or 8
    for start in range(0, 8, size):
        for s in range(4):
            group_in = {tuple(x.flatten().tolist()) for x in wav[start:start + size, s]}
            group_out = {tuple(x.flatten().tolist()) for x in out[start:start + size, s]}
            assert group_in == group_out  # same stems, possibly with other items
    torch.testing.assert_close(out.sum(dim=(0, 1)), wav.sum(dim=(0, 1)))
    assert not torch.equal(out, wav)


def test_remix_batch_not_divisible() -> None:
    with pytest.raises(ConfigError, match="group_size"):
        Remix(group_size=3)(batch(B=8))
    assert Remix(proba=0, group_size=3)(batch(B=8)).shape == (8, 4, 2, 64)  # not applied


def test_remix_proba_zero() -> None:
    wav = batch()
    assert torch.equal(Remix(proba=0)(wav), wav)


def make_cfg(**augment: object) -> object:
    base = {"shift_same": False, "flip": True, "scale": {"proba": 1, "min": 0.25, "max": 1.25},
            "remix": {"proba": 1, "group_size": 4}, "repitch": {"proba": 0.2, "max_tempo": 12}}
    cfg = OmegaConf.create({"dset": {"samplerate": 1000, "shift": 0.016}, "augment": base})
    return OmegaConf.merge(cfg, {"augment": augment})


def test_get_augmentations() -> None:
    augments = get_augmentations(make_cfg())
    assert [type(m) for m in augments] == [Shift, FlipChannels, FlipSign, Scale, Remix]
    assert augments[0].shift == 16 and not augments[0].same
    assert augments[4].group_size == 4
    bare = get_augmentations(make_cfg(flip=False, shift_same=True, scale={"proba": 0},
                                      remix={"proba": 0}))
    assert [type(m) for m in bare] == [Shift] and bare[0].same


def test_eval_mode_is_identity_except_shift() -> None:
    augments = get_augmentations(make_cfg()).eval()
    wav = batch()
    assert torch.equal(augments(wav), wav[..., :64 - 16])
    augments.train()
    assert augments(wav).shape == (8, 4, 2, 48)
