"""Model packages: serialisation, safe loading and state manipulation.

A package is a plain dict saved with `torch.save`:
`{'klass': <model class>, 'args': [...], 'kwargs': {...}, 'state': state_dict,
'training_args': {...}}`. The class is pickled by reference, the constructor arguments
come from `capture_init`, so a package describes itself and can be rebuilt without
the config that trained it.

Loading uses `torch.load(weights_only=True)` with an allow-list made of the model
classes of the registry (`demucs.models`), the DiffQ quantizer classes that quantized
packages reference, and `fractions.Fraction` (v4 packages store the training length of
an HTDemucs, `kwargs['segment']`, as a Fraction). Anything else is refused with a
`ModelLoadingError` unless the caller passes `trusted=True` for a file it trusts.
"""
from __future__ import annotations

import fractions
import hashlib
import inspect
import io
import os
import pickle
import typing as tp
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadingError
from .models import model_classes
from .utils import atomic_path
from .utils import capture_init as capture_init  # re-exported: its home in the original

PathLike = tp.Union[str, os.PathLike]
State = tp.Dict[str, tp.Any]
PACKAGE_KEYS = ("klass", "args", "kwargs", "state")


def quantizer_classes() -> tp.List[type]:
    """DiffQ quantizer classes that quantized packages reference in `state['meta']`."""
    try:
        import diffq
    except ImportError:  # diffq is optional for plain packages
        return []
    return [diffq.DiffQuantizer, diffq.UniformQuantizer, diffq.LSQ]


def safe_globals() -> tp.List[tp.Any]:
    """Everything a safe load lets the unpickler resolve besides tensors and containers."""
    return model_classes() + quantizer_classes() + [fractions.Fraction]


def _describe_unsafe(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy or corrupt archive: no list to give
        return "objects outside the allow-list"
    allowed = {f"{k.__module__}.{k.__qualname__}" for k in safe_globals()}
    names = [name for name in names if name not in allowed]
    return ", ".join(names) if names else "objects outside the allow-list"


def _torch_load(path: Path, trusted: bool) -> tp.Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)


def torch_file_damage(path: PathLike, error: tp.Optional[BaseException] = None
                      ) -> tp.Optional[str]:
    """Why the file at `path` is damaged, None when it looks whole; `error` is what
    `torch.load` raised on it, if it did (with a whole file, that error comes from
    elsewhere: a bug, memory). `torch.load` itself reads a zip whose tensor data was
    overwritten without noticing: only the checksums tell.

    `torch.save` writes a zip archive whose entries carry CRC checksums (torch before 1.6
    wrote a bare pickle stream, which starts with the protocol byte 0x80).
    """
    with open(path, "rb") as file:
        head = file.read(4)
    if not head:
        return "the file is empty"
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                bad = archive.testzip()
        except (zipfile.BadZipFile, EOFError, OSError):
            return "the file is truncated (its zip archive has no end)"
        if bad is not None:
            return f"the file is damaged (its part {bad} fails its checksum)"
        if not any(name.endswith("data.pkl") for name in names):
            return "a zip archive, but not one written by torch.save"
        return None
    if head[:1] != b"\x80":
        return "not a file written by torch.save"
    if isinstance(error, (EOFError, pickle.UnpicklingError)):
        return "the file is truncated or damaged"
    return None


def _refused(error: BaseException) -> bool:
    # torch's safe loader refuses a global outside the allow-list with this error.
    return isinstance(error, pickle.UnpicklingError) and (
        "weights_only" in str(error) or "Unsupported global" in str(error))


def load_package(path: PathLike, trusted: bool = False) -> State:
    """Read a model package from `path` without running code from the file.

    Raises `ModelLoadingError` with a one-line message naming the file when it is
    missing, damaged, not a Demucs package, or references code outside the allow-list.
    Other errors (out of memory, a bug) go through as they are.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadingError(f"{path}: no such model file; check the path or the repo.")
    try:
        package = _torch_load(path, trusted)
    except MemoryError:
        raise
    except Exception as error:
        if _refused(error):
            raise ModelLoadingError(
                f"{path}: refused to load, it references {_describe_unsafe(path)}; "
                "only Demucs model packages load safely (pass trusted=True only for a file "
                "you trust).") from None
        damage = torch_file_damage(path, error)
        if damage is None:
            raise
        raise ModelLoadingError(f"{path}: unreadable model package, {damage}; download or "
                                "export it again.") from None
    check_package(package, path)
    return package


def check_package(package: tp.Any, origin: tp.Any = "package") -> None:
    """Make sure `package` has the structure of a Demucs package."""
    if not isinstance(package, dict) or any(key not in package for key in PACKAGE_KEYS):
        raise ModelLoadingError(
            f"{origin}: not a Demucs model package (expected a dict with the keys "
            f"{', '.join(PACKAGE_KEYS)}); export models with `python -m tools.export`.")
    klass = package["klass"]
    if not (isinstance(klass, type) and issubclass(klass, nn.Module)):
        raise ModelLoadingError(f"{origin}: package 'klass' is {klass!r}, not a model class.")


def _filter_kwargs(klass: type, kwargs: tp.Dict[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    """Drop, with a warning, the kwargs that `klass` does not accept."""
    params = inspect.signature(klass).parameters
    kept = {}
    for key, value in kwargs.items():
        if key in params:
            kept[key] = value
        else:
            warnings.warn(f"Dropping inexistent parameter {key} for {klass.__name__}.",
                          stacklevel=3)
    return kept


def load_model(path_or_package: tp.Union[PathLike, State], strict: bool = False,
               trusted: bool = False) -> nn.Module:
    """Rebuild a model from a package (a dict) or a package file.

    With `strict=False`, constructor kwargs the class does not know are dropped with a
    warning, so that packages from newer or older versions still load.
    """
    if isinstance(path_or_package, dict):
        package = path_or_package
        origin: tp.Any = "package"
        check_package(package)
    elif isinstance(path_or_package, (str, os.PathLike)):
        origin = path_or_package
        package = load_package(path_or_package, trusted=trusted)
    else:
        raise ModelLoadingError(f"Invalid type {type(path_or_package)} for a model package.")
    klass = package["klass"]
    args = list(package["args"])
    kwargs = dict(package["kwargs"])
    if not strict:
        kwargs = _filter_kwargs(klass, kwargs)
    model = klass(*args, **kwargs)
    try:
        set_state(model, package["state"])
    except (RuntimeError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ModelLoadingError(f"{origin}: weights do not fit the model ({first_line}).") \
            from None
    return model


def get_state(model: nn.Module, quantizer: tp.Any = None, half: bool = False) -> State:
    """The state to store: plain (optionally float16) tensors, or DiffQ-quantized."""
    if quantizer is None:
        dtype = torch.half if half else None
        # Copies, never views of the live parameters: a package made inside `swap_state`
        # must keep the swapped-in weights after the swap ends.
        state = {k: p.data.to(device="cpu", dtype=dtype if p.is_floating_point() else None,
                              copy=True)
                 for k, p in model.state_dict().items()}
    else:
        state = quantizer.get_quantized_state()
        state["__quantized"] = True
    return state


def set_state(model: nn.Module, state: State, quantizer: tp.Any = None) -> State:
    """Load `state` (plain, half or quantized) into `model`."""
    if state.get("__quantized"):
        if quantizer is not None:
            quantizer.restore_quantized_state(model, state["quantized"])
        else:
            _restore_quantized(model, state)
    else:
        model.load_state_dict(state)
    return state


def _restore_quantized(model: nn.Module, state: State) -> None:
    try:
        from diffq import restore_quantized_state
    except ImportError:
        raise ModelLoadingError("This package is DiffQ-quantized: install diffq "
                                "(`pip install diffq`) to load it.") from None
    meta = state.get("meta", {})
    if meta.get("klass") not in quantizer_classes():
        raise ModelLoadingError(f"Unknown quantizer {meta.get('klass')!r} in a quantized state.")
    restore_quantized_state(model, state)


def serialize_model(model: tp.Any, training_args: tp.Any, quantizer: tp.Any = None,
                    half: bool = True) -> State:
    """Build the package of `model`; `training_args` is a dict or an OmegaConf config.

    A model that records its training length (HTDemucs with `use_train_segment`) is
    stored with that length as `kwargs['segment']` (a `Fraction` after training), as the
    v4 packages are.
    """
    args, kwargs = model._init_args_kwargs
    if getattr(model, "use_train_segment", False) and "segment" in kwargs:
        kwargs = dict(kwargs, segment=model.segment)
    if not isinstance(training_args, dict):
        from omegaconf import OmegaConf
        training_args = OmegaConf.to_container(training_args, resolve=True)
    return {
        "klass": model.__class__,
        "args": list(args),
        "kwargs": dict(kwargs),
        "state": get_state(model, quantizer, half),
        "training_args": training_args,
    }


def atomic_write_bytes(data: bytes, path: PathLike) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_atomic(content: tp.Any, path: PathLike) -> None:
    """`torch.save` to `path` atomically: never a half-written checkpoint or package."""
    buf = io.BytesIO()
    torch.save(content, buf)
    atomic_write_bytes(buf.getvalue(), path)


def save_with_checksum(content: tp.Any, path: PathLike) -> Path:
    """Save `content` as `STEM-CHECKSUM.SUFFIX`, CHECKSUM = first 8 hex digits of sha256."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(content, buf)
    sig = hashlib.sha256(buf.getvalue()).hexdigest()[:8]
    out = path.parent / f"{path.stem}-{sig}{path.suffix}"
    atomic_write_bytes(buf.getvalue(), out)
    return out


def copy_state(state: State) -> State:
    """A detached CPU copy of a state dict."""
    return {k: v.cpu().clone() for k, v in state.items()}


@contextmanager
def swap_state(model: nn.Module, state: State) -> tp.Iterator[None]:
    """Temporarily load `state` into `model`, restoring its own state afterwards."""
    old_state = copy_state(model.state_dict())
    model.load_state_dict(state, strict=False)
    try:
        yield
    finally:
        model.load_state_dict(old_state)
