"""Export a tiny, untrained Hybrid Demucs as a model package, for `make demo`.

    python -m tools.demo --out demo/release_models --name demo_hdemucs

writes `OUT/NAME-CHECKSUM.th` exactly as `tools.export` writes a trained model (a package
made by `demucs.states.serialize_model`, saved by `save_with_checksum`), so that

    demucs --repo OUT -n NAME my_track.wav

runs the real separation command on it. The weights are random (seeded): the stems are
noise-like, the point is the plumbing. Real models come from `dora run` then `tools.export`.
"""
from __future__ import annotations

import argparse
import sys
import typing as tp
from pathlib import Path

import torch

from demucs.errors import DemucsError
from demucs.hdemucs import HDemucs
from demucs.states import save_with_checksum, serialize_model

SOURCES = ["drums", "bass", "other", "vocals"]


def build_model(channels: int = 4, seed: int = 0) -> HDemucs:
    """A small HDemucs with random weights (deterministic for a given seed)."""
    torch.manual_seed(seed)
    return HDemucs(sources=SOURCES, channels=channels, segment=10)


def export_demo_model(out: Path, name: str = "demo_hdemucs", channels: int = 4,
                      seed: int = 0) -> Path:
    """Save the model as `out/name-CHECKSUM.th`, replacing earlier exports of `name`."""
    if channels < 1:
        raise DemucsError(f"--channels must be positive, got {channels}.")
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(channels, seed)
    training_args = {"model": "hdemucs", "hdemucs": {"channels": channels}, "seed": seed,
                     "note": "untrained demo model made by tools.demo"}
    path = save_with_checksum(serialize_model(model, training_args), out / f"{name}.th")
    for old in [out / f"{name}.th", *out.glob(f"{name}-*.th")]:
        if old.exists() and old != path:
            old.unlink()  # a repo must hold one package per name
    return path


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser("tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo/release_models"),
                        help="Repository folder to export into.")
    parser.add_argument("--name", default="demo_hdemucs", help="Model name (signature).")
    parser.add_argument("--channels", type=int, default=4, help="Channels of the first layer.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    args = parser.parse_args(argv)
    try:
        path = export_demo_model(args.out, args.name, args.channels, args.seed)
    except DemucsError as error:
        print(f"tools.demo: error: {error}", file=sys.stderr)
        sys.exit(1)
    size_kb = path.stat().st_size / 1024
    print(f"Exported an untrained HDemucs (channels={args.channels}, {size_kb:.0f} kB) "
          f"to {path}")


if __name__ == "__main__":
    main()
