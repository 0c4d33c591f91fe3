"""Slurm settings of the grids: each grid's defaults, the environment, the command line.

`dora grid` applies its `-g/--gpus`, `-p/--partition` (`--dev`), `--constraint` and
`-c/--comment` flags to the Slurm config (`slurm.*` keys of conf/config.yaml) before the
explorer runs, and `launcher.slurm_(...)` then overrides them. So a grid passes its
settings through `slurm_params`, which drops those given on the command line: a flag wins
over the environment variables of `SLURM_ENV`, which win over the grid's defaults, which
win over the `slurm.*` config keys.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import typing as tp

# Environment variables giving Slurm settings of every grid. DEMUCS_SLURM_SETUP is one
# shell line (`module load cuda; source env.sh`), run before training; set but empty, it
# runs nothing (the default setup of the config is FAIR's `module load ...`).
SLURM_ENV = {"partition": "DEMUCS_SLURM_PARTITION", "constraint": "DEMUCS_SLURM_CONSTRAINT",
             "setup": "DEMUCS_SLURM_SETUP"}
# The `dora grid` flags of Slurm settings (argparse destinations, as SlurmConfig names).
FLAGS = ("gpus", "partition", "constraint", "comment")


def flags_given(argv: tp.Sequence[str] | None = None) -> set[str]:
    """The Slurm settings given as flags to the `dora grid` command in `argv` (default:
    this process's), read with Dora's own parser; none outside of `dora grid`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "grid" not in argv:
        return set()
    from dora.__main__ import get_parser
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, _ = get_parser().parse_known_args(argv)
    except SystemExit:  # not a command line of Dora after all
        return set()
    return {name for name in FLAGS if getattr(args, name, None) is not None}


def from_env() -> dict[str, tp.Any]:
    """The settings of `SLURM_ENV` that are set (setup: as set, even empty)."""
    params: dict[str, tp.Any] = {}
    for key, variable in SLURM_ENV.items():
        value = os.environ.get(variable)
        if key == "setup" and value is not None:
            params[key] = [value] if value.strip() else []
        elif value:
            params[key] = value
    return params


def slurm_params(**defaults: tp.Any) -> dict[str, tp.Any]:
    """What a grid passes to `launcher.slurm_`: its `defaults` (SlurmConfig names),
    updated from the environment, less the settings given as `dora grid` flags."""
    params = {**defaults, **from_env()}
    for name in flags_given():
        params.pop(name, None)
    return params
