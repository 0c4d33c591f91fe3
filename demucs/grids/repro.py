"""Reproducible baselines of the v3 models, trained from scratch on MusDB HQ.

Row 0 is the Demucs v2 architecture (LSTM bottleneck, no residual branch, ReLU); the
others train 600 epochs the time domain Demucs of v3 (input normalisation), with the SVD
penalty unless stated, and ablations of its residual branch (`demucs.dconv_*`); the last
two are the Hybrid Demucs. Every XP but row 4 keeps two batch and two epoch EMAs.

`dora grid repro --dry_run --init` lists them without scheduling anything.
"""
from __future__ import annotations

import typing as tp

from dora import Launcher

from ._explorers import MyExplorer
from ._mdx import slurm_params

Overrides = dict[str, tp.Any]

EMA: Overrides = {"ema.epoch": [0.9, 0.95], "ema.batch": [0.9995, 0.9999]}
LONG: Overrides = {"epochs": 600}
SVD: Overrides = {"svd": "base2", "svd.penalty": 1e-5}
V2: Overrides = {"model": "demucs", "demucs.dconv_mode": 0, "demucs.gelu": False,
                 "demucs.lstm_layers": 2}
V3: Overrides = {"model": "demucs", "demucs.normalize": True}
HYBRID: Overrides = {"model": "hdemucs"}
ABLATIONS: tuple[Overrides, ...] = (  # of the residual branch of V3
    {"demucs.dconv_lstm": 10},
    {"demucs.dconv_attn": 10},
    {"demucs.dconv_attn": 10, "demucs.dconv_lstm": 10, "demucs.lstm_layers": 2},
    {"demucs.dconv_mode": 0},
    {"demucs.gelu": False},
)


def experiments() -> list[Overrides]:
    """The overrides of each XP, in the order of the grid."""
    trained = {**SVD, **EMA, **LONG}
    xps = [{**V2, **EMA},
           {**V3, **trained}, {**V3, **trained, "seed": 43},
           {**V3, **EMA, **LONG},  # no SVD penalty
           {**V3, **SVD, **LONG}]  # no EMA
    xps += [{**V3, **trained, **ablation} for ablation in ABLATIONS]
    xps += [{**HYBRID, **trained}, {**HYBRID, **trained, "seed": 43}]
    return xps


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(**slurm_params())
    for overrides in experiments():
        launcher(overrides)
