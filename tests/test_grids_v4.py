"""The Demucs v4 grids `mmi` and `repro`: the upstream XPs, in order, same signatures."""
from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import pytest

from demucs.grids import mmi, repro
from demucs.train import main

GRIDS = {"mmi": mmi, "repro": repro}


@pytest.fixture(scope="module")
def grids_v4(reference_dir: Path) -> dict[str, tp.Any]:
    return json.loads((reference_dir / "v4" / "grids_v4.json").read_text())


def expected_sigs(grids_v4: dict[str, tp.Any], name: str) -> list[str]:
    rows = grids_v4[name]["xps"]
    assert [row["index"] for row in rows] == list(range(len(rows)))
    return [row["sig"] for row in rows]


@pytest.mark.parametrize("name", list(GRIDS))
def test_grid_signatures(grids_v4: dict[str, tp.Any], name: str) -> None:
    xps = [main.get_xp(main.value_to_argv(overrides))
           for overrides in GRIDS[name].experiments()]
    assert [xp.sig for xp in xps] == expected_sigs(grids_v4, name)


def test_mmi_released_and_sparse_xps() -> None:
    xps = mmi.experiments()
    released = main.get_xp(main.value_to_argv(xps[12])).cfg
    assert released.model == "htdemucs" and released.dset.segment == 10
    assert released.htdemucs.bottom_channels == 512 and released.htdemucs.t_layers == 5
    sparse = main.get_xp(main.value_to_argv(xps[10])).cfg.htdemucs
    assert sparse.t_sparse_self_attn and sparse.t_sparse_cross_attn
    assert sparse.t_auto_sparsity and sparse.t_sparsity == 0.9 and sparse.t_layers == 7
    assert main.get_xp(main.value_to_argv(xps[4])).cfg.dset.segment == 8.8


def test_repro_rows() -> None:
    cfgs = [main.get_xp(main.value_to_argv(overrides)).cfg
            for overrides in repro.experiments()]
    assert [cfg.model for cfg in cfgs] == ["demucs"] * 10 + ["hdemucs"] * 2
    assert cfgs[0].demucs.lstm_layers == 2 and cfgs[0].epochs == 360
    assert [bool(cfg.ema.batch) for cfg in cfgs].count(False) == 1  # row 4
    assert [cfg.svd.penalty for cfg in cfgs].count(0) == 2  # rows 0 and 3
