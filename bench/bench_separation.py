"""Separation and training-step speed of full-size models with random weights.

Printed next to the original Demucs v3's figures from the project's first benchmark
(committed on 2026-11-25, b36e7d1, 2 CPU threads on a machine of that time; not measured
in this run, so not a ratio): HDemucs (81de367c config) 0.61 s per second of audio and
6.8 s per training step; Demucs (9357e12e config) 1.36 s/s and 6.5 s per step. Side by side
on one machine the ratios are others (bench/README.md, "Side by side with upstream
Demucs 4.1"). `htdemucs` is the
Demucs v4 model as released (XP 955717e8: the `htdemucs:` section of conf/config.yaml
with the grid mmi's `dconv_mode=3`, `t_dropout=0.02` and `bottom_channels=512`), kept at
its training length of 7.8 s: separation goes through chunks of that length. Every
model takes the same measurement (the training step on 4 s examples).

    python bench/bench_separation.py [--seconds 30] [--steps 2] [--threads 2]
        [--models hdemucs demucs htdemucs]
"""
from __future__ import annotations

import argparse
import random
import time
import typing as tp
from contextlib import nullcontext
from fractions import Fraction
from pathlib import Path

import torch
from omegaconf import OmegaConf

from demucs.apply import apply_model
from demucs.demucs import Demucs
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs

try:  # as this repository's solver trains: the heap kept, Adam's multi-tensor step
    from demucs.utils import freed_memory_kept
    ADAM_FOREACH: tp.Optional[bool] = True
except ImportError:  # another demucs (upstream's, see bench/README.md): as it trains
    freed_memory_kept = nullcontext  # type: ignore[assignment]
    ADAM_FOREACH = None

SOURCES = ["drums", "bass", "other", "vocals"]
# The original v3's figures measured elsewhere (see the docstring; no v4 ones)
ORIGINAL_ELSEWHERE = {"hdemucs": (0.61, 6.8), "demucs": (1.36, 6.5)}
MODELS = ("hdemucs", "demucs", "htdemucs")
CONFIG = Path(__file__).resolve().parents[1] / "conf" / "config.yaml"
# The released `htdemucs` (XP 955717e8, grid mmi): the config section's defaults but these.
HTDEMUCS_RELEASE = {"dconv_mode": 3, "t_dropout": 0.02, "bottom_channels": 512}
HTDEMUCS_SEGMENT = Fraction(39, 5)  # its training length, as its package stores it


def htdemucs_kwargs() -> dict[str, tp.Any]:
    section = tp.cast(dict, OmegaConf.to_container(OmegaConf.load(CONFIG).htdemucs,
                                                   resolve=True))
    return {**section, **HTDEMUCS_RELEASE, "segment": HTDEMUCS_SEGMENT}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "hdemucs":  # the 81de367c configuration
        return HDemucs(SOURCES, channels=48, norm_starts=999, cac=False, hybrid_old=True,
                       dconv_init=1e-3, segment=44)
    if name == "demucs":  # the 9357e12e configuration
        return Demucs(SOURCES, channels=64, rewrite=False, normalize=True, segment=44)
    if name == "htdemucs":
        return HTDemucs(SOURCES, **htdemucs_kwargs())
    raise ValueError(f"Unknown model {name!r}, use one of {', '.join(MODELS)}.")


def time_separation(model: torch.nn.Module, seconds: float) -> float:
    mix = torch.randn(1, 2, int(seconds * 44100))
    random.seed(0)
    begin = time.perf_counter()
    apply_model(model.eval(), mix, shifts=1, split=True, overlap=0.25)
    return (time.perf_counter() - begin) / seconds


def adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer as the training makes it."""
    return torch.optim.Adam(model.parameters(), lr=3e-4, foreach=ADAM_FOREACH)


def time_training_step(model: torch.nn.Module, steps: int) -> float:
    model.train()
    optim = adam(model)
    batch = torch.randn(2, 4, 2, 4 * 44100)  # (B, S, C, T)
    durations = []
    with freed_memory_kept():
        for _ in range(steps):
            begin = time.perf_counter()
            estimate = model(batch.sum(dim=1))
            loss = torch.nn.functional.l1_loss(estimate, batch)
            optim.zero_grad()
            loss.backward()
            optim.step()
            durations.append(time.perf_counter() - begin)
    return min(durations)


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.seconds:.0f} s of audio")
    for name in args.models:
        model = build(name)
        sep = time_separation(model, args.seconds)  # first: training changes an HTDemucs'
        step = time_training_step(model, args.steps)  # segment to its examples' length
        line = f"{name:8s} separation {sep:.3f} s/s | train step {step:.2f} s"
        if name in ORIGINAL_ELSEWHERE:
            ref_sep, ref_step = ORIGINAL_ELSEWHERE[name]
            line += (f" (original v3 on another machine, 2026-11-25: {ref_sep} s/s, "
                     f"{ref_step} s)")
        print(line)


if __name__ == "__main__":
    main()
