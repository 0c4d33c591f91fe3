"""Training curves drawn from XP histories (matplotlib, no display needed).

`plot_history(history, path)` is what the solver writes as `curves.png` after each epoch:
the train and valid loss, the valid nSDR overall and per source, the test nSDR where the
test set ran, and the best epoch marked. `plot_histories({name: history}, path)` draws
several XPs on the same axes for comparison (`python -m tools.plot SIG [SIG ...]`).
"""
from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

from .errors import one_line
from .utils import atomic_path

logger = logging.getLogger(__name__)

History = tp.Sequence[tp.Mapping[str, tp.Any]]


def is_maximized(metric: str) -> bool:
    """nSDR metrics are maximised, losses minimised (as the solver chooses)."""
    return metric.startswith("nsdr")


def best_epoch(history: History, metric: str = "loss") -> tp.Optional[int]:
    """The first epoch (1-based) with the best valid `metric`, None without one."""
    values = [(epoch + 1, entry["valid"][metric]) for epoch, entry in enumerate(history)
              if metric in entry.get("valid", {})]
    if not values:
        return None
    choose = max if is_maximized(metric) else min
    return choose(values, key=lambda item: item[1])[0]


def series(history: History, stage: str, key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of `history[epoch][stage][key]` where present (1-based epochs)."""
    points = [(epoch + 1, float(entry[stage][key])) for epoch, entry in enumerate(history)
              if key in entry.get(stage, {})]
    return [epoch for epoch, _ in points], [value for _, value in points]


def sources_of(history: History) -> list[str]:
    """The source names of the valid per-source nSDRs (`nsdr_SOURCE`)."""
    names: dict[str, None] = {}
    for entry in history:
        for key in entry.get("valid", {}):
            if key.startswith("nsdr_") and not key.startswith("nsdr_med"):
                names[key[len("nsdr_"):]] = None
    return list(names)


def _figure() -> tp.Any:
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].set(title="Loss", xlabel="epoch")
    axes[1].set(title="nSDR (dB)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    return figure, axes


def _save(figure: tp.Any, path: Path) -> None:
    from matplotlib import pyplot as plt
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def plot_history(history: History, path: Path, metric: str = "loss",
                 title: str = "") -> None:
    """Write the curves of one XP to `path` (PNG); `metric` marks the best epoch."""
    figure, (loss, nsdr) = _figure()
    loss.plot(*series(history, "train", "loss"), label="train loss")
    loss.plot(*series(history, "valid", "loss"), label="valid loss")
    nsdr.plot(*series(history, "valid", "nsdr"), color="black", label="valid nSDR")
    for source in sources_of(history):
        nsdr.plot(*series(history, "valid", f"nsdr_{source}"), alpha=0.6, label=source)
    nsdr.plot(*series(history, "test", "nsdr"), "s", color="red", label="test nSDR")
    best = best_epoch(history, metric)
    if best is not None:
        for ax in (loss, nsdr):
            ax.axvline(best, color="gray", linestyle=":", label=f"best ({metric})")
    loss.legend(fontsize="small")
    nsdr.legend(fontsize="small", ncol=2)
    if title:
        figure.suptitle(title)
    _save(figure, path)


def plot_histories(histories: tp.Mapping[str, History], path: Path,
                   metric: str = "loss") -> None:
    """Write the curves of several XPs (`{name: history}`) side by side to `path`."""
    figure, (loss, nsdr) = _figure()
    for index, (name, history) in enumerate(histories.items()):
        color = f"C{index % 10}"
        loss.plot(*series(history, "train", "loss"), "--", color=color, alpha=0.7)
        loss.plot(*series(history, "valid", "loss"), color=color, label=name)
        nsdr.plot(*series(history, "valid", "nsdr"), color=color, label=name)
        nsdr.plot(*series(history, "test", "nsdr"), "s", color=color)
        best = best_epoch(history, metric)
        if best is not None and "loss" in history[best - 1]["valid"]:
            loss.plot([best], [history[best - 1]["valid"]["loss"]], "*", color=color,
                      markersize=12)
    loss.set_title("Loss (dashed: train, solid: valid, star: best)")
    nsdr.set_title("Valid nSDR (dB; squares: test)")
    loss.legend(fontsize="small")
    nsdr.legend(fontsize="small")
    _save(figure, path)


def draw_curves(history: History, folder: Path, metric: str = "loss") -> None:
    """`curves.png` of the XP in `folder`, redrawn after each epoch; a failure to draw
    (matplotlib missing or failing) is a warning, never the end of a training."""
    try:
        plot_history(history, folder / "curves.png", metric, title=f"XP {folder.name}")
    except Exception as error:  # only the picture is lost
        logger.warning("Could not draw curves.png: %s", one_line(error))
