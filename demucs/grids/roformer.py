"""MSST's MUSDB18-HQ configurations of its architectures, trained by our solver.

    dora grid roformer --dry_run --init   # list the XPs (and register them)
    dora grid roformer                    # schedule them on Slurm

The XPs: BS-RoFormer, Mel-Band RoFormer, SCNet and SCNet-large, each with the config
section of `conf/config.yaml` (MSST's MUSDB model settings; SCNet-large: channels
[4, 64, 128, 256] and bands 0.225 / 0.372 / 0.403 as in its paper), the loss MSST trains
it with (`l1_multi_stft`, `masked_mse` with q = 0.95), Adam at MSST's learning rates (5e-5
RoFormers, 5e-4 SCNet) and its training chunk: 3 s examples (MSST: 131584 samples, 2.98 s)
for the RoFormers, 11 s (485100) for SCNet, after the random shift of `dset.shift` = 1 s
(so `dset.segment` is one second longer), separated in chunks of that length
(`model_segment`). Batch sizes and epochs are ours (MSST counts steps, not epochs);
an EMA of the weights (decay 0.999, MSST's `ema_momentum`) is kept as a candidate.

Slurm: 8 GPUs, 1 node, 3 days per job, the `DEMUCS_SLURM_*` variables and `dora grid`
flags win (`_slurm`).
"""
from __future__ import annotations

import typing as tp

from dora import Launcher

from ._explorers import MyExplorer
from ._slurm import slurm_params

Overrides = dict[str, tp.Any]

COMMON: Overrides = {"optim.optim": "adam", "dset.shift": 1, "ema.batch": [0.999],
                     "epochs": 1000, "augment.repitch.proba": 0}
ROFORMER: Overrides = {**COMMON, "optim.loss": "l1_multi_stft", "optim.lr": 5e-5,
                       "dset.segment": 4, "model_segment": 3, "batch_size": 16}
SCNET: Overrides = {**COMMON, "model": "scnet", "optim.loss": "masked_mse",
                    "optim.loss_q": 0.95, "optim.lr": 5e-4, "dset.segment": 12,
                    "model_segment": 11, "batch_size": 8}
SCNET_LARGE: Overrides = {**SCNET, "scnet.dims": [4, 64, 128, 256],
                          "scnet.band_SR": [0.225, 0.372, 0.403]}


def experiments() -> list[Overrides]:
    """The overrides of each XP, in the order of the grid."""
    return [{**ROFORMER, "model": "bs_roformer"},
            {**ROFORMER, "model": "mel_band_roformer"},
            SCNET, SCNET_LARGE]


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(**slurm_params(gpus=8, mem_per_gpu=40, time=3 * 24 * 60))
    for overrides in experiments():
        launcher(overrides)
