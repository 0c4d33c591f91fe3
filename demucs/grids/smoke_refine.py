"""Fine-tuning of the `smoke` XPs: each one `continue_from` a finished `smoke` XP.

Every XP of `smoke` must have trained all its epochs (the grid says which has not). Each
fine-tuning starts from the best state of its parent and trains 2 epochs at a lower
learning rate, with the Slurm settings of `smoke`.
"""
from __future__ import annotations

from dora import Launcher

from ..train import main
from ._explorers import MyExplorer
from ._mdx import require_trained
from .smoke import experiments, slurm

FINE_TUNING = {"epochs": 2, "optim.lr": 1e-4}


def _plan() -> list[list[str]]:
    # Every argv to schedule, checked before anything is scheduled.
    plan = []
    for overrides in experiments():
        parent = main.get_xp(main.value_to_argv(overrides))
        require_trained(parent, "smoke_refine", grid="smoke")
        plan.append(list(parent.argv) + main.value_to_argv(
            {**FINE_TUNING, "continue_from": parent.sig}))
    return plan


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(**slurm())
    for argv in _plan():
        launcher(argv)
