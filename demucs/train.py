"""Training entry point: the Dora experiment `main` and the builders it relies on.

`main` is a Dora `hydra_main` over `conf/config.yaml`, so it runs through `dora run`,
`dora grid` (Slurm) and `python -m demucs.train`. Hydra keeps the working directory of
the launch (`hydra.job.chdir: false`): relative paths in the config are relative to where
the command is run, while everything an XP writes goes to its folder `outputs/xps/SIG`.

Configuration mistakes (unknown model, optimizer or group value, missing dataset folder)
raise `ConfigError` before any training starts; on the command line they are reported as
one line and a non-zero exit status.
"""
from __future__ import annotations

import logging
import random
import sys
import typing as tp
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from dora.hydra import HydraMain
from dora.xp import XP, get_xp
from hydra.core.global_hydra import GlobalHydra
from hydra.core.singleton import Singleton
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import ConcatDataset, Dataset

from . import distrib, wav
from .checks import (OPTIMIZERS, check_choice, check_config, check_overrides, check_training,
                     dset_option)
from .errors import ConfigError, report_errors
from .models import model_class, model_on_chunks, model_takes
from .repitch import wrap_repitch
from .solver import Solver
from .utils import freed_memory_kept

logger = logging.getLogger(__name__)

PROG = "demucs.train"
HYDRA_VERSION_BASE = "1.3"
# The submodule of an HTDemucs trained in its own optimizer group (`htdemucs.t_lr`, ...).
TRANSFORMER = "crosstransformer"


# ---------------------------------------------------------------------------------------
# Builders


def get_model_kwargs(cfg: DictConfig) -> dict[str, tp.Any]:
    """Constructor arguments of the model: data settings, then its config section.

    `use_train_segment=false` is passed on to the models that take it (HTDemucs), and only
    then: their default is true, so that the arguments stay those of upstream v4. The
    model's `segment` is `model_segment`, by default 4 * `dset.segment`, or `dset.segment`
    for the models built for their training chunk (`models.model_on_chunks`).
    """
    model_class(cfg.model)  # an unknown name fails here, before its section is read
    section = tp.cast(dict[str, tp.Any], OmegaConf.to_container(cfg[cfg.model], resolve=True))
    segment = cfg.dset.segment if model_on_chunks(cfg.model) else 4 * cfg.dset.segment
    kwargs = {"sources": list(cfg.dset.sources), "audio_channels": cfg.dset.channels,
              "samplerate": cfg.dset.samplerate, "segment": cfg.model_segment or segment,
              **section}
    if not cfg.use_train_segment and model_takes(cfg.model, "use_train_segment"):
        kwargs["use_train_segment"] = False
    return kwargs


def get_model(cfg: DictConfig) -> torch.nn.Module:
    """Build the model registered as `cfg.model` (`demucs.models`) from its config section."""
    return model_class(cfg.model)(**get_model_kwargs(cfg))


def param_groups(model: torch.nn.Module, cfg: DictConfig) -> list[dict[str, tp.Any]]:
    """The optimizer groups: every parameter in one, except those of the transformer of an
    HTDemucs (its `crosstransformer`), which come second, in their own group, with the
    model's `t_lr` and `t_weight_decay` where they are not null (`optim.*` otherwise)."""
    transformer = getattr(model, TRANSFORMER, None)
    if not isinstance(transformer, torch.nn.Module):
        return [{"params": list(model.parameters())}]
    own = {id(param) for param in transformer.parameters()}
    group: dict[str, tp.Any] = {"params": list(transformer.parameters())}
    section = cfg[cfg.model] if cfg.model in cfg else {}
    for key, option in [("lr", "t_lr"), ("weight_decay", "t_weight_decay")]:
        if section.get(option) is not None:
            group[key] = section[option]
    others = [param for param in model.parameters() if id(param) not in own]
    return [{"params": others}, group]


def get_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over the model parameters (see `param_groups`), from `cfg.optim`."""
    check_choice("optim.optim", cfg.optim.optim, OPTIMIZERS)  # a builder fails loudly
    klass = torch.optim.Adam if cfg.optim.optim == "adam" else torch.optim.AdamW
    # foreach: the multi-tensor implementation, also on CPU (where PyTorch defaults to a
    # loop over the parameters): the same values bit for bit, a third less time.
    return klass(param_groups(model, cfg), lr=cfg.optim.lr,
                 betas=(cfg.optim.momentum, cfg.optim.beta2),
                 weight_decay=cfg.optim.weight_decay, foreach=True)


def _concat(datasets: list[Dataset]) -> Dataset:
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


def _add_wav2(train_set: tp.Any, valid_set: tp.Any, dset: DictConfig,
              ) -> tuple[tp.Any, tp.Any]:
    """Add the second wav dataset `dset.wav2`: a share `dset.wav2_weight` of the training
    examples (repeating one of the sets, see `wav.weighted_repeats`; null: as is), and,
    with `dset.wav2_valid`, of the valid examples (a random subset of its valid set)."""
    extra_train, extra_valid = wav.get_wav_datasets(dset, "wav2")
    weight = dset_option(dset, "wav2_weight")
    repeats = (1, 1)
    if weight is not None:
        repeats = wav.weighted_repeats(len(train_set), len(extra_train), weight)
    train_set = ConcatDataset([train_set] * repeats[0] + [extra_train] * repeats[1])
    if dset_option(dset, "wav2_valid", False):
        if weight is not None:
            count = round(weight * len(valid_set) / (1 - weight))
            extra_valid = wav.random_subset(extra_valid, count)
        valid_set = ConcatDataset([valid_set, extra_valid])
    return train_set, valid_set


def get_datasets(cfg: DictConfig) -> tuple[tp.Any, tp.Any]:
    """Train and valid sets: MusDB HQ (unless `dset.use_musdb=false`), the wav dataset
    `dset.wav` and the second one `dset.wav2` when set.

    With `dset.valid_samples`, validation uses that many examples drawn at random (always
    the same) from the valid set. The train set is wrapped for pitch and tempo changes
    (`augment.repitch`), which crops its examples to `(1 - max_tempo / 100)` of
    `dset.segment`.
    """
    parts = []
    if cfg.dset.use_musdb:
        parts.append(wav.get_musdb_wav_datasets(cfg.dset))
    if cfg.dset.wav:
        parts.append(wav.get_wav_datasets(cfg.dset))
    train_set = _concat([train for train, _ in parts])
    valid_set = _concat([valid for _, valid in parts])
    if cfg.dset.wav2:
        train_set, valid_set = _add_wav2(train_set, valid_set, cfg.dset)
    if cfg.dset.valid_samples is not None:
        valid_set = wav.random_subset(valid_set, cfg.dset.valid_samples)
    train_set = wrap_repitch(train_set, cfg.augment.repitch, list(cfg.dset.sources),
                             cfg.dset.samplerate)
    return train_set, valid_set


def get_loaders(cfg: DictConfig) -> dict[str, tp.Any]:
    """Data loaders; with several workers, each one gets its share of `batch_size`.

    Valid examples are whole tracks of different lengths (`dset.full_cv`): one per batch.
    Distributed, every worker validates its own share of the tracks (see `demucs.distrib`).
    """
    train_set, valid_set = get_datasets(cfg)
    world_size = distrib.world_size()
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of the number "
                          f"of workers ({world_size}).")
    batch_size = cfg.batch_size // world_size
    workers = cfg.misc.num_workers
    train = distrib.loader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                           num_workers=workers)
    if len(train) == 0:
        raise ConfigError(f"The train set has {len(train_set)} examples: not one batch of "
                          f"batch_size={cfg.batch_size}; lower batch_size or dset.segment, or "
                          "add tracks.")
    valid = distrib.loader(valid_set, batch_size=1 if cfg.dset.full_cv else batch_size,
                           shuffle=False, num_workers=workers)
    return {"train": train, "valid": valid}


def seed_all(seed: int) -> None:
    """Seed the generators of torch, numpy and Python (augmentations use all three)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def get_solver(cfg: DictConfig, model_only: bool = False) -> Solver:
    """The training loop for `cfg` (checked by `main.get_xp`); with `model_only`, without
    data (to load a checkpoint)."""
    seed_all(cfg.seed)
    model = get_model(cfg)
    if torch.cuda.is_available():
        model.cuda()
    optimizer = get_optimizer(model, cfg)
    loaders = None if model_only else get_loaders(cfg)
    return Solver(loaders, model, optimizer, cfg, find_xp=xp_folder)


def xp_folder(sig: str) -> Path:
    """The folder of the XP with signature `sig` (for `continue_from=SIG`); a
    `ConfigError` naming the known XPs when no XP has that signature."""
    main.get_argv_from_sig(sig)
    return XP(sig=sig, dora=main.dora, cfg=None, argv=[]).folder


def get_solver_from_sig(sig: str, model_only: bool = True) -> Solver:
    """The solver of an existing XP, found from its signature."""
    xp = main.get_xp_from_sig(sig)
    with xp.enter(stack=True):
        return get_solver(xp.cfg, model_only)


def show_model(model: torch.nn.Module, samplerate: int) -> None:
    """Print the model, its size in MB (float32) and its receptive field."""
    print(model)
    size = sum(param.numel() for param in model.parameters()) * 4 / 2 ** 20
    print(f"Size: {size:.1f} MB")
    valid_length = getattr(model, "valid_length", None)
    if callable(valid_length):
        print(f"Field: {valid_length(1) / samplerate * 1000:.1f} ms")


# ---------------------------------------------------------------------------------------
# Dora / Hydra entry point


def _first_lines(error: BaseException) -> str:
    # Hydra explains an override error over several lines, the reason being in the cause.
    lines = [str(exc).strip().splitlines()[0] for exc in (error, error.__cause__) if exc]
    return " ".join(lines)


def invoked_as_dora() -> bool:
    """Whether this process is the `dora` command (`dora run`, `dora grid`, ...)."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return program.name == "dora" or program.parent.name == "dora"


def _verbose(argv: tp.Sequence[str]) -> bool:
    return any(arg.lower() in ("misc.verbose=true", "misc.verbose=1") for arg in argv)


def dora_errors(argv: tp.Sequence[str] = ()) -> tp.ContextManager:
    """In the `dora` command, report a `DemucsError` as one line and exit 1 (traceback
    with `misc.verbose=true` in `argv`); elsewhere let it propagate to the caller."""
    return report_errors(PROG, _verbose(argv)) if invoked_as_dora() else nullcontext()


@contextmanager
def hydra_set_aside() -> tp.Iterator[None]:
    """Run the block as if no Hydra application were running, then put it back.

    Dora composes a config (`get_xp`, `get_xp_from_sig`) with Hydra's
    `initialize_config_dir`, which refuses to start while a Hydra application holds the
    global state: inside the training process of `dora run`, a `dora run -d` worker or a
    Slurm job, resolving another XP (`continue_from=SIG`, a grid's lookups) would fail.
    """
    held = Singleton._instances.pop(GlobalHydra, None)
    try:
        yield
    finally:
        if held is not None:
            Singleton._instances[GlobalHydra] = held


class DemucsMain(HydraMain):
    """Dora's Hydra main, turning bad overrides into a `ConfigError` naming the key.

    Programs calling `get_xp` get the `ConfigError`; the `dora` command and `python -m
    demucs.train` report it as one line and a non-zero exit (with the traceback when
    `misc.verbose=true`). Dora asks for the same XP several times in one process (`dora
    run`: three); its config is checked the first time.
    """

    def __init__(self, *args: tp.Any, **kwargs: tp.Any) -> None:
        super().__init__(*args, **kwargs)
        self._checked: set[str] = set()  # signatures whose config passed `check_config`

    def __call__(self) -> tp.Any:
        # `python -m demucs.train ARGV` (and `dora run`, which calls it in process).
        with report_errors(PROG, _verbose(sys.argv[1:])):
            return super().__call__()

    def get_xp(self, argv: tp.Sequence[str]) -> XP:
        with dora_errors(argv):
            check_overrides(argv, self.full_config_path)
            try:
                with hydra_set_aside():
                    xp = super().get_xp(argv)
            except (HydraException, OmegaConfBaseException) as error:
                raise ConfigError(f"invalid override: {_first_lines(error)}") from None
            if xp.sig not in self._checked:
                check_config(xp.cfg)
                self._checked.add(xp.sig)
            return xp

    def get_argv_from_sig(self, sig: str) -> list[str]:
        with dora_errors():
            try:
                return list(super().get_argv_from_sig(sig))
            except RuntimeError:
                raise ConfigError(f"unknown XP signature {sig!r}: no {self.dora.dir}/xps/"
                                  f"{sig}/.argv.json; known XPs: {self._known_sigs()}. Run "
                                  "`tar xf outputs.tar.gz` for the MDX ones.") from None

    def _known_sigs(self, limit: int = 8) -> str:
        folder = self.dora.dir / self.dora.xps
        sigs = sorted(path.parent.name for path in folder.glob("*/.argv.json"))
        more = f" and {len(sigs) - limit} more" if len(sigs) > limit else ""
        return (", ".join(sigs[:limit]) + more) if sigs else "none"

    def init_xp(self, xp: XP) -> XP:
        # `misc.show` is a one-off action, not a setting: keep it out of the argv stored
        # for `-f SIG`, so that a later `dora run -f SIG` trains.
        argv = [arg for arg in xp.argv if not arg.startswith("misc.show=")]
        stored = XP(dora=xp.dora, cfg=xp.cfg, argv=argv, delta=xp.delta, sig=xp.sig)
        super().init_xp(stored)
        return xp


def _absolute_paths(dset: DictConfig) -> None:
    # Relative dataset paths are from the launch folder, whatever the solver does later.
    for key in ("musdb", "wav", "wav2", "metadata"):
        if dset[key] is not None:
            dset[key] = str(Path(str(dset[key])).expanduser().resolve())


def run(cfg: DictConfig) -> None:
    """Everything `main` does, raising `DemucsError` on user mistakes (`cfg` was checked
    by `main.get_xp`, through which Dora runs every XP)."""
    if cfg.misc.verbose:
        logging.getLogger("demucs").setLevel(logging.DEBUG)
    if cfg.misc.show:
        torch.manual_seed(cfg.seed)
        show_model(get_model(cfg), cfg.dset.samplerate)
        return
    check_training(cfg)
    _absolute_paths(cfg.dset)
    distrib.init()
    try:
        with freed_memory_kept():  # no page faults at every step (a fifth of a CPU step)
            solver = get_solver(cfg)
            logger.info("XP folder: %s", get_xp().folder)
            solver.train()
    finally:
        distrib.close()


def _dora_main(**kwargs: tp.Any) -> tp.Callable[[tp.Callable], DemucsMain]:
    # `dora.hydra_main`, with our checks of the overrides (hence `DemucsMain`).
    def _decorator(function: tp.Callable) -> DemucsMain:
        return DemucsMain(function, **kwargs)
    return _decorator


@_dora_main(config_path="../conf", config_name="config", version_base=HYDRA_VERSION_BASE)
def main(cfg: DictConfig) -> None:
    """Train the XP of `cfg` (or show its model), reporting user mistakes as one line
    (with the traceback when `misc.verbose`)."""
    with report_errors(PROG, bool(cfg.misc.verbose)):
        run(cfg)


if __name__ == "__main__":
    main()
