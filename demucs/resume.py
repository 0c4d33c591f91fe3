"""Where the weights of a new solver come from: the XP's own checkpoint (resume), another
XP's (`continue_from=SIG` or a checkpoint path) or a model package
(`continue_pretrained=NAME|PATH.th`).

A checkpoint is a set of named `Part`s that the solver declares once (its weights,
optimizer, EMAs, history, random generators, ...); `restore` loads each one and explains
in one line what does not fit. A part that fails with an error of the loading code rather
than of the file or the config (a `KeyError`, `TypeError` or `RuntimeError`) may be a bug:
the line then advises no deletion, and the error is kept as its cause (shown with
`misc.verbose=true`).
"""
from __future__ import annotations

import logging
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .bag import BagOfModels
from .checkpoints import VERSION, load_checkpoint
from .checks import xp_reference
from .errors import ConfigError, ModelLoadingError, one_line
from .pretrained import get_model as get_pretrained_model
from .weights import package_overrides, state_mismatch

logger = logging.getLogger(__name__)

State = dict[str, tp.Any]


@dataclass
class Part:
    """One named part of the checkpoint: how to save it and how to restore it."""
    save: tp.Callable[[], tp.Any]
    load: tp.Callable[[tp.Any], None]
    required: bool = True  # False for what the original's checkpoints lack


def load_model_state(model: nn.Module, state: State, origin: tp.Any, hint: str,
                     what: str = "checkpoint") -> None:
    """Load `state` (from a `what`) into `model`, or say which keys and shapes do not
    fit, with `hint` on what to do."""
    mismatch = state_mismatch(model.state_dict(), state, what)
    if mismatch:
        raise ModelLoadingError(f"{origin}: weights from a different model ({mismatch}); "
                                f"{hint}.")
    model.load_state_dict(state, strict=False)  # DiffQ's keys may be absent


def restore(parts: tp.Mapping[str, Part], path: Path, hint: str) -> None:
    """Resume every part from the checkpoint at `path`; `hint`: how to start over, for
    a checkpoint that does not fit the XP's config."""
    package = load_checkpoint(path)
    version = package.get("version", VERSION)  # the original's have none
    if version != VERSION:
        raise ModelLoadingError(f"{path}: checkpoint of another version ({version}); {hint}.")
    for name, part in parts.items():
        if name not in package:
            if part.required:
                raise ModelLoadingError(f"{path}: no {name!r} in the checkpoint; {hint}.")
            continue
        try:
            part.load(package[name])
        except ValueError as error:  # a state that does not fit this XP's config
            raise ModelLoadingError(f"{path}: its {name!r} does not fit "
                                    f"({one_line(error)[:200]}); {hint}.") from None
        except (KeyError, RuntimeError, TypeError) as error:  # maybe our bug: keep it
            raise ModelLoadingError(
                f"{path}: loading its {name!r} failed ({type(error).__name__}: "
                f"{one_line(error)[:200]}); the file is kept as it is. Run again with "
                "misc.verbose=true for the traceback, and report it if the checkpoint was "
                "written by this version.") from error


def continue_pretrained(model: nn.Module, args: tp.Any) -> None:
    """Start from the weights of a pretrained model: `args.continue_pretrained`, a name
    or signature in `args.pretrained_repo` (or the remote repository), or the path of a
    `.th` package."""
    name = str(args.continue_pretrained)
    package_model = get_pretrained_model(name, repo=args.pretrained_repo)
    if isinstance(package_model, BagOfModels):
        if len(package_model.models) != 1:
            raise ConfigError(f"continue_pretrained={name} is a bag of "
                              f"{len(package_model.models)} models; name a single model.")
        package_model = package_model.models[0]
    origin = f"continue_pretrained={name}"
    overrides = package_overrides(package_model, args)
    hint = (f"set {' '.join(overrides)} (the package's arguments)" if overrides else
            "choose a model built with the same architecture")
    load_model_state(model, package_model.state_dict(), origin, hint, what="package")
    if overrides:
        logger.warning("%s: the package was built with %s; this XP keeps its config.",
                       origin, " ".join(overrides))
    logger.info("Starting from the pretrained model %s.", name)


def parent_checkpoint(ref: str, find_xp: tp.Optional[tp.Callable[[str], Path]],
                      name: str) -> Path:
    """The checkpoint file `name` of the XP `ref` (found by `find_xp`), or `ref` itself
    when it is a file."""
    if Path(ref).is_file():
        return Path(ref)
    if find_xp is None:
        raise ConfigError(f"continue_from={ref}: no such checkpoint file.")
    path = find_xp(ref) / name
    if not path.is_file():
        trained = sorted(other.parent.name for other in
                         path.parent.parent.glob(f"*/{name}")) or ["none"]
        raise ConfigError(f"continue_from={ref}: XP {ref} has not trained yet (no {path}); "
                          f"train it first with `dora run -f {ref}`. XPs with a "
                          f"checkpoint: {', '.join(trained)}.")
    return path


def continue_from(model: nn.Module, optimizer: torch.optim.Optimizer, args: tp.Any,
                  find_xp: tp.Optional[tp.Callable[[str], Path]], name: str) -> None:
    """Start from the weights of another XP (`args.continue_from`): its best state
    (`continue_best`) or last one, and its optimizer state with `continue_opt`."""
    ref = xp_reference(args.continue_from)
    path = parent_checkpoint(ref, find_xp, name)
    package = load_checkpoint(path)
    key = "best_state" if args.continue_best else "state"
    load_model_state(model, package[key], f"continue_from={ref}",
                     "the two XPs must use the same model architecture")
    if args.continue_opt:
        try:
            optimizer.load_state_dict(package["optimizer"])
        except ValueError as error:
            raise ModelLoadingError(f"continue_from={ref}: its optimizer state does not "
                                    f"fit ({one_line(error)}).") from None
    logger.info("Starting from the %s of %s.", key, path)
