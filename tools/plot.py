"""Draw the training curves of several XPs side by side into one PNG.

    python -m tools.plot SIG [SIG ...] [-o curves.png] [--metric loss]

Each XP is found from its signature in Dora's `outputs/xps/` (as `dora info -f SIG`);
its history is what `dora grid` reads. Each XP also has its own `curves.png`, written
by the solver after every epoch.
"""
from __future__ import annotations

import argparse
import typing as tp
from pathlib import Path

from demucs.curves import plot_histories
from demucs.errors import DemucsError, report_errors
from demucs.train import main as xp_main

PROG = "tools.plot"


def load_histories(sigs: tp.Sequence[str]) -> dict[str, list[dict[str, tp.Any]]]:
    """`{SIG: history}`, refusing an XP that has not trained an epoch yet."""
    histories = {}
    for sig in sigs:
        xp = xp_main.get_xp_from_sig(sig)
        history = xp_main.get_xp_history(xp)
        if not history:
            raise DemucsError(f"XP {sig} has no history yet ({xp.folder}); train it first "
                              f"with `dora run -f {sig}`.")
        histories[sig] = history
    return histories


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description="Draw the training curves of XPs "
                                     "side by side.")
    parser.add_argument("sigs", nargs="+", metavar="SIG", help="Signatures of the XPs.")
    parser.add_argument("-o", "--out", type=Path, default=Path("curves.png"),
                        help="PNG file to write (default: curves.png).")
    parser.add_argument("--metric", default="loss",
                        help="Valid metric that marks the best epoch (default: loss).")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="On an error, also print the traceback.")
    return parser


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    with report_errors(PROG, args.verbose):
        plot_histories(load_histories(args.sigs), args.out, args.metric)
        print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
