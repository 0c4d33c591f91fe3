"""The model registry: the one list of model classes, by the name the config gives them.

`cfg.model` picks a class here (`train.get_model` builds it from the config section of
the same name), and the same classes form the allow-list of safe package loading
(`states.safe_globals`). A new architecture is one line in `MODELS`.

This module is a leaf: it imports the model modules (pure torch) and `errors` only, so
that `states`, `train` and the separation path can all read it without import cycles.
"""
from __future__ import annotations

import inspect
import typing as tp

from torch import nn

from .bs_roformer import BSRoformer
from .demucs import Demucs
from .errors import ConfigError
from .hdemucs import HDemucs
from .htdemucs import HTDemucs
from .mel_roformer import MelBandRoformer
from .scnet import SCNet
from .utils import TrainingChunk

# config name (`model=NAME`, and the config section `NAME:`) -> model class
MODELS: tp.Mapping[str, type[nn.Module]] = {
    "demucs": Demucs,
    "hdemucs": HDemucs,
    "htdemucs": HTDemucs,
    # the names are MSST's `--model_type`
    "bs_roformer": BSRoformer,
    "mel_band_roformer": MelBandRoformer,
    "scnet": SCNet,
}


def model_names() -> list[str]:
    """The names `cfg.model` accepts, in registry order."""
    return list(MODELS)


def model_classes() -> list[type[nn.Module]]:
    """Every registered model class (the classes a package may name in `klass`)."""
    return list(MODELS.values())


def model_class(name: str) -> type[nn.Module]:
    """The class registered as `name`; `ConfigError` listing the valid names otherwise."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value from a config
        raise ConfigError(f"model={name!r} is not valid; choose one of: "
                          f"{', '.join(model_names())}.") from None


def model_takes(name: str, argument: str) -> bool:
    """Whether the constructor of the model registered as `name` takes `argument`."""
    return argument in inspect.signature(model_class(name)).parameters


def model_on_chunks(name: str) -> bool:
    """Whether the model registered as `name` is built for one chunk length, its training
    example: its `segment` then defaults to `dset.segment` (not 4 times it) and it never
    separates longer chunks (`max_allowed_segment`), so validation cuts tracks."""
    return issubclass(model_class(name), TrainingChunk)
