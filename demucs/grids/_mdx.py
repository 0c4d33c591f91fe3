"""The MDX 2021 experiments: the submitted models, their lineage and Slurm settings.

XPs are found by signature in the XP folder (`outputs/xps/SIG/.argv.json`), filled by
`tar xf outputs.tar.gz` or by training them.
"""
from __future__ import annotations

import typing as tp

from dora.xp import XP

from ..errors import ConfigError, DemucsError
from ..train import dora_errors, main
from . import _slurm

# Track A (MusDB HQ only): fine-tuned on automix, from the XPs of the `mdx` grid.
TRACK_A = ("0d19c1c6", "7ecf8ec1", "c511e2ab", "7d865c68")
# Track B (extra training data): each has a chain of fine-tunings from a root XP.
TRACK_B = ("e51eebcc", "a1d90b5c", "5d2d6c55", "cfa93e08")
# DiffQ penalties of the quantized models (mdx_q, mdx_extra_q).
DIFFQ = (1e-4, 3e-4)

SLURM_GPUS = 8
SLURM_TIME = 3 * 24 * 60  # minutes


def slurm_params() -> dict[str, tp.Any]:
    """Slurm settings of the MDX grids: 8 GPUs for 3 days; the partition, constraint and
    setup from the environment (`_slurm.SLURM_ENV`); `dora grid` flags win."""
    return _slurm.slurm_params(gpus=SLURM_GPUS, time=SLURM_TIME)


def lookup(sig: str) -> XP:
    """The XP with signature `sig`, from its argv stored in the XP folder."""
    return main.get_xp_from_sig(sig)


def parent(xp: XP) -> XP | None:
    """The XP that `xp` continues from (`continue_from`), if any."""
    sig = xp.cfg.continue_from
    return None if sig is None else lookup(str(sig))


def finetuned_from(xp: XP | str) -> XP:
    """The XP that the fine-tuned XP `xp` (or signature) started from."""
    if isinstance(xp, str):
        xp = lookup(xp)
    base = parent(xp)
    if base is None:
        raise ConfigError(f"XP {xp.sig} has no continue_from: it is not a fine-tuned model.")
    return base


def root(xp: XP) -> XP:
    """The first XP of the fine-tuning chain of `xp`."""
    while (previous := parent(xp)) is not None:
        xp = previous
    return xp


def quantized(xp: XP, diffq: float) -> XP:
    """The DiffQ variant of `xp`."""
    return main.get_xp(list(xp.argv) + [f"quant.diffq={diffq}"])


def require_trained(xp: XP, what: str, grid: str = "mdx") -> None:
    """Fail clearly unless `xp` (an XP of the grid `grid`) has trained all its epochs."""
    xp.link.load()
    done, epochs = len(xp.link.history), xp.cfg.epochs
    if done < epochs:
        with dora_errors():
            raise DemucsError(f"{what} needs XP {xp.sig} to have finished training, but it has "
                              f"trained {done} of {epochs} epochs: run `dora grid {grid}` and "
                              "wait for it to finish first.")
