"""Starting a model from other weights: which keys and shapes differ, and which config
overrides would build the model of a package (`continue_pretrained`, `continue_from`,
resume). Used by the solver to explain a mismatch in one line.
"""
from __future__ import annotations

import inspect
import typing as tp

from omegaconf import OmegaConf
from torch import nn

from .models import MODELS

State = dict[str, tp.Any]
QUANTIZER_SUFFIX = "_diffq"  # parameters DiffQ adds to a model

MISMATCHES_SHOWN = 3
DSET_KWARGS = {"sources": "dset.sources", "audio_channels": "dset.channels",
               "samplerate": "dset.samplerate", "use_train_segment": "use_train_segment"}


def _shape(value: tp.Any) -> str:
    return "missing" if value is None else str(tuple(getattr(value, "shape", ())))


def state_mismatch(model: State, state: State, what: str) -> str:
    """The first keys of `state` (from a `what`: package, checkpoint) whose presence or
    shape differ from the `model` state, `key: what (384,), model (512,)`; '' if none.
    DiffQ's own parameters may be absent from `state`."""
    keys = [*model, *(key for key in state if key not in model)]
    wrong = [key for key in keys
             if _shape(model.get(key)) != _shape(state.get(key))
             and not (key not in state and key.endswith(QUANTIZER_SUFFIX))]
    shown = [f"{key}: {what} {_shape(state.get(key))}, model {_shape(model.get(key))}"
             for key in wrong[:MISMATCHES_SHOWN]]
    hidden = len(wrong) - len(shown)
    more = f"; {hidden} more key{'s' if hidden > 1 else ''}" if hidden else ""
    return "; ".join(shown) + more


def hydra_value(value: tp.Any) -> str:
    """`value` written as a Hydra override value (`true`, `null`, `[drums,bass]`)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    return str(value)


def _comparable(value: tp.Any) -> tp.Any:
    return [_comparable(item) for item in value] if isinstance(value, (list, tuple)) else value


def package_overrides(package_model: nn.Module, args: tp.Any) -> list[str]:
    """The overrides (`model=...`, `dset.sources=[...]`, `htdemucs.KEY=VALUE`) that make
    the config `args` build the model of a package: its constructor kwargs that differ
    from the config's (the length `segment` aside, a training setting)."""
    names = [name for name, klass in MODELS.items() if klass is type(package_model)]
    if not names or not hasattr(package_model, "_init_args_kwargs"):
        return []
    name = names[0]
    init_args: tuple[tp.Any, State] = tp.cast(tp.Any, package_model)._init_args_kwargs
    theirs = init_args[1]
    defaults = {key: param.default for key, param
                in inspect.signature(type(package_model)).parameters.items()
                if param.default is not inspect.Parameter.empty}
    ours = {"sources": list(args.dset.sources), "audio_channels": args.dset.channels,
            "samplerate": args.dset.samplerate, "use_train_segment": args.use_train_segment,
            **tp.cast(State, OmegaConf.to_container(args[name], resolve=True))}
    overrides = [] if args.model == name else [f"model={name}"]
    for key, value in ours.items():
        package_value = theirs.get(key, defaults.get(key, value))
        if key != "segment" and _comparable(package_value) != _comparable(value):
            overrides.append(f"{DSET_KWARGS.get(key, f'{name}.{key}')}="
                             f"{hydra_value(package_value)}")
            if key == "sources" and len(args.weights) != len(package_value):
                overrides.append(f"weights={hydra_value([1] * len(package_value))}")
    return overrides
