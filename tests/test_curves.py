"""Training curves: `curves.png` of an XP and `tools.plot` for several XPs."""
from __future__ import annotations

import typing as tp
from pathlib import Path

import pytest
from matplotlib import image

from demucs.curves import best_epoch, plot_histories, plot_history, sources_of
from demucs.train import main
from helpers import main_error, new_xp
from tools import plot

History = list[dict[str, tp.Any]]


def history(epochs: int = 4, test_every: int = 2) -> History:
    entries: History = []
    for epoch in range(epochs):
        valid = {"loss": 0.5 - 0.1 * epoch + 0.25 * (epoch == 3), "nsdr": 1. + epoch,
                 "nsdr_drums": 2. + epoch, "nsdr_bass": epoch - 1.}
        entry = {"train": {"loss": 0.6 - 0.1 * epoch}, "valid": valid}
        if (epoch + 1) % test_every == 0:
            entry["test"] = {"nsdr": 0.5 + epoch}
        entries.append(entry)
    return entries


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = image.imread(str(path)).shape
    assert width > 500 and height > 200


def test_best_epoch() -> None:
    entries = history()
    assert best_epoch(entries, "loss") == 3  # 0.5, 0.4, 0.3, 0.45: minimised
    assert best_epoch(entries, "nsdr") == 4  # maximised
    assert best_epoch(entries, "nsdr_bass") == 4
    assert best_epoch(entries, "reco") is None and best_epoch([], "loss") is None
    assert sources_of(entries) == ["drums", "bass"]


def test_plot_history(tmp_path: Path) -> None:
    path = tmp_path / "xp" / "curves.png"
    plot_history(history(), path, "nsdr", title="XP test")
    assert_png(path)
    assert not list(path.parent.glob(".*.tmp"))  # written atomically
    plot_history([], tmp_path / "empty.png")  # no epoch yet: empty axes, no error
    assert_png(tmp_path / "empty.png")


def test_plot_histories(tmp_path: Path) -> None:
    plot_histories({"a": history(), "b": history(3, test_every=1)}, tmp_path / "both.png")
    assert_png(tmp_path / "both.png")


@pytest.fixture
def dora_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    return tmp_path / "outputs"


def fake_xp(argv: list[str], entries: History) -> str:
    xp = new_xp(argv)
    for entry in entries:
        xp.link.push_metrics(entry)
    return xp.sig


def test_tools_plot(dora_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                    ) -> None:
    first = fake_xp(["model=hdemucs"], history())
    second = fake_xp(["model=hdemucs", "optim.lr=1e-3"], history(2))
    out = tmp_path / "compare.png"
    plot.main([first, second, "-o", str(out), "--metric", "nsdr"])
    assert f"Wrote {out}" in capsys.readouterr().out
    assert_png(out)
    empty = fake_xp(["model=hdemucs", "optim.lr=1e-2"], [])
    error = main_error(plot.main, [first, empty], capsys)
    assert error.startswith(f"tools.plot: error: XP {empty} has no history yet")
    assert "unknown XP signature 'deadbeef'" in main_error(plot.main, ["deadbeef"], capsys)
