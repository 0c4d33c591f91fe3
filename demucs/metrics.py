"""Training metrics: their means over the batches of a stage (over every worker), how
they are compared and how the log shows them."""
from __future__ import annotations

import math
import typing as tp

import torch

from . import distrib
from .curves import is_maximized

Metrics = dict[str, float]
# Divergence stop (l1 loss): (first epoch index checked, largest valid reco allowed).
DIVERGENCE_LIMITS = ((100, 0.25), (180, 0.18))


class Averager:
    """Mean of metrics over the batches of a stage (each batch counts once; a metric only
    some batches have, like `grad` with gradient accumulation, over those batches).

    With `finite_only` (fp16 training, whose scaler skips the steps that overflow), a NaN
    or infinite value is left out of its metric's mean; a metric no batch had finite is
    NaN."""

    def __init__(self, finite_only: bool = False) -> None:
        self.finite_only = finite_only
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def update(self, metrics: tp.Mapping[str, float]) -> None:
        for key, value in metrics.items():
            kept = not self.finite_only or math.isfinite(value)
            self.sums[key] = self.sums.get(key, 0.) + (float(value) if kept else 0.)
            self.counts[key] = self.counts.get(key, 0) + kept

    def mean(self) -> Metrics:
        return {key: self.sums[key] / self.counts[key] if self.counts[key] else math.nan
                for key in sorted(self.sums)}

    def reduce(self) -> Metrics:
        """The mean over every distributed worker, each metric weighted by how many of
        their batches it counts."""
        return dict(sorted(distrib.average(self.mean(), self.counts).items()))


def scalar(value: tp.Any) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def is_better(value: float, reference: float, metric: str) -> bool:
    """Whether `value` is strictly better than `reference` for `metric`."""
    return value > reference if is_maximized(metric) else value < reference


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `12.3s`."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


def format_metrics(metrics: tp.Mapping[str, tp.Any]) -> str:
    return " | ".join(f"{key.capitalize()}={value:.4f}" if isinstance(value, float)
                      else f"{key.capitalize()}={value}" for key, value in metrics.items()
                      if not isinstance(value, dict))


def diverged(loss: str, epoch: int, valid: tp.Mapping[str, tp.Any]) -> bool:
    """Whether a training with the `loss` diverged at `epoch` (0-based), from its valid
    metrics: with the l1 loss, the live model's valid reco above a limit."""
    if loss != "l1" or "main" not in valid:
        return False
    reco = valid["main"]["reco"]
    return any(epoch >= start and reco > limit for start, limit in DIVERGENCE_LIMITS)


def summary_lines(epoch: int, metrics: tp.Mapping[str, tp.Mapping[str, tp.Any]],
                  replay: bool = False) -> list[str]:
    """The log lines of the metrics of `epoch` (0-based), one per stage; `replay`: of an
    epoch trained before a resume."""
    prefix = "Replay | " if replay else ""
    return [f"{prefix}{stage.capitalize()} Summary | Epoch {epoch + 1} | "
            f"{format_metrics(metrics[stage])}"
            for stage in ("train", "valid", "test") if stage in metrics]


def epoch_line(epoch: int, per_epoch: float, left: int, memory: str) -> str:
    """The line ending `epoch` (0-based): its time, peak `memory` and the XP's ETA."""
    return (f"Epoch {epoch + 1} done | {format_duration(per_epoch)} per epoch | peak memory "
            f"{memory} | XP ETA {format_duration(per_epoch * left)} ({left} epochs left)")
