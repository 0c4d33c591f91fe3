"""XP checkpoints (`checkpoint.th`): safe loading, random generator states.

A checkpoint is a dict saved with `torch.save`. Ours and the original's share their keys:
`state` (the model's `state_dict`), `best_state`, `optimizer`, `history`, `args` (the
config) and one `ema_{kind}_{k}` entry per EMA (`{'state': ..., 'count': ...}`). Ours adds
`version`, `rng` (the generators of torch, numpy and Python, for an exact resume) and
`penalty_rng`, and stores `args` as plain containers where the original pickled an
OmegaConf `DictConfig`.

Loading never runs code from the file: the unpickler resolves only the globals of an
allow-list (tensors, containers, the OmegaConf classes of a pickled config, numpy scalars,
our model classes); any other global is refused with a `ModelLoadingError` naming it.
"""
from __future__ import annotations

import _compat_pickle
import functools
import importlib
import pickle
import random
import types
import typing as tp
from pathlib import Path

import numpy as np
import torch

from .errors import ModelLoadingError, one_line
from .states import safe_globals, save_atomic, serialize_model, swap_state, torch_file_damage

State = dict[str, tp.Any]
VERSION = 2

# Globals a checkpoint may reference, as "module:name" (looked up on first use).
ALLOWED_NAMES = (
    "builtins:dict", "builtins:list", "builtins:tuple", "builtins:set", "builtins:frozenset",
    "builtins:int", "builtins:float", "builtins:bool", "builtins:str", "builtins:bytes",
    "builtins:bytearray", "builtins:complex", "builtins:slice",
    "collections:OrderedDict", "collections:defaultdict", "_codecs:encode", "typing:Any",
    "torch._utils:_rebuild_tensor_v2", "torch._utils:_rebuild_parameter",
    "torch._utils:_rebuild_parameter_with_state", "torch:Size", "torch:device",
    "numpy:dtype", "numpy:ndarray", "numpy._core.multiarray:scalar",
    "numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:scalar",
    "numpy.core.multiarray:_reconstruct",
    "omegaconf.dictconfig:DictConfig", "omegaconf.listconfig:ListConfig",
    "omegaconf.base:ContainerMetadata", "omegaconf.base:Metadata",
    "omegaconf.nodes:AnyNode", "omegaconf.nodes:StringNode", "omegaconf.nodes:IntegerNode",
    "omegaconf.nodes:FloatNode", "omegaconf.nodes:BooleanNode", "omegaconf.nodes:BytesNode",
    "omegaconf.nodes:PathNode",
)


def _lookup(module: str, name: str) -> tp.Any:
    value: tp.Any = importlib.import_module(module)
    for part in name.split("."):
        value = getattr(value, part)
    return value


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], tp.Any]:
    allowed: dict[tuple[str, str], tp.Any] = {}
    for entry in ALLOWED_NAMES:
        module, name = entry.split(":")
        try:
            allowed[(module, name)] = _lookup(module, name)
        except (ImportError, AttributeError):  # e.g. numpy.core on numpy 2, or the reverse
            continue
    for value in safe_globals():  # model and quantizer classes
        allowed[(value.__module__, value.__qualname__)] = value
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """A checkpoint references a global outside the allow-list."""


class _Unpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals (torch dtypes included)."""

    def find_class(self, module: str, name: str) -> tp.Any:
        if module in _compat_pickle.IMPORT_MAPPING:  # python 2 names: `__builtin__.dict`
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _allowed_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("numpy") and name.endswith("DType"):  # numpy.dtypes.Float32DType
            return _lookup(module, name)
        raise RefusedGlobal(f"refusing to load the global {module}.{name}")


@functools.cache
def _restricted_pickle() -> types.ModuleType:
    module = types.ModuleType("demucs_restricted_pickle")
    module.Unpickler = _Unpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kwargs: _Unpickler(file, **kwargs).load()  # type: ignore
    return module


def load_checkpoint(path: Path | str) -> State:
    """Read an XP checkpoint, ours or the original's, in our layout (see the module doc).

    Raises `ModelLoadingError` for a damaged file (the zip's checksums are verified) or a
    global outside the allow-list; other errors (out of memory, a bug) go through as they are.
    """
    try:
        package = torch.load(path, map_location="cpu", weights_only=False,
                             pickle_module=_restricted_pickle())
    except RefusedGlobal as error:
        raise ModelLoadingError(f"{path}: {one_line(error)}; only checkpoints of tensors, "
                                "containers and configs are loaded.") from None
    except MemoryError:
        raise
    except Exception as error:
        damage = torch_file_damage(path, error)
        if damage is None:
            raise
        raise ModelLoadingError(f"{path}: unreadable checkpoint, {damage}.") from None
    damage = torch_file_damage(path)  # resuming from damaged weights would go unnoticed
    if damage is not None:
        raise ModelLoadingError(f"{path}: unreadable checkpoint, {damage}.")
    if not isinstance(package, dict) or "state" not in package:
        raise ModelLoadingError(f"{path}: not an XP checkpoint (no 'state' entry).")
    return _plain(package)


def write_epoch(folder: Path, epoch: int, checkpoint: State,
                write_best: tp.Callable[[Path], None], save_every: tp.Optional[int]) -> None:
    """The files of the finished `epoch` (1-based) in the XP `folder`, each written
    atomically: `checkpoint_EPOCH.th` every `save_every` epochs, `best.th` (through
    `write_best`), then `checkpoint.th`, last, so that the resume point moves once the
    epoch's other files are written."""
    if save_every and epoch % save_every == 0:
        save_atomic(checkpoint, folder / f"checkpoint_{epoch}.th")
    write_best(folder / "best.th")
    save_atomic(checkpoint, folder / "checkpoint.th")


def save_package(model: torch.nn.Module, state: State, training_args: tp.Any,
                 quantizer: tp.Any, path: Path) -> None:
    """Write the model package (`demucs.states`) of `model` with the weights `state` to
    `path`, atomically (`best.th`)."""
    with swap_state(model, state):
        # Saved inside the swap: on CPU the package's tensors are the parameters.
        save_atomic(serialize_model(model, training_args, quantizer, half=False), path)


def _plain(package: State) -> State:
    """The original pickled its config as a `DictConfig` and numpy floats in its test
    metrics: make them plain containers and floats (packages must load safely)."""
    from omegaconf import DictConfig, OmegaConf  # the separation path never gets here

    if isinstance(package.get("args"), DictConfig):
        package["args"] = OmegaConf.to_container(package["args"], resolve=False)
    if "history" in package:
        package["history"] = _plain_numbers(package["history"])
    return package


def _plain_numbers(value: tp.Any) -> tp.Any:
    if isinstance(value, dict):
        return {key: _plain_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_numbers(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value


def ema_key(kind: str, index: int) -> str:
    """The checkpoint entry of the `index`-th EMA of `kind` ('batch' or 'epoch')."""
    return f"ema_{kind}_{index}"


# ---------------------------------------------------------------------------------------
# Random generators


def get_rng_state() -> State:
    """The state of the generators of torch (CPU, and the current GPU's), numpy and Python.

    Of the GPUs, only the one this worker trains on: with several workers, only the
    first one's state is saved, and every worker's GPU generator is where the first
    one's is (all are seeded alike and draw alike). A state per visible GPU would also
    fail to load on a machine with fewer GPUs.
    """
    name, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    state: State = {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": (name, torch.from_numpy(np.asarray(keys).astype(np.int64)), position,
                              has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: State) -> None:
    """Restore what `get_rng_state` returned (the GPU's state into the current GPU)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # earlier checkpoints: a state per visible GPU,
        cuda = cuda[0] if cuda else None  # and the first worker drew on the first GPU
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)

