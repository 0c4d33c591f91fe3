"""CUDA graphs of the training step (`optim.cuda_graph=true`).

A training step launches thousands of small kernels (an LSTM's backward launches several
per time step), so that at small batches an eager step is bound by the launches, not by
the GPU. `GraphedStep` captures the model's forward and backward once and replays them
for every batch of the same shape. `check_cuda_graph` refuses, at start-up, what the
graphs cannot hold.
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn

from . import distrib
from .errors import ConfigError, TrainingError, one_line


def check_cuda_graph(args: tp.Any, model: nn.Module) -> None:
    """Fail at start-up where the training step cannot be replayed as CUDA graphs: the
    graphs are captured once, so what the forward decides on the host at each call (the
    random draws of an HTDemucs' positional embedding, DiffQ's quantization) would stay
    as drawn at capture, and DDP's gradient exchange is not part of them."""
    if distrib.world_size() > 1:
        raise ConfigError("optim.cuda_graph=true trains on one GPU; drop -d, or set "
                          "optim.cuda_graph=false.")
    if args.quant.diffq or args.quant.qat:
        raise ConfigError("optim.cuda_graph=true does not go with quantization (quant.diffq, "
                          "quant.qat); set optim.cuda_graph=false.")
    transformer: tp.Any = getattr(model, "crosstransformer", None)
    if transformer is not None and (
            transformer.sin_random_shift
            or (transformer.emb == "cape" and transformer.cape_augment)):
        raise ConfigError("optim.cuda_graph=true would freeze the random positional shifts "
                          "of the cross-transformer (htdemucs.t_sin_random_shift, "
                          "t_cape_augment); set them off, or optim.cuda_graph=false.")


class GraphedStep:
    """A model's training forward and backward captured as CUDA graphs for the shape of
    `sample` (B, C, T) and replayed for every batch of that shape; other shapes (a last,
    smaller batch) and eval mode run the model eagerly. What a training step launches is
    thousands of small kernels (an LSTM's backward launches several per time step), so
    that an eager step at small batches is bound by the launches, not by the GPU.

    The parameters' gradients come out of the backward graph and are added to `.grad`,
    which is allocated here and from then on zeroed in place (gradient accumulation,
    clipping, the optimizer, EMAs and the loss stay eager). A parameter the loss does not
    reach thus has a zero gradient rather than none: Adam leaves it as it is, AdamW's
    weight decay shrinks it. Captured inside the solver's autocast, the graphs replay its
    casts.
    """

    def __init__(self, model: nn.Module, sample: torch.Tensor):
        self.shape = sample.shape
        self.model = model
        self.eager = model.forward
        torch.cuda.synchronize()
        try:  # replaces `model.forward` by the replay (eager again in eval mode)
            torch.cuda.make_graphed_callables(model, (sample.detach().clone(),),
                                              allow_unused_input=True)
        except (RuntimeError, AssertionError) as error:
            raise TrainingError(
                f"optim.cuda_graph: the training step of {type(model).__name__} could not "
                f"be captured as CUDA graphs ({one_line(error)}); set "
                "optim.cuda_graph=false.") from None
        for param in model.parameters():  # see `Solver._zero_grad`
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)

    def __call__(self, mix: torch.Tensor) -> torch.Tensor:
        if mix.shape != self.shape:
            return self.eager(mix)
        return self.model(mix)
