"""Track B of MDX 2021: the first training stage of the four models, with extra data.

For each model, its root XP is trained on the extra data (`dset=extra44`), and on the
extra data plus the MusDB test set (`dset=extra_test`), alone and with DiffQ.
"""
from dora import Launcher

from ._explorers import MyExplorer
from ._mdx import DIFFQ, TRACK_B, lookup, root, slurm_params


@MyExplorer
def explorer(launcher: Launcher) -> None:
    launcher.slurm_(**slurm_params())
    for sig in TRACK_B:
        argv = root(lookup(sig)).argv
        launcher(argv, {"dset": "extra44"})
        launcher(argv, {"dset": "extra_test"})
        for diffq in DIFFQ:
            launcher(argv, {"dset": "extra_test", "quant.diffq": diffq})
