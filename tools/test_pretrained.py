"""Evaluate a pre-trained model or bag of models on the MusDB HQ test set.

    python -m tools.test_pretrained --repo ./release_models -n my_bag [--musdb PATH]
        [-d DEVICE] [-o FOLDER] [test.shifts=1 test.sdr=false ...]

The test settings come from `conf/config.yaml` (`test.shifts`, `test.split`,
`test.overlap`, `test.workers`, `test.sdr`, `test.save`, ...), changed with Hydra
overrides. The MusDB folder is `--musdb`, else `dset.musdb` (the `MUSDB_PATH` variable).
`test.sdr=true` (the default) also computes the slow museval SDR; `test.sdr=false` only
the MDX nSDR. Prints the metrics per source as a table.
"""
from __future__ import annotations

import argparse
import tempfile
import typing as tp
from pathlib import Path

import torch
from omegaconf import DictConfig

from demucs import train
from demucs.errors import DemucsError, allocation_failed, report_errors
from demucs.evaluate import evaluate, get_test_set
from demucs.pretrained import add_model_flags, get_model_from_args

PROG = "tools.test_pretrained"


def get_config(overrides: tp.Sequence[str], musdb: tp.Optional[Path] = None) -> DictConfig:
    """The training config with `overrides` (Hydra syntax), and `musdb` as dset.musdb."""
    cfg = train.main.get_xp(list(overrides)).cfg
    if musdb is not None:
        cfg.dset.musdb = str(musdb)
    return cfg


def format_table(metrics: tp.Mapping[str, float], sources: tp.Sequence[str]) -> str:
    """One row per source and one for the whole (`all`), one column per metric."""
    names = [name for name in ("nsdr", "sdr", "sir", "isr", "sar") if name in metrics]
    titles = {"nsdr": "nSDR", "sdr": "SDR", "sir": "SIR", "isr": "ISR", "sar": "SAR"}
    lines = [f"{'source':<10}" + "".join(f"{titles[name]:>9}" for name in names)]
    for row, suffix in [(source, f"_{source}") for source in sources] + [("all", "")]:
        lines.append(f"{row:<10}" + "".join(f"{metrics[name + suffix]:>9.3f}" for name in names))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    cfg = get_config(args.overrides, args.musdb)
    model: tp.Any = get_model_from_args(args)  # a model or a bag: any attribute
    print(f"Evaluating {args.name} ({', '.join(model.sources)}) on {cfg.dset.musdb}/test "
          f"with shifts={cfg.test.shifts}, split={cfg.test.split}, overlap={cfg.test.overlap}")
    test_set = get_test_set(cfg, model.sources)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out if args.out is not None else Path(tmp)
        try:
            metrics = evaluate(model, cfg.test, test_set, args.device, folder,
                               compute_sdr=bool(cfg.test.sdr))
        except torch.OutOfMemoryError as error:
            fix = "evaluate on the CPU (-d cpu)"
            if not cfg.test.split:
                fix = f"set test.split=true to separate the tracks in segments, or {fix}"
            raise DemucsError(f"{args.device} out of memory ({allocation_failed(error)}): "
                              f"{fix}.") from error
    print(format_table(metrics, model.sources))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description="Evaluate a model or bag of models "
                                     "on the MusDB HQ test set.")
    add_model_flags(parser)
    parser.add_argument("--musdb", type=Path,
                        help="MusDB HQ folder, holding test/ (default: dset.musdb, which "
                             "reads MUSDB_PATH).")
    parser.add_argument("-d", "--device",
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Device to separate on (default: cuda if available).")
    parser.add_argument("-o", "--out", type=Path,
                        help="Folder for test.save=true (wav/TRACK/SOURCE.wav); default: "
                             "a temporary folder.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="On an error, also print the traceback.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Config overrides, e.g. test.shifts=10 test.sdr=false.")
    return parser


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    with report_errors(PROG, args.verbose):
        if str(args.device).startswith("cuda") and not torch.cuda.is_available():
            raise DemucsError(f"Device {args.device} asked for, but CUDA is not available; "
                              "use -d cpu.")
        run(args)


if __name__ == "__main__":
    main()
