"""Track A of MDX 2021: the four models before fine-tuning, and their DiffQ variants.

`dora grid mdx --dry_run --init` lists them without scheduling anything.
"""
from dora import Launcher

from ._explorers import MyExplorer
from ._mdx import DIFFQ, TRACK_A, finetuned_from, slurm_params


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(**slurm_params())
    for sig in TRACK_A:
        base = finetuned_from(sig)
        launcher(base.argv)
        for diffq in DIFFQ:
            launcher(base.argv, {"quant.diffq": diffq})
