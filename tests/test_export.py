"""tools.export and tools.test_pretrained on fake finished XPs, in a temporary Dora folder."""
from __future__ import annotations

import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from demucs import evaluate as ev
from demucs import separate, train
from demucs.repo import check_checksum, split_package_name
from demucs.states import save_atomic
from demucs.states import copy_state, load_model, load_package
from tools import export, test_pretrained
from helpers import SOURCES, main_error, new_xp

TINY = ["model=hdemucs", "hdemucs.channels=4", "hdemucs.depth=5", "model_segment=1",
        "epochs=2"]
MUSDB = {"tracks": 0, "test_tracks": 2, "seconds": 2.}  # `musdb` fixture's size


@pytest.fixture
def dora_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(train.main.dora, "dir", tmp_path / "outputs")
    return tmp_path / "outputs"


def fake_xp(argv: list[str], epochs_done: int, checkpoint: bool = True) -> tuple[str, tp.Any]:
    """An XP whose checkpoint says it trained `epochs_done` epochs, with a best state
    different from its last state. Returns its signature and the solver that wrote it."""
    xp = new_xp(argv)
    if not checkpoint:
        return xp.sig, None
    with xp.enter(stack=True):
        solver = train.get_solver(xp.cfg, model_only=True)
        solver.best_state = copy_state(solver.model.state_dict())
        with torch.no_grad():
            for param in solver.model.parameters():
                param.add_(0.01)
        solver.history[:] = [{"train": {"loss": 1.}, "valid": {"loss": 1. + epoch}}
                             for epoch in range(epochs_done)]
        if epochs_done:
            solver.history[0]["test"] = {"nsdr": 3.}
        save_atomic(solver.checkpoint(), solver.checkpoint_file)
        solver.save_best(solver.best_file)
    return xp.sig, solver


def assert_state(package: dict[str, tp.Any], expected: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> None:
    state = package["state"]
    assert set(state) == set(expected)
    for key, value in expected.items():
        if value.is_floating_point():
            assert state[key].dtype == dtype, key
            assert torch.equal(state[key], value.to(dtype)), key


def test_export_best_and_separate(dora_dir: Path, tmp_path: Path, musdb: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    sig, solver = fake_xp(TINY, epochs_done=2)
    out = tmp_path / "release"
    export.main([sig, "-o", str(out)])
    assert f"Exported XP {sig}" in capsys.readouterr().out
    path = out / f"{sig}.th"
    package = load_package(path)
    assert_state(package, solver.best_state, torch.half)
    assert package["training_args"]["hdemucs"]["channels"] == 4
    # As the original: the last valid metrics and the last test metrics.
    assert package["metrics"] == ({"loss": 2.}, {"nsdr": 3.})
    model = load_model(path)
    assert model.sources == SOURCES and model.segment == 1
    track = musdb / "test" / "synth_test_000" / "mixture.wav"
    separate.main(["--repo", str(out), "-n", sig, "-o", str(tmp_path / "sep"), "-d", "cpu",
                   str(track)])
    stems = sorted(p.name for p in (tmp_path / "sep" / sig / "mixture").iterdir())
    assert stems == sorted(f"{source}.wav" for source in SOURCES)


def test_export_last_float(dora_dir: Path, tmp_path: Path) -> None:
    sig, solver = fake_xp(TINY, epochs_done=2)
    export.main([sig, "-o", str(tmp_path), "--last", "--no-half"])
    package = load_package(tmp_path / f"{sig}.th")
    assert_state(package, solver.model.state_dict(), torch.float32)


def test_export_sign(dora_dir: Path, tmp_path: Path) -> None:
    sig, _ = fake_xp(TINY, epochs_done=2)
    export.main([sig, "-o", str(tmp_path)])
    export.main([sig, "-o", str(tmp_path), "--sign"])
    files = list(tmp_path.glob("*.th"))
    assert len(files) == 1  # the unsigned export was replaced
    name, checksum = split_package_name(files[0].stem)
    assert name == sig and checksum is not None
    check_checksum(files[0], checksum)
    load_model(files[0])


def test_export_unfinished_warns(dora_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    sig, _ = fake_xp(TINY, epochs_done=1)
    export.main([sig, "-o", str(tmp_path)])
    assert f"XP {sig} trained 1 of its 2 epochs" in capsys.readouterr().err
    assert (tmp_path / f"{sig}.th").is_file()


def test_export_diffq(dora_dir: Path, tmp_path: Path) -> None:
    sig, solver = fake_xp(TINY + ["quant.diffq=1e-4", "quant.min_size=0.0001"], epochs_done=2)
    export.main([sig, "-o", str(tmp_path)])
    package = load_package(tmp_path / f"{sig}.th")
    assert package["state"]["__quantized"]
    load_model(package)


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    line = main_error(export.main, argv, capsys)
    assert line.startswith("tools.export: error: ")
    return line


def test_export_errors(dora_dir: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    assert "unknown XP signature 'deadbeef'" in one_line_error(capsys, ["deadbeef"])
    sig, _ = fake_xp(TINY, epochs_done=0, checkpoint=False)
    err = one_line_error(capsys, [sig, "-o", str(tmp_path)])
    assert f"train it first with `dora run -f {sig}`" in err
    assert not list(tmp_path.glob("*.th"))


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
@pytest.mark.parametrize("command, message", [
    (["tools.export", "deadbeef"], "tools.export: error: unknown XP signature 'deadbeef'"),
    (["tools.test_pretrained", "--repo", "no_repo", "-n", "x", "-d", "cpu"],
     "tools.test_pretrained: error: Model repository no_repo is not a directory"),
])
def test_command_error_traceback_only_when_verbose(tmp_path: Path, verbose: bool,
                                                   command: list[str], message: str) -> None:
    env = dict(os.environ)
    argv = [sys.executable, "-m", *command, *(["-v"] if verbose else [])]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(message), proc.stderr
    if verbose:
        assert "Traceback" in proc.stderr
    else:
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------
# tools.test_pretrained


@pytest.fixture
def repo(dora_dir: Path, tmp_path: Path) -> Path:
    """A repository with one exported tiny model and a bag of it twice."""
    sig, _ = fake_xp(TINY, epochs_done=2)
    out = tmp_path / "release"
    export.main([sig, "-o", str(out), "--sign"])
    (out / "my_bag.yaml").write_text(f"models: ['{sig}', '{sig}']\n"
                                     "weights: [[1, 1, 1, 1], [1, 0, 1, 1]]\nsegment: 1\n")
    return out


def test_pretrained_bag(repo: Path, musdb: Path, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_museval(references: np.ndarray, *args: tp.Any) -> dict[str, list[float]]:
        calls.append(references.shape)
        return {name: [5. + index] * references.shape[0]
                for index, name in enumerate(ev.MUSEVAL_METRICS)}

    monkeypatch.setattr(ev, "museval_scores", fake_museval)
    test_pretrained.main(["--repo", str(repo), "-n", "my_bag", "--musdb", str(musdb),
                          "-d", "cpu", "test.shifts=0", "test.workers=0"])
    out = capsys.readouterr().out
    assert len(calls) == 2  # museval once per track (test.sdr defaults to true)
    lines = out.strip().splitlines()
    header = next(line for line in lines if line.split()[:1] == ["source"])
    assert header.split() == ["source", "nSDR", "SDR", "SIR", "ISR", "SAR"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[lines.index(header) + 1:]}
    assert list(rows) == SOURCES + ["all"]
    assert all(row[1:] == ["5.000", "6.000", "7.000", "8.000"] for row in rows.values())
    assert all(np.isfinite(float(row[0])) for row in rows.values())


def test_pretrained_env_and_overrides(repo: Path, musdb: Path,
                                      capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSDB_PATH", str(musdb))
    sig = split_package_name(next(repo.glob("*.th")).stem)[0]
    save = repo.parent / "estimates"
    test_pretrained.main(["--repo", str(repo), "-n", sig, "-d", "cpu", "-o", str(save),
                          "test.sdr=false", "test.save=true", "test.shifts=0"])
    header, *rows = capsys.readouterr().out.strip().splitlines()[-6:]
    assert header.split() == ["source", "nSDR"]
    assert sorted(p.name for p in (save / "wav").iterdir()) == ["synth_test_000",
                                                                 "synth_test_001"]


def pretrained_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    line = main_error(test_pretrained.main, argv, capsys)
    assert line.startswith("tools.test_pretrained: error: ")
    return line


def test_pretrained_errors(repo: Path, musdb: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    err = pretrained_error(capsys, ["--repo", str(repo), "-n", "nope", "--musdb", str(musdb)])
    assert "Unknown model 'nope'" in err and "my_bag" in err
    err = pretrained_error(capsys, ["--repo", str(repo), "-n", "my_bag",
                                    "--musdb", str(tmp_path / "missing")])
    assert "no test/ folder" in err
    err = pretrained_error(capsys, ["--repo", str(repo), "-n", "my_bag", "--musdb", str(musdb),
                                    "test.nope=1"])
    assert "test.nope" in err


@pytest.mark.parametrize("split,fix", [
    ("true", "evaluate on the CPU (-d cpu)."),
    ("false", "set test.split=true to separate the tracks in segments, or evaluate on the "
              "CPU (-d cpu).")])
def test_pretrained_out_of_memory_is_one_line(repo: Path, musdb: Path, split: str, fix: str,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total capacity of "
            "79.10 GiB of which 1.20 GiB is free. Including non-PyTorch memory, ...")

    monkeypatch.setattr(test_pretrained, "evaluate", out_of_memory)
    err = pretrained_error(capsys, ["--repo", str(repo), "-n", "my_bag", "--musdb", str(musdb),
                                    "-d", "cpu", f"test.split={split}"])
    assert err == ("tools.test_pretrained: error: cpu out of memory (CUDA out of memory. "
                   f"Tried to allocate 9.00 GiB): {fix}")


def test_cfg_is_composed(musdb: Path) -> None:
    cfg = test_pretrained.get_config(["test.shifts=2"], musdb)
    assert isinstance(cfg, DictConfig)
    assert cfg.test.shifts == 2 and cfg.dset.musdb == str(musdb)
