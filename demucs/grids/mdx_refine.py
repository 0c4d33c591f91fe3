"""Track A fine-tuning on automix, from the models of the `mdx` grid.

Each Track A model is scheduled as is, then for each DiffQ penalty with that penalty and
`continue_from` its quantized parent from `mdx`: the `mdx` grid must have finished.
"""
from dora import Launcher

from ..train import main
from ._explorers import MyExplorer
from ._mdx import DIFFQ, TRACK_A, finetuned_from, lookup, quantized, require_trained, slurm_params


def _plan() -> list[list[str]]:
    # Every argv to schedule, checked before anything is scheduled.
    plan = []
    for sig in TRACK_A:
        xp = lookup(sig)
        base = finetuned_from(xp)
        plan.append(list(xp.argv))
        for diffq in DIFFQ:
            source = quantized(base, diffq)
            require_trained(source, f"mdx_refine (fine-tuning {sig} with quant.diffq={diffq})")
            plan.append(list(xp.argv) + main.value_to_argv(
                {"quant.diffq": diffq, "continue_from": source.sig}))
    return plan


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(**slurm_params())
    for argv in _plan():
        launcher(argv)
