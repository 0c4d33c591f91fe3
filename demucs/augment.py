"""Data augmentations acting on batches of sources (B, S, C, T), on the training device.

Every module is the identity in eval mode, except `Shift` which then crops the last
`shift` samples so that the output length does not depend on the mode.
"""
from __future__ import annotations

import random
import typing as tp

import torch
from torch import nn

from .errors import ConfigError


class Shift(nn.Module):
    """Random time shift: each source of each item gets an offset in [0, shift).

    The output is `shift` samples shorter than the input. With `same`, all the sources of
    a batch item share one offset (they stay aligned).
    """

    def __init__(self, shift: int = 8192, same: bool = False):
        super().__init__()
        self.shift = shift
        self.same = same

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        B, S, C, T = wav.shape
        length = T - self.shift
        if self.shift <= 0:
            return wav
        if length <= 0:
            raise ValueError(f"Shift: the input (B, S, C, T)={tuple(wav.shape)} is not longer "
                             f"than the shift of {self.shift} samples.")
        if not self.training:
            return wav[..., :length]
        sources = 1 if self.same else S
        offsets = torch.randint(self.shift, (B, sources, 1, 1), device=wav.device)
        indexes = torch.arange(length, device=wav.device) + offsets  # (B, S or 1, 1, length)
        return wav.gather(3, indexes.expand(B, S, C, length))


class FlipChannels(nn.Module):
    """Swap the left and right channels of random (item, source) pairs (stereo only)."""

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        B, S, C, T = wav.shape
        if not self.training or C != 2:
            return wav
        left = torch.randint(2, (B, S, 1, 1), device=wav.device).expand(B, S, 1, T)
        right = 1 - left
        return torch.cat([wav.gather(2, left), wav.gather(2, right)], dim=2)


class FlipSign(nn.Module):
    """Multiply random (item, source) pairs by -1."""

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return wav
        B, S = wav.shape[:2]  # wav: (B, S, C, T)
        signs = torch.randint(2, (B, S, 1, 1), device=wav.device, dtype=wav.dtype)
        return wav * (2 * signs - 1)


class Scale(nn.Module):
    """With probability `proba`, a random gain in [min, max) per (item, source)."""

    def __init__(self, proba: float = 1., min: float = 0.25, max: float = 1.25):
        super().__init__()
        self.proba = proba
        self.min = min
        self.max = max

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if not self.training or random.random() >= self.proba:
            return wav
        B, S = wav.shape[:2]  # wav: (B, S, C, T)
        scales = torch.empty(B, S, 1, 1, device=wav.device, dtype=wav.dtype)
        return wav * scales.uniform_(self.min, self.max)


class Remix(nn.Module):
    """With probability `proba`, shuffle each source across the items of a group.

    The batch is cut into groups of `group_size` consecutive items (0: the whole batch);
    inside a group, each source is permuted independently, which makes new mixtures from
    the same set of stems.
    """

    def __init__(self, proba: float = 1, group_size: int = 4):
        super().__init__()
        self.proba = proba
        self.group_size = group_size

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        B, S, C, T = wav.shape
        if not self.training or random.random() >= self.proba:
            return wav
        group_size = self.group_size or B
        if B % group_size != 0:
            raise ConfigError(f"Remix: the batch size {B} is not a multiple of "
                              f"augment.remix.group_size={group_size}; change one of them.")
        groups = B // group_size
        wav = wav.view(groups, group_size, S, C, T)
        noise = torch.rand(groups, group_size, S, 1, 1, device=wav.device)
        permutations = noise.argsort(dim=1)  # (G, group_size, S, 1, 1)
        wav = wav.gather(1, permutations.expand(groups, group_size, S, C, T))
        return wav.view(B, S, C, T)


def get_augmentations(cfg: tp.Any) -> nn.Sequential:
    """The augmentations of the config's `augment:` section, in the original's order."""
    augments: list[nn.Module] = [
        Shift(int(cfg.dset.samplerate * cfg.dset.shift), same=bool(cfg.augment.shift_same))]
    if cfg.augment.flip:
        augments += [FlipChannels(), FlipSign()]
    scale = cfg.augment.scale
    if scale.proba:
        augments.append(Scale(proba=scale.proba, min=scale.min, max=scale.max))
    remix = cfg.augment.remix
    if remix.proba:
        augments.append(Remix(proba=remix.proba, group_size=remix.group_size))
    return nn.Sequential(*augments)
