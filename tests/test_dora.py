"""Dora experiments: the MDX signatures, outputs.tar.gz, the grids and the CLI."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import typing as tp
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from demucs.errors import ConfigError, DemucsError
from demucs.grids import _mdx, mdx_refine
from demucs.grids._explorers import best_epoch, summarize
from demucs import checks, train
from demucs.train import main
from helpers import REPO, one_line
from tools import make_outputs

TARBALL = REPO / "outputs.tar.gz"


@pytest.fixture(scope="module")
def mdx_xps(reference_dir: Path) -> dict[str, list[str]]:
    return json.loads((reference_dir / "mdx_xps.json").read_text())


@pytest.fixture(scope="module")
def grids(reference_dir: Path) -> dict[str, tp.Any]:
    return json.loads((reference_dir / "grids.json").read_text())


def test_mdx_signatures(mdx_xps: dict[str, list[str]]) -> None:
    assert len(mdx_xps) == 23
    for sig, argv in mdx_xps.items():
        assert main.get_xp(argv).sig == sig, argv


def test_seed_example_signature(mdx_xps: dict[str, list[str]]) -> None:
    assert main.get_xp(mdx_xps["81de367c"] + ["hdemucs.channels=32"]).sig == "2db45dc4"


def test_tarball(mdx_xps: dict[str, list[str]], tmp_path: Path) -> None:
    assert make_outputs.read_archive(TARBALL) == mdx_xps
    with tarfile.open(TARBALL) as tar:
        files = sorted(member.name for member in tar.getmembers() if member.isfile())
    assert files == sorted(f"outputs/xps/{sig}/.argv.json" for sig in mdx_xps)
    # The tool regenerates the same bytes.
    output = tmp_path / "outputs.tar.gz"
    with pytest.raises(SystemExit) as info:
        make_outputs.main(["--xps", str(REPO.parent / "x.json"), "-o", str(output)])
    assert info.value.code == 1
    xps_file = tmp_path / "xps.json"
    xps_file.write_text(json.dumps(mdx_xps))
    assert make_outputs.main(["--xps", str(xps_file), "-o", str(output)]) == 0
    assert output.read_bytes() == TARBALL.read_bytes()


def test_tarball_not_ignored() -> None:
    result = subprocess.run(["git", "check-ignore", "-q", "outputs.tar.gz"], cwd=REPO)
    assert result.returncode == 1  # 1: not ignored


# ---------------------------------------------------------------------------------------
# Grids, in process, with a temporary XP folder


@pytest.fixture
def xp_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Dora folder holding the MDX XPs, used by `main` for this test."""
    with tarfile.open(TARBALL) as tar:
        tar.extractall(tmp_path, filter="data")
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    return tmp_path / "outputs"


def grid_sigs(grid: tp.Sequence[tp.Sequence[tp.Any]]) -> list[str]:
    return [sig for sig, _ in grid]


def test_grid_without_xps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    with pytest.raises(ConfigError, match="unknown XP signature '0d19c1c6'.*tar xf outputs"):
        _mdx.finetuned_from("0d19c1c6")


def test_mdx_lineage(xp_store: Path, grids: dict[str, tp.Any]) -> None:
    parents = [_mdx.finetuned_from(sig).sig for sig in _mdx.TRACK_A]
    assert parents == grid_sigs(grids["mdx"])[::3]
    roots = [_mdx.root(_mdx.lookup(sig)).sig for sig in _mdx.TRACK_B]
    assert roots == grid_sigs(grids["mdx_extra"])[::4]


def test_xps_resolve_inside_a_running_hydra_app(xp_store: Path) -> None:
    """As in the training process of `dora run`, a `-d` worker or a Slurm job, where
    Hydra's global state is held (composing a config there used to fail)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(str(checks.CONFIG_DIR), version_base=train.HYDRA_VERSION_BASE):
        held = GlobalHydra.instance()
        assert main.get_xp_from_sig("81de367c").cfg.hdemucs.channels == 48
        assert _mdx.finetuned_from("c511e2ab").sig == "81de367c"
        assert train.xp_folder("81de367c") == xp_store / "xps" / "81de367c"
        with pytest.raises(ConfigError, match="unknown XP signature 'deadbeef'"):
            train.xp_folder("deadbeef")
        assert GlobalHydra.instance() is held and held.is_initialized()  # put back


def finish(xp_store: Path, sig: str, epochs: int) -> None:
    (xp_store / "xps" / sig).mkdir(parents=True, exist_ok=True)
    (xp_store / "xps" / sig / "history.json").write_text(json.dumps([{}] * epochs))


def test_mdx_refine(xp_store: Path, grids: dict[str, tp.Any]) -> None:
    with pytest.raises(DemucsError, match="mdx_refine.*dora grid mdx"):
        mdx_refine._plan()
    quantized = [sig for sig, extra in grids["mdx"] if extra]
    for sig in quantized:
        finish(xp_store, sig, 360)
    plan = mdx_refine._plan()
    assert len(plan) == 12
    xps = [main.get_xp(argv) for argv in plan]
    assert [xp.sig for xp in xps[::3]] == list(_mdx.TRACK_A)
    assert [xp.cfg.continue_from for xp in xps if xp.cfg.quant.diffq] == quantized
    assert [xp.cfg.quant.diffq for xp in xps[1:3]] == [1e-4, 3e-4]


def test_slurm_params(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEMUCS_SLURM_PARTITION", raising=False)
    monkeypatch.delenv("DEMUCS_SLURM_CONSTRAINT", raising=False)
    monkeypatch.delenv("DEMUCS_SLURM_SETUP", raising=False)
    assert _mdx.slurm_params() == {"gpus": 8, "time": 3 * 24 * 60}
    monkeypatch.setenv("DEMUCS_SLURM_PARTITION", "learnfair")
    monkeypatch.setenv("DEMUCS_SLURM_CONSTRAINT", "volta32gb")
    assert _mdx.slurm_params() == {"gpus": 8, "time": 4320, "partition": "learnfair",
                                   "constraint": "volta32gb"}


def test_explorer_summary() -> None:
    def epoch(reco: float, loss: float, nsdr: float) -> dict[str, tp.Any]:
        return {"train": {"reco": reco + 0.1},
                "valid": {"reco": reco, "loss": loss, "nsdr": nsdr, "nsdr_bass": nsdr - 1,
                          "penalty": 2.0, "ms": 80.0}}
    history = [epoch(0.2, 0.2, 5.0), epoch(0.15, 0.1, 6.0), epoch(0.18, 0.3, 7.0)]
    history[-1]["test"] = {"nsdr": 6.5}
    row = summarize(history)
    assert row["train"] == {"epoch": 3, "reco": pytest.approx(0.28)}
    assert row["valid"]["breco"] == 0.15 and row["valid"]["reco"] == 0.18
    assert row["valid"]["bnsdr"] == 6.0 and row["valid"]["bnsdr_bass"] == 5.0
    assert row["test"] == {"nsdr": 6.5}
    assert summarize(history, "nsdr")["valid"]["bnsdr"] == 7.0
    assert summarize(history, "nsdr_bass")["valid"]["bnsdr"] == 7.0  # maximised
    assert summarize(history, "reco")["valid"]["bnsdr"] == 6.0  # minimised
    assert best_epoch([], "loss") == {} and summarize([]) == {"train": {}, "valid": {},
                                                              "test": {}}


# ---------------------------------------------------------------------------------------
# Command line, in a temporary copy of the tree. Each command costs a Python start with
# torch, Dora and Hydra: they all start at once, and each test checks its results.

COMMANDS = {
    "info": ["dora", "info", "-f", "81de367c"],
    "info_32": ["dora", "info", "-f", "81de367c", "hdemucs.channels=32"],
    "info_unknown": ["dora", "info", "-f", "deadbeef"],
    "grid_mdx": ["dora", "grid", "mdx", "--dry_run", "--init"],
    "grid_mdx_extra": ["dora", "grid", "mdx_extra", "--dry_run", "--init"],
    "grid_mdx_refine": ["dora", "grid", "mdx_refine", "--dry_run", "--init"],
    "grid_mmi": ["dora", "grid", "mmi", "--dry_run", "--init"],
    "grid_repro": ["dora", "grid", "repro", "--dry_run", "--init"],
    # The other bad values are checked in process by test_config.py, same messages.
    "bad_group": ["demucs.train", "dset=musdb"],
    "bad_optim": ["dora", "run", "optim.optim=sgd"],
    "bad_path": ["demucs.train", "dset.musdb=/no/such/folder"],
    "bad_metric": ["dora", "run", "test.metric=sdr"],
    "bad_optim_verbose": ["dora", "run", "optim.optim=sgd", "misc.verbose=true"],
    "show": ["dora", "run", "model=hdemucs", "hdemucs.channels=4", "misc.show=1"],
    "bad_weights": ["dora", "run", "weights=[1,1]"],
    "bad_segment": ["demucs.train", "dset.segment=1"],
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package and configs, with outputs.tar.gz extracted."""
    root = tmp_path_factory.mktemp("tree")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "demucs", root / "demucs", ignore=ignore)
    shutil.copytree(REPO / "conf", root / "conf", ignore=ignore)
    shutil.copy(TARBALL, root)
    subprocess.run(["tar", "xf", "outputs.tar.gz"], cwd=root, check=True)
    (root / "musdb").mkdir()
    return root


def run(tree: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DORA_")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli(tree: Path) -> tp.Iterator[dict[str, Future]]:
    """The results of COMMANDS, run concurrently in `tree`."""
    with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        yield {name: pool.submit(run, tree, *command) for name, command in COMMANDS.items()}


def output(cli: dict[str, Future], name: str) -> str:
    result = cli[name].result()
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr  # Dora logs to stderr


def listed_sigs(output: str) -> list[str]:
    """Signatures of the XPs in the table printed by `dora grid` (state N/A: no job)."""
    return re.findall(r" N/A +([0-9a-f]{8}) ", output)


def one_line_error(cli: dict[str, Future], name: str) -> str:
    result = cli[name].result()
    assert result.returncode == 1
    return one_line(result.stderr)


def test_cli_info(cli: dict[str, Future], mdx_xps: dict[str, list[str]]) -> None:
    out = output(cli, "info")
    assert "outputs/xps/81de367c" in out
    for arg in mdx_xps["81de367c"]:
        assert repr(arg) in out
    assert "outputs/xps/2db45dc4" in output(cli, "info_32")
    error = one_line_error(cli, "info_unknown")
    assert "unknown XP signature 'deadbeef'" in error and "0d19c1c6" in error


@pytest.mark.parametrize("name", ["mdx", "mdx_extra"])
def test_cli_grid(cli: dict[str, Future], tree: Path, grids: dict[str, tp.Any],
                  name: str) -> None:
    expected = grid_sigs(grids[name])
    assert listed_sigs(output(cli, f"grid_{name}")) == expected
    for sig in expected:  # --init: each XP can now be referred to by its signature
        assert (tree / "outputs" / "xps" / sig / ".argv.json").exists()


@pytest.mark.parametrize("name", ["mmi", "repro"])
def test_cli_grid_v4(cli: dict[str, Future], tree: Path, reference_dir: Path,
                     name: str) -> None:
    """The Demucs v4 grids list upstream's XPs, in order (tests/test_grids_v4.py: in process)."""
    grids_v4 = json.loads((reference_dir / "v4" / "grids_v4.json").read_text())
    expected = [row["sig"] for row in grids_v4[name]["xps"]]
    assert listed_sigs(output(cli, f"grid_{name}")) == expected
    for sig in expected:
        assert (tree / "outputs" / "xps" / sig / ".argv.json").exists()


def test_cli_refine_before_mdx(cli: dict[str, Future]) -> None:
    error = one_line_error(cli, "grid_mdx_refine")
    assert "mdx_refine" in error and "finished training" in error
    assert "dora grid mdx" in error


@pytest.mark.parametrize("name, message", [
    ("bad_group", "dset='musdb' is not valid; choose one of: aetl, auto_extra,"),
    ("bad_optim", "optim.optim='sgd' is not valid; choose one of: adam, adamw"),
    ("bad_path", "dset.musdb='/no/such/folder': no such folder"),
    ("bad_metric", "test.metric='sdr' is not a valid metric; choose one of: loss, reco, ms"),
    ("bad_weights", "weights=[1.0, 1.0]: give one non-negative weight per source (drums, "
                    "bass, other, vocals), not all zero."),
    ("bad_segment", "dset.segment=1 must be longer than dset.shift=1"),
])
def test_cli_bad_input(cli: dict[str, Future], name: str, message: str) -> None:
    assert message in one_line_error(cli, name)


def test_cli_error_traceback_with_verbose(cli: dict[str, Future]) -> None:
    result = cli["bad_optim_verbose"].result()
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "demucs.train: error: optim.optim='sgd' is not valid; choose one of: adam, adamw.")


def test_cli_show(cli: dict[str, Future]) -> None:
    out = output(cli, "show")
    assert "HDemucs(" in out and "Size:" in out

