"""Models of ZFTurbo's Music-Source-Separation-Training (MSST), in and out.

An MSST model is a `config.yaml` (sections `audio:`, `model:`, `training:`,
`inference:`) and a checkpoint holding the model's state_dict (bare, under
`state_dict`/`model_state_dict`/`model`, or with DDP's `module.` prefixes). Its
`--model_type` names our registered model (`bs_roformer`, `mel_band_roformer`, `scnet`),
whose constructor takes the `model:` options under MSST's names, besides:

- `sources`: `training.target_instrument` alone if set, else `training.instruments`
  (for SCNet also `model.sources`, which must agree);
- `audio_channels`: `audio.num_channels` (MSST's `model.stereo`, SCNet's
  `model.audio_channels` must agree); `samplerate`: `audio.sample_rate`;
- `segment`: `audio.chunk_size` samples, as a `Fraction` of seconds.

MSST's configs write tuples as `!!python/tuple`: `read_config` maps that tag (only that
one) to a list, with a safe loader. `msst_config` and `msst_state` go the other way
(`tools.export --msst`).
"""
from __future__ import annotations

import inspect
import typing as tp
from fractions import Fraction
from pathlib import Path

import torch
import yaml
from torch import nn

from .errors import DemucsError
from .models import MODELS, model_names
from .states import (PathLike, State, atomic_write_bytes, save_atomic,
                     torch_file_damage)

ARCHS = ("bs_roformer", "mel_band_roformer", "scnet")
# Our constructor arguments that MSST's `model:` does not hold (they come from the other
# sections), and MSST's options that ours derive from them.
OURS = ("sources", "audio_channels", "samplerate", "segment")
DERIVED = {"bs_roformer": ("stereo", "num_stems"),
           "mel_band_roformer": ("stereo", "num_stems", "sample_rate"),
           "scnet": ("sources", "audio_channels")}
# The options an exported config always writes; the others only where they differ from
# MSST's constructor defaults (`MSST_DEFAULTS`), so that older MSST versions, which lack
# recent options, still load the file.
ALWAYS = {"bs_roformer": ("dim", "depth", "time_transformer_depth", "freq_transformer_depth",
                          "dim_head", "heads", "mask_estimator_depth", "flash_attn"),
          "mel_band_roformer": ("dim", "depth", "num_bands", "time_transformer_depth",
                                "freq_transformer_depth", "dim_head", "heads",
                                "mask_estimator_depth", "flash_attn")}
# MSST's own defaults where ours are not them (window functions: MSST takes callables).
MSST_DEFAULTS: tp.Dict[str, tp.Any] = {"stft_window_fn": None,
                                       "multi_stft_window_fn": "hann_window"}
CHECKPOINT_WRAPPERS = ("state_dict", "model_state_dict", "model")


class MsstError(DemucsError):
    """An MSST config or checkpoint that does not describe one of our models."""


class MsstLoader(yaml.SafeLoader):
    """A safe YAML loader that also reads `!!python/tuple` (as a list)."""


MsstLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple",
    lambda loader, node: loader.construct_sequence(tp.cast(yaml.SequenceNode, node)))


def read_config(path: PathLike) -> tp.Dict[str, tp.Any]:
    """An MSST `config.yaml` as a dict (tuples as lists); one-line errors otherwise."""
    try:
        with open(path) as file:
            config = yaml.load(file, Loader=MsstLoader)  # noqa: S506 (a safe loader)
    except OSError as error:
        raise MsstError(f"{path}: cannot read the config ({error.strerror}).") from None
    except yaml.YAMLError as error:
        raise MsstError(f"{path}: not a readable YAML config "
                        f"({str(error).splitlines()[0]}).") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise MsstError(f"{path}: not an MSST config (no `model:` section).")
    return config


def check_arch(arch: str) -> tp.Type[nn.Module]:
    if arch not in ARCHS:
        raise MsstError(f"--model-type {arch!r} is not supported; choose one of "
                        f"{', '.join(ARCHS)} (other models: {', '.join(model_names())}).")
    return MODELS[arch]


def _sources(arch: str, config: tp.Dict[str, tp.Any], origin: PathLike) -> tp.List[str]:
    training = config.get("training") or {}
    target = training.get("target_instrument")
    if target:
        return [str(target)]
    instruments = training.get("instruments") or config["model"].get("sources")
    if not instruments:
        raise MsstError(f"{origin}: no training.instruments nor training.target_instrument: "
                        "the config does not say which sources the model outputs.")
    return [str(name) for name in instruments]


def _check_derived(arch: str, section: tp.Dict[str, tp.Any], sources: tp.List[str],
                   channels: int, rate: int, origin: PathLike) -> None:
    """MSST's options that ours derive (stereo, num_stems, ...) must agree with them."""
    expected = {"stereo": channels == 2, "num_stems": len(sources), "sample_rate": rate,
                "audio_channels": channels, "sources": len(sources)}
    for key in DERIVED[arch]:
        if key not in section:
            continue
        value = len(section[key]) if key == "sources" else section[key]
        if value != expected[key]:
            raise MsstError(f"{origin}: model.{key}={section[key]!r} disagrees with the "
                            f"{len(sources)} sources {sources}, {channels} channels and "
                            f"{rate} Hz of the training: and audio: sections.")


def model_kwargs(arch: str, config: tp.Dict[str, tp.Any],
                 origin: PathLike = "config") -> tp.Dict[str, tp.Any]:
    """Our constructor arguments for the MSST `config` of a model of type `arch`."""
    klass = check_arch(arch)
    section = dict(config["model"])
    audio = config.get("audio") or {}
    sources = _sources(arch, config, origin)
    channels = int(audio.get("num_channels", 2))
    rate = int(audio.get("sample_rate", 44100))
    chunk = audio.get("chunk_size")
    if not chunk:
        raise MsstError(f"{origin}: no audio.chunk_size: the config does not give the "
                        "model's chunk length.")
    params = inspect.signature(klass).parameters
    for key in section:
        if key not in DERIVED[arch] and (key not in params or key in OURS):
            raise MsstError(f"{origin}: model.{key} is not an option of our {arch} "
                            f"({klass.__module__}.{klass.__name__}): nothing is dropped "
                            "silently; remove it from the config if it has no effect.")
    _check_derived(arch, section, sources, channels, rate, origin)
    kwargs = {key: value for key, value in section.items() if key not in DERIVED[arch]}
    return dict(kwargs, sources=sources, audio_channels=channels, samplerate=rate,
                segment=Fraction(int(chunk), rate))


def _unwrap(data: tp.Any) -> tp.Any:
    """The state_dict inside an MSST checkpoint (wrapped or not, DDP prefixes removed)."""
    while isinstance(data, dict):
        wrapper = next((key for key in CHECKPOINT_WRAPPERS
                        if isinstance(data.get(key), dict)), None)
        if wrapper is None:
            break
        data = data[wrapper]
    if isinstance(data, dict):
        for prefix in ("module.", "_orig_mod."):
            if data and all(str(key).startswith(prefix) for key in data):
                data = {key[len(prefix):]: value for key, value in data.items()}
    return data


def read_checkpoint(path: PathLike) -> State:
    """The state_dict of an MSST checkpoint, loaded safely (tensors only)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MsstError(f"{path}: no such checkpoint.") from None
    except Exception as error:  # torch raises many kinds for unreadable files
        damage = torch_file_damage(path, error)
        reason = damage or "it holds objects other than tensors (refused by the safe loader)"
        raise MsstError(f"{path}: cannot load the checkpoint: {reason}.") from None
    state = _unwrap(data)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor)
                                              for value in state.values()):
        raise MsstError(f"{path}: not a model checkpoint (no state_dict of tensors).")
    return state


def check_state(model: nn.Module, state: State, arch: str, origin: PathLike) -> None:
    """One line naming the first key that does not fit `model`, with both shapes."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise MsstError(f"{origin}: no {key} (shape {tuple(tensor.shape)}): not a "
                            f"checkpoint of this {arch} config.")
        if state[key].shape != tensor.shape:
            raise MsstError(f"{origin}: {key} has shape {tuple(state[key].shape)}, the "
                            f"config gives {tuple(tensor.shape)}.")
    unexpected = next((key for key in state if key not in expected), None)
    if unexpected is not None:
        raise MsstError(f"{origin}: {unexpected} is not a weight of this {arch} config "
                        "(a checkpoint of another architecture or size?).")


def import_model(arch: str, config_path: PathLike, checkpoint_path: PathLike) -> nn.Module:
    """Our model with the weights of an MSST model (its config and checkpoint)."""
    config = read_config(config_path)
    try:
        model = MODELS[arch](**model_kwargs(arch, config, config_path))
    except (TypeError, ValueError) as error:
        raise MsstError(f"{config_path}: {error}") from None
    state = read_checkpoint(checkpoint_path)
    check_state(model, state, arch, checkpoint_path)
    model.load_state_dict({key: value.float() if value.is_floating_point() else value
                           for key, value in state.items()})
    return model


def model_arch(model: nn.Module) -> str:
    """MSST's model type of one of our models."""
    arch = next((name for name, klass in MODELS.items() if type(model) is klass), None)
    if arch not in ARCHS:
        raise MsstError(f"{type(model).__name__} is not one of MSST's architectures "
                        f"({', '.join(ARCHS)}): it has no MSST config.")
    return tp.cast(str, arch)


def _plain(value: tp.Any) -> tp.Any:
    """YAML-friendly values: tuples as lists, Fractions as floats."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, Fraction):
        return float(value)
    return value


def msst_model_section(model: tp.Any) -> tp.Dict[str, tp.Any]:
    """The `model:` section that builds `model` in MSST."""
    arch = model_arch(model)
    _, given = tp.cast(tp.Tuple[tp.Any, tp.Dict[str, tp.Any]], model._init_args_kwargs)
    params = inspect.signature(type(model)).parameters
    defaults = {name: param.default for name, param in params.items()
                if param.default is not inspect.Parameter.empty}
    full = dict(defaults, **given)
    section: tp.Dict[str, tp.Any] = {}
    for key in params:
        if key in OURS or key in DERIVED[arch] or full.get(key) is None:
            continue
        if key in MSST_DEFAULTS:
            if full[key] != MSST_DEFAULTS[key]:
                raise MsstError(f"{key}={full[key]!r} cannot be written in an MSST config "
                                "(MSST takes a function there).")
            continue
        changed = key in given and full[key] != defaults.get(key)
        if arch == "scnet" or key in ALWAYS[arch] or changed:
            section[key] = _plain(full[key])
    sources, channels = list(model.sources), int(model.audio_channels)
    derived = {"stereo": channels == 2, "num_stems": len(sources),
               "sample_rate": int(model.samplerate), "sources": sources,
               "audio_channels": channels}
    return dict({key: derived[key] for key in DERIVED[arch]}, **section)


def msst_config(model: tp.Any) -> tp.Dict[str, tp.Any]:
    """The `config.yaml` of `model` for MSST's inference."""
    sources, rate = list(model.sources), int(model.samplerate)
    chunk = round(Fraction(model.segment) * rate)
    training: tp.Dict[str, tp.Any] = {
        "instruments": sources,
        "target_instrument": sources[0] if len(sources) == 1 else None,
        "batch_size": 1, "use_amp": True}
    return {"audio": {"chunk_size": chunk, "num_channels": model.audio_channels,
                      "sample_rate": rate, "min_mean_abs": 0.0},
            "model": msst_model_section(model),
            "training": training,
            "inference": {"batch_size": 1, "num_overlap": 4}}


def msst_state(model: nn.Module) -> State:
    """What an MSST checkpoint holds: the float32 state_dict."""
    return {key: value.detach().to("cpu", torch.float32 if value.is_floating_point()
                                    else value.dtype).clone()
            for key, value in model.state_dict().items()}


def write_msst(model: nn.Module, out: Path) -> tp.Tuple[Path, Path]:
    """Write `out/config.yaml` and `out/model.ckpt` for MSST's `inference.py`."""
    config = msst_config(model)
    state = msst_state(model)
    out.mkdir(parents=True, exist_ok=True)
    config_path, checkpoint_path = out / "config.yaml", out / "model.ckpt"
    atomic_write_bytes(yaml.safe_dump(config, sort_keys=False).encode(), config_path)
    save_atomic(state, checkpoint_path)
    return config_path, checkpoint_path
