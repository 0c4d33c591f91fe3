"""Exponential moving averages (EMA) of the weights of a model.

The solver keeps EMAs as extra candidates for the best state: `ema.batch` decays are
updated after every training batch, `ema.epoch` decays after every epoch.
"""
from __future__ import annotations

import typing as tp
from contextlib import contextmanager

import torch
from torch import nn

from .states import copy_state, swap_state


class ModelEMA:
    """Moving average of the floating point tensors of `model.state_dict()`.

    With `unbias`, the first updates are not biased towards the initial weights: after
    updates with the weights w_1 ... w_n, the average is
    `sum_i decay^(n - i) w_i / sum_i decay^(n - i)` (the weight of each update is
    `1 / count`, with `count = count * decay + 1`). Without it, each update is
    `avg = decay * avg + (1 - decay) * w`, starting from the weights at construction.

    Args:
        model: the model whose weights are averaged.
        decay: weight of the past, in [0, 1).
        unbias: see above.
        device: where the average is kept (default: CPU, to spare accelerator memory).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, unbias: bool = True,
                 device: tp.Any = "cpu"):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
        self.model = model
        self.decay = decay
        self.unbias = unbias
        self.device = device
        self.count = 0.
        self.state: dict[str, torch.Tensor] = {
            key: value.detach().to(self._device(value), copy=True)
            for key, value in model.state_dict().items() if value.is_floating_point()}

    def _device(self, value: torch.Tensor) -> tp.Any:
        return self.device if self.device is not None else value.device

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights of the model into the average."""
        if self.unbias:
            self.count = self.count * self.decay + 1
            weight = 1 / self.count
        else:
            weight = 1 - self.decay
        # All tensors at once (multi-tensor kernels on a GPU: a few launches rather than
        # two per tensor, which a batch EMA pays at every step); on the CPU, the same
        # operations tensor by tensor.
        current = self.model.state_dict()
        averages = list(self.state.values())
        values = [current[key].detach().to(average.device)
                  for key, average in self.state.items()]
        torch._foreach_mul_(averages, 1 - weight)
        torch._foreach_add_(averages, values, alpha=weight)

    @contextmanager
    def swap(self) -> tp.Iterator[None]:
        """Temporarily load the averaged weights into the model."""
        with swap_state(self.model, self.state):
            yield

    def state_dict(self) -> dict[str, tp.Any]:
        """A copy of the average (on the CPU) and its count, for a checkpoint."""
        return {"state": copy_state(self.state), "count": self.count}

    def load_state_dict(self, state: tp.Mapping[str, tp.Any]) -> None:
        self.count = float(state["count"])
        for key, value in state["state"].items():
            if key not in self.state:
                raise KeyError(f"EMA state has an unexpected key {key!r}.")
            self.state[key].copy_(value)
