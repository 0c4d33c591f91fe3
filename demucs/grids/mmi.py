"""Demucs v4: the Hybrid Transformer Demucs (HTDemucs) experiments.

Every XP trains 32 examples of 10 s per batch, at most 800 batches per epoch, with two
batch and two epoch EMAs, no test-time shifts, and the HTDemucs settings of the release
(`dconv_mode=3`, transformer dropout 0.02). The data is `dset=extra_mmi_goodclean`
unless stated. In order:

- rows 0-2: the v3 Hybrid Demucs, for reference, on each training set;
- then, for 5 and 7 transformer layers, without and with a 512 channel bottleneck around
  the transformer (`htdemucs.bottom_channels`): ablations (5 layers, no bottleneck: no
  remix, no repitch), other training sets and the sparse attention XP (5 layers with the
  bottleneck), and training segments of 5, 10 and 15 s.

Row 12 (`955717e8`: 5 layers, bottleneck, 10 s) is the released `htdemucs` model. The
sparse attention XP needs the `xformers` kernels to train.

`dora grid mmi --dry_run --init` lists them without scheduling anything.
"""
from __future__ import annotations

import typing as tp

from dora import Launcher

from ._explorers import MyExplorer
from ._mdx import slurm_params

Overrides = dict[str, tp.Any]

COMMON: Overrides = {
    "dset": "extra_mmi_goodclean", "test.shifts": 0, "model": "htdemucs",
    "htdemucs.dconv_mode": 3, "htdemucs.depth": 4, "htdemucs.t_dropout": 0.02,
    "htdemucs.t_layers": 5, "max_batches": 800, "ema.epoch": [0.9, 0.95],
    "ema.batch": [0.9995, 0.9999], "dset.segment": 10, "batch_size": 32,
}
# Without repitch, the examples keep their full length: shorten them by the largest tempo
# change of repitch (12%), so that the model sees the same context as the other XPs.
NO_REPITCH: Overrides = {"augment.repitch.proba": 0.0, "dset.segment": 10 * 0.88}
# Sparse attention in every transformer layer (xformers kernels), 7 layers, 15 s.
SPARSE: Overrides = {
    "batch_size": 24, "augment.remix.group_size": 3, "htdemucs.t_layers": 7,
    "htdemucs.t_auto_sparsity": True, "htdemucs.t_sparse_self_attn": True,
    "htdemucs.t_sparse_cross_attn": True, "htdemucs.t_sparsity": 0.9, "dset.segment": 15,
}
SEGMENTS = (5, 10, 15)  # seconds


def experiments() -> list[Overrides]:
    """The overrides of each XP, in the order of the grid."""
    xps = [{**COMMON, "model": "hdemucs", "dset": dset}
           for dset in ("extra_mmi_goodclean", "extra44", "musdb44")]
    for layers in (5, 7):
        for bottom in (0, 512):
            arch = {**COMMON, "htdemucs.t_layers": layers, "htdemucs.bottom_channels": bottom}
            if (layers, bottom) == (5, 0):
                xps += [{**arch, "augment.remix.proba": 0.0}, {**arch, **NO_REPITCH}]
            elif (layers, bottom) == (5, 512):
                xps += [{**arch, "dset": "musdb44"}, {**arch, "dset": "extra44"},
                        {**arch, **SPARSE}]
            xps += [{**arch, "dset.segment": seconds} for seconds in SEGMENTS]
    return xps


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(**slurm_params())
    for overrides in experiments():
        launcher(overrides)
