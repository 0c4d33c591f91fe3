"""Dora grids: the MDX 2021 experiments, scheduled on Slurm with `dora grid NAME`.

- `mdx`: the Track A models (MusDB HQ only) before fine-tuning, and their DiffQ variants;
- `mdx_extra`: the first stages of the Track B models (extra data), and DiffQ variants;
- `mdx_refine`: the Track A fine-tuning, also from the DiffQ models of `mdx`.

The grids find the MDX experiments by signature in the XP folder: run
`tar xf outputs.tar.gz` at the root of the repository first.
"""
