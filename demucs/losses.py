"""The reconstruction losses of training, by their `optim.loss` name.

A loss takes the estimated and true sources, both (B, S, C, T), and gives per source
(S,) the loss that is optimised and the `reco` that is logged. A new loss is one
function and one entry of `LOSSES` (which `checks` reads to accept its name).
"""
from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F

Loss = tp.Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def l1(estimate: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean absolute error, both optimised and logged."""
    loss = F.l1_loss(estimate, sources, reduction="none").mean(dim=(2, 3)).mean(0)
    return loss, loss


def mse(estimate: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over the batch of each example's mean squared error; `reco` is the mean
    over the batch of its root."""
    per_example = F.mse_loss(estimate, sources, reduction="none").mean(dim=(2, 3))
    return per_example.mean(0), per_example.sqrt().mean(0)


LOSSES: tp.Mapping[str, Loss] = {"l1": l1, "mse": mse}


def reco_losses(name: str, estimate: torch.Tensor,
                sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss `name` of `estimate` against `sources` (B, S, C, T), per source (S,)."""
    if estimate.shape != sources.shape:
        raise RuntimeError(f"The model returned {tuple(estimate.shape)} for sources of "
                           f"shape (B, S, C, T)={tuple(sources.shape)}.")
    return LOSSES[name](estimate, sources)
