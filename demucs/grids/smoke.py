"""Tiny XPs that train in a minute on one CPU: `dora grid` and Slurm, end to end.

    python -m tools.slurm_local start --dir /tmp/slurm   # a cluster on this machine
    dora grid smoke                                      # schedule, then monitor

Each XP trains a Hybrid Demucs of 4 channels (like `tools.demo`'s) on the MusDB of
`dset.musdb` (MUSDB_PATH; `python -m tools.synth_dataset` writes a small synthetic one)
with 2 s examples, 2 batches of 2 per epoch, no repitch, no museval SDR (the test nSDR is
computed at the end) and no data loading process. The first two train 2 epochs, with
different seeds; the last one 6 epochs, time to stop it (`scancel`) and resume it from
its checkpoint (`dora grid smoke -r`). `smoke_refine` fine-tunes each of them.

Slurm: 1 CPU, 3 GB (per GPU with GPUs), 1 hour, no GPU, the cluster's default partition, no
constraint and no setup line (those of conf/config.yaml are FAIR's), so that the jobs
run anywhere. `-g N` or DEMUCS_SMOKE_GPUS=N ask for N GPUs; `-p`, `--constraint` or
DEMUCS_SLURM_PARTITION, DEMUCS_SLURM_CONSTRAINT, DEMUCS_SLURM_SETUP set the rest
(`_slurm`: flags win over the environment).
"""
from __future__ import annotations

import os
import typing as tp

from dora import Launcher

from ..errors import ConfigError
from ..train import dora_errors
from ._explorers import MyExplorer
from ._slurm import slurm_params

Overrides = dict[str, tp.Any]

TINY: Overrides = {
    "model": "hdemucs", "hdemucs.channels": 4, "hdemucs.nfft": 1024,
    "dset.segment": 2, "dset.shift": 1, "batch_size": 2, "augment.remix.group_size": 2,
    "max_batches": 2, "epochs": 2, "augment.repitch.proba": 0, "test.sdr": False,
    "misc.num_workers": 0,
}
SEEDS = (1, 2)
LONG: Overrides = {"seed": 3, "epochs": 6}  # to stop and resume
GPUS_ENV = "DEMUCS_SMOKE_GPUS"
TIME = 60  # minutes


def experiments() -> list[Overrides]:
    """The overrides of each XP, in the order of the grid."""
    return [{**TINY, "seed": seed} for seed in SEEDS] + [{**TINY, **LONG}]


def gpus() -> int:
    """GPUs per XP: DEMUCS_SMOKE_GPUS, default 0 (`-g N` wins over both)."""
    value = os.environ.get(GPUS_ENV, "0")
    if not value.isdigit():
        with dora_errors():
            raise ConfigError(f"{GPUS_ENV}={value!r} must be a number of GPUs (0 or more).")
    return int(value)


def slurm() -> dict[str, tp.Any]:
    """Slurm settings of the smoke XPs (see the module documentation)."""
    # With no GPU, Dora asks for 1 task and mem_per_gpu GB (cpus_per_gpu CPUs, unless
    # cpus_per_task is set); None leaves --partition and --constraint out of the job.
    return slurm_params(gpus=gpus(), mem_per_gpu=3, cpus_per_task=1, time=TIME,
                        partition=None, constraint=None, setup=[])


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(**slurm())
    for overrides in experiments():
        launcher(overrides)
