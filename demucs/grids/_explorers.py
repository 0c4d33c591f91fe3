"""The Dora explorer of the Demucs grids: what `dora grid NAME` shows for each XP.

The solver stores one entry per epoch in the XP history (`history.json`):
`{"train": {...}, "valid": {...}, "test": {...}}`, `test` only at epochs where the test
set ran. The table shows:
- train: epoch count and last reconstruction loss (`reco`);
- valid: last SVD penalty (`penalty`), model size in MB (`ms`), last `reco`, best `reco`
  (`breco`), and the nSDR, overall and per source, of the best epoch (`bnsdr`,
  `bnsdr_drums`, ...), the best epoch being chosen like the solver does (`test.metric`,
  any valid key: nSDR keys are maximised, the others minimised);
- test: the last test nSDR and, when museval ran, SDR (mean and median over tracks).
"""
from __future__ import annotations

import typing as tp

import treetable as tt
from dora import Explorer
from dora.shep import Sheep

from .. import curves

SOURCES = ("drums", "bass", "other", "vocals")
Metrics = dict[str, tp.Any]


def best_epoch(history: tp.Sequence[Metrics], metric: str = "loss") -> Metrics:
    """The valid metrics of the (first) best epoch according to `metric`."""
    best = curves.best_epoch(history, metric)
    return dict(history[best - 1]["valid"]) if best is not None else {}


def summarize(history: tp.Sequence[Metrics], metric: str = "loss") -> dict[str, Metrics]:
    """The table row of an XP (see the module documentation) from its history."""
    train: Metrics = {"epoch": len(history)} if history else {}
    valid: Metrics = {}
    test: Metrics = {}
    for epoch in history:
        train.update(epoch.get("train", {}))
        valid.update(epoch.get("valid", {}))
        test.update(epoch.get("test", {}))
    recos = [epoch["valid"]["reco"] for epoch in history if "reco" in epoch.get("valid", {})]
    if recos:
        valid["breco"] = min(recos)
    for key, value in best_epoch(history, metric).items():
        if key.startswith("nsdr"):
            valid["b" + key] = value
    return {"train": train, "valid": valid, "test": test}


class MyExplorer(Explorer):
    """Explorer showing the training, validation and test metrics of Demucs XPs."""

    def get_grid_metrics(self) -> list[tp.Any]:
        nsdrs = [tt.leaf(f"bnsdr_{source}", ".2f") for source in SOURCES]
        return [
            tt.group("train", [tt.leaf("epoch"), tt.leaf("reco", ".3f")], align=">"),
            tt.group("valid", [tt.leaf("penalty", ".1f"), tt.leaf("ms", ".1f"),
                               tt.leaf("reco", ".3f"), tt.leaf("breco", ".3f"),
                               tt.leaf("bnsdr", ".2f")] + nsdrs, align=">"),
            tt.group("test", [tt.leaf("nsdr", ".2f"), tt.leaf("sdr", ".2f"),
                              tt.leaf("sdr_med", ".2f")], align=">"),
        ]

    def process_sheep(self, sheep: Sheep, history: list[Metrics]) -> dict[str, Metrics]:
        cfg = sheep.xp.cfg
        metric = cfg.test.metric if cfg is not None else "loss"
        return summarize(history, metric)
