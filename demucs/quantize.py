"""Quantizer setup for training (`quant:` section of the config).

- `quant.diffq=W`: DiffQ, a differentiable number of bits per group of `group_size`
  weights; its bit parameters join the optimizer and `W * model_size()` (MB) is added to
  the training loss.
- `quant.qat=BITS`: quantization aware training with a uniform quantizer of BITS bits.

Only the weights bigger than `quant.min_size` MB are quantized.
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn

from .errors import ConfigError


def get_quantizer(model: nn.Module, quant: tp.Any,
                  optimizer: tp.Optional[torch.optim.Optimizer] = None) -> tp.Any:
    """The quantizer of the `quant` config for `model`, or None when not quantizing.

    Call it before wrapping the model for DDP: DiffQ adds parameters to the model.
    """
    if quant.diffq and quant.qat:
        raise ConfigError(f"quant.diffq={quant.diffq} and quant.qat={quant.qat} are both set; "
                          "choose one quantizer.")
    if not (quant.diffq or quant.qat):
        return None
    try:
        from diffq import DiffQuantizer, UniformQuantizer
    except ImportError:
        raise ConfigError("quant.diffq and quant.qat need the diffq package "
                          "(`pip install diffq`).") from None
    if quant.diffq:
        quantizer = DiffQuantizer(model, min_size=quant.min_size, group_size=quant.group_size)
        if optimizer is not None:
            quantizer.setup_optimizer(optimizer)
        else:
            quantizer.no_optimizer()
        return quantizer
    return UniformQuantizer(model, bits=quant.qat, min_size=quant.min_size, qat=True)


def model_size(model: nn.Module, quantizer: tp.Any = None) -> float:
    """Size of the model in MB: quantized if there is a quantizer, else as float32."""
    if quantizer is not None:
        return float(quantizer.true_model_size())
    return sum(param.numel() for param in model.parameters()) * 4 / 2 ** 20
