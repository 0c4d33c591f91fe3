"""Bags of models: several models of the same sources whose estimates are averaged.

A bag is a plain `nn.Module` holding its models and per-source weights; `apply.apply_model`
applies it (each model in turn, then the weighted average). The model repositories build
bags from yaml files (`repo.load_bag`) without importing the inference code, which is
why the class lives here rather than in `apply.py`.

Class paths are part of the format: `demucs.apply.BagOfModels`, this class's home in
upstream Demucs and in earlier versions of this package, stays importable (a re-export),
so bags pickled under that path still load.
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn


def max_allowed_segment(model: tp.Any) -> float:
    """Longest chunk, in seconds, `model` (or a bag) accepts: inf for most models."""
    return float(getattr(model, "max_allowed_segment", math.inf))


class BagOfModels(nn.Module):
    """Several models whose estimates are averaged, with per-source weights.

    Args:
        models: models with the same sources, sample rate and audio channels.
        weights: one list per model with one weight per source (default: all 1).
        segment: if given, overrides the `segment` (seconds) of every model, except of
            the models it would give chunks longer than they accept (`max_allowed_segment`).
    """

    def __init__(self, models: tp.List[tp.Any],
                 weights: tp.Optional[tp.List[tp.List[float]]] = None,
                 segment: tp.Optional[float] = None):
        super().__init__()
        if not models:
            raise ValueError("A bag needs at least one model.")
        first = models[0]
        for other in models:
            for attr in ("sources", "samplerate", "audio_channels"):
                if getattr(other, attr) != getattr(first, attr):
                    raise ValueError(f"Models of a bag must share {attr}: "
                                     f"{getattr(other, attr)} != {getattr(first, attr)}.")
            if segment is not None and segment <= max_allowed_segment(other):
                other.segment = segment
        self.audio_channels: int = first.audio_channels
        self.samplerate: int = first.samplerate
        self.sources: tp.List[str] = first.sources
        self.models = nn.ModuleList(models)
        if weights is None:
            weights = [[1.0 for _ in first.sources] for _ in models]
        if len(weights) != len(models):
            raise ValueError(f"A bag of {len(models)} models needs {len(models)} weight lists, "
                             f"got {len(weights)}.")
        for weight in weights:
            if len(weight) != len(first.sources):
                raise ValueError(f"Each weight list needs one weight per source "
                                 f"({len(first.sources)}), got {len(weight)}.")
        self.weights: tp.List[tp.List[float]] = weights

    @property
    def max_allowed_segment(self) -> float:
        """Longest chunk in seconds every member accepts (inf when none has a limit)."""
        return min((max_allowed_segment(model) for model in self.models), default=math.inf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("A bag of models is applied with `apply_model`.")


def sub_models(model: tp.Any) -> tp.List[tp.Any]:
    """The models of a bag, or `[model]`."""
    return list(model.models) if isinstance(model, BagOfModels) else [model]
