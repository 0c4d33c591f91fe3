"""The checks of a training config, in one place, each run once per process before
anything is built.

- `check_overrides(argv)`: the config group values of an argv, before Hydra composes it.
- `check_config(cfg)`: what makes a valid XP (the model, optimizer, loss and metric
  names, mixed precision, the dataset options), where a config becomes an XP
  (`train.main.get_xp`): every `dora run`, `dora grid`, `dora info`, `python -m
  demucs.train`, `dora run -d` worker and Slurm job goes through it, and so does every
  program that builds an XP from an argv or a signature.
- `check_training(cfg)`: what training needs besides (a loss weight per source, the
  example length, the dataset folders), when `train.run` starts: a grid may be listed,
  and a model shown (`misc.show=1`), on a machine without the data.

What depends on the machine or the built model rather than on the config (the number of
workers, CUDA graphs against the model's random draws, the remix groups against each
worker's batch) is checked where that is known, in the solver and the augmentations;
`warn_emulated_bf16` only warns, when training starts. Each failure is a `ConfigError`
naming the key, the value and what is accepted.
"""
from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

import torch
from omegaconf import DictConfig

from .errors import ConfigError
from .losses import LOSSES
from .models import model_class, model_on_chunks, model_takes
from .utils import cpu_has_bf16

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
CONFIG_GROUPS = ("dset", "svd", "variant")
OPTIMIZERS = ("adam", "adamw")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # optim.amp
# `dset.backend` (upstream v4 picks a torchaudio backend with it): we always read wav
# datasets with soundfile, so only these values mean what they say.
BACKENDS = ("soundfile",)


def check_config(cfg: DictConfig) -> None:
    """Every check of `cfg` that needs neither the data nor the machine's workers."""
    model_class(cfg.model)  # ConfigError naming the registered models
    check_choice("optim.optim", cfg.optim.optim, OPTIMIZERS)
    check_choice("optim.loss", cfg.optim.loss, LOSSES)
    check_metric(cfg.test.metric, list(cfg.dset.sources))
    check_optim(cfg.optim, torch.cuda.is_available())
    check_dset(cfg.dset)
    check_train_segment(cfg)
    if cfg.continue_from is not None:
        xp_reference(cfg.continue_from)


def check_training(cfg: DictConfig) -> None:
    """What a training of `cfg` needs besides `check_config`."""
    check_weights(cfg.weights, list(cfg.dset.sources))
    check_segment(cfg.dset)
    check_dataset_paths(cfg.dset)


def check_choice(key: str, value: tp.Any, choices: tp.Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}.")


def group_choices(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The values a config group accepts: the yaml files of `conf/GROUP/`."""
    return sorted(path.stem for path in (config_dir / group).glob("*.yaml"))


def check_overrides(argv: tp.Sequence[str], config_dir: Path = CONFIG_DIR) -> None:
    """Check the config group values given on the command line (`dset=...`, ...)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if sep and key in CONFIG_GROUPS:
            check_choice(key, value, group_choices(key, config_dir))


def valid_metric_keys(sources: tp.Sequence[str]) -> list[str]:
    """The keys of each candidate's valid metrics, any of which `test.metric` may name."""
    keys = ["loss", "reco", "ms", "nsdr"]
    return keys + [f"{name}_{source}" for name in ("reco", "nsdr") for source in sources]


def check_metric(metric: str, sources: tp.Sequence[str]) -> None:
    """`test.metric` must name a valid metric."""
    keys = valid_metric_keys(sources)
    if metric not in keys:
        raise ConfigError(f"test.metric={metric!r} is not a valid metric; choose one of: "
                          f"{', '.join(keys)}.")


def check_optim(optim: tp.Any, cuda: bool) -> None:
    """`optim.amp`, `optim.accumulate` and `optim.cuda_graph` (on a machine with or
    without CUDA)."""
    if optim.amp not in (None, *AMP_DTYPES):
        raise ConfigError(f"optim.amp={optim.amp!r} is not valid; choose one of: null "
                          f"(float32), {', '.join(AMP_DTYPES)}.")
    if optim.amp == "fp16" and not cuda:
        raise ConfigError("optim.amp=fp16 needs a CUDA GPU; on a CPU use optim.amp=bf16 "
                          "or null.")
    if not isinstance(optim.accumulate, int) or optim.accumulate < 1:
        raise ConfigError(f"optim.accumulate={optim.accumulate!r}: give a whole number of "
                          "batches per optimizer step, at least 1.")
    if optim.cuda_graph and not cuda:
        raise ConfigError("optim.cuda_graph=true needs a CUDA GPU; set it to false.")


def warn_emulated_bf16(amp: tp.Optional[str], device: torch.device) -> None:
    """bf16 on a CPU without bf16 instructions is emulated, a step 2 to 16 times slower
    than float32's (bench/README.md): said when training starts, not refused, as it
    still saves memory."""
    if amp == "bf16" and device.type == "cpu" and cpu_has_bf16() is False:
        logger.warning("optim.amp=bf16: this CPU has no bf16 instructions (no avx512_bf16, "
                       "amx_bf16 or Arm bf16 in /proc/cpuinfo), so a bf16 step runs 2 to 16 "
                       "times slower than a float32 one and only saves memory; train with "
                       "optim.amp=null.")



def check_weights(weights: tp.Sequence[float], sources: tp.Sequence[str]) -> None:
    """`weights`: one loss weight per source, none negative, not all zero."""
    values = [float(weight) for weight in weights]
    if len(values) != len(sources) or min(values, default=0) < 0 or sum(values) <= 0:
        raise ConfigError(f"weights={values}: give one non-negative weight per source "
                          f"({', '.join(sources)}), not all zero.")


def check_segment(dset: DictConfig) -> None:
    """Training examples are cropped by a random shift: `dset.segment > dset.shift`."""
    segment, shift = dset.segment, dset.shift
    if segment is not None and shift is not None and shift >= segment:
        raise ConfigError(f"dset.segment={segment} must be longer than dset.shift={shift}: "
                          "training examples are cropped by a random shift of up to "
                          "dset.shift seconds.")


def check_train_segment(cfg: DictConfig) -> None:
    """A model kept at its training length (HTDemucs with `use_train_segment`, the models
    built for one chunk: `models.model_on_chunks`) takes no whole track: validation must
    go through `apply_model`, which cuts tracks into chunks (for such a model even with
    `split=False`, so `test.split` may be false)."""
    if cfg.valid_apply:
        return
    if model_on_chunks(cfg.model):
        raise ConfigError(f"valid_apply=false: model={cfg.model} runs on at most its "
                          "training chunk, so validation must cut tracks into chunks: keep "
                          "valid_apply=true.")
    if cfg.use_train_segment and model_takes(cfg.model, "use_train_segment"):
        raise ConfigError(f"valid_apply=false: model={cfg.model} runs on at most its "
                          "training length (use_train_segment=true), so validation must "
                          "cut tracks into chunks: keep valid_apply=true, or set "
                          "use_train_segment=false.")


def dset_option(dset: DictConfig, key: str, default: tp.Any = None) -> tp.Any:
    """`dset.KEY`, or `default` for the keys only some dset groups define (`wav2_weight`,
    `wav2_valid`: give them on the command line as `+dset.wav2_weight=...`)."""
    return dset[key] if key in dset else default


def check_dset(dset: DictConfig) -> None:
    """The v4 dataset settings: a training set besides MusDB, valid_samples, wav2_weight."""
    if dset.backend is not None:
        check_choice("dset.backend", dset.backend, BACKENDS)
    if not dset.use_musdb and dset.wav is None:
        raise ConfigError("dset.use_musdb=false leaves no training data: set dset.wav to a "
                          "folder with train/ and valid/ track folders.")
    samples = dset.valid_samples
    if samples is not None and (not isinstance(samples, int) or samples <= 0):
        raise ConfigError(f"dset.valid_samples={samples!r} must be a positive number of "
                          "examples, or null to validate on the whole valid set.")
    weight = dset_option(dset, "wav2_weight")
    if weight is not None and not 0 < weight < 1:
        raise ConfigError(f"dset.wav2_weight={weight!r} must be strictly between 0 and 1 "
                          "(the share of training examples from dset.wav2), or null.")


def check_dataset_paths(dset: DictConfig) -> None:
    """Check that the dataset folders exist: `dset.musdb` always (the test set),
    `dset.wav` and `dset.wav2` when set."""
    hints = {"musdb": "the MusDB HQ folder (or set MUSDB_PATH)",
             "wav": "a folder with train/ and valid/ track folders, or null",
             "wav2": "a folder with train/ and valid/ track folders, or null"}
    for key, hint in hints.items():
        value = dset[key]
        if key != "musdb" and value is None:
            continue
        if value is None or not Path(str(value)).expanduser().is_dir():
            raise ConfigError(f"dset.{key}={value!r}: no such folder; set dset.{key} to {hint}.")


def xp_reference(value: tp.Any) -> str:
    """`continue_from` as given (an XP signature or a checkpoint path): Hydra reads an
    all-digit signature as an integer."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ConfigError(f"continue_from={value!r} is not an XP signature or a checkpoint "
                          "path; quote it: continue_from=\"'SIG'\".")
    return f"{value:08d}" if isinstance(value, int) else str(value)
