"""Export trained XPs as model packages for the `demucs` command.

    python -m tools.export SIG [SIG ...] [-o release_models] [--sign] [--no-half] [--last]

For each XP signature, the XP's solver is rebuilt from its checkpoint and its best state
(`--last`: its last state) is written as a model package `OUT/SIG.th`, or
`OUT/SIG-CHECKSUM.th` with `--sign` (CHECKSUM: the first 8 hex digits of the file's
sha256, checked when the model is loaded). Weights are stored in float16 unless
`--no-half`; an XP trained with DiffQ exports its quantized state. Then

    demucs --repo OUT -n SIG my_track.wav

separates with it, and `OUT/NAME.yaml` files can combine exported models into bags.

    python -m tools.export SIG --msst OUT_DIR

writes instead the files of Music-Source-Separation-Training (MSST) for an XP of one of
its architectures (`model=bs_roformer|mel_band_roformer|scnet`): `OUT_DIR/config.yaml`
and `OUT_DIR/model.ckpt` (the float32 state_dict), which MSST's `inference.py` loads
with `--model_type MODEL --config_path OUT_DIR/config.yaml --start_check_point
OUT_DIR/model.ckpt`.
"""
from __future__ import annotations

import argparse
import sys
import typing as tp
from pathlib import Path

from demucs import train
from demucs.errors import DemucsError, report_errors
from demucs.msst import write_msst
from demucs.repo import split_package_name
from demucs.states import copy_state, save_atomic, save_with_checksum, serialize_model
from demucs.states import swap_state

PROG = "tools.export"


def check_trained(sig: str) -> None:
    """Fail unless the XP `sig` exists and has a checkpoint."""
    xp = train.main.get_xp_from_sig(sig)  # ConfigError for an unknown signature
    checkpoint = xp.folder / "checkpoint.th"
    if not checkpoint.is_file():
        raise DemucsError(f"XP {sig} has no checkpoint ({checkpoint}); train it first with "
                          f"`dora run -f {sig}`.")


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def chosen_state(solver: tp.Any, sig: str, best: bool) -> dict[str, tp.Any]:
    """The best state of the solver (or its last one), warning about unfinished XPs."""
    done, epochs = len(solver.history), int(solver.args.epochs)
    if done < epochs:
        _warn(f"XP {sig} trained {done} of its {epochs} epochs; exporting it anyway.")
    if best and solver.best_state is None:
        _warn(f"XP {sig} has no best state yet; exporting its last state.")
    if best and solver.best_state is not None:
        return solver.best_state
    return copy_state(solver.model.state_dict())


def last_metrics(history: tp.Sequence[tp.Mapping[str, tp.Any]]) -> tuple[tp.Any, tp.Any]:
    """(valid metrics of the last epoch, metrics of the last test), None when absent."""
    valid = next((epoch["valid"] for epoch in reversed(history) if "valid" in epoch), None)
    test = next((epoch["test"] for epoch in reversed(history) if "test" in epoch), None)
    return valid, test


def write_package(solver: tp.Any, state: dict[str, tp.Any], path: Path, half: bool,
                  sign: bool) -> Path:
    """Save the package of `solver.model` with `state` to `path` (or its signed name),
    with `metrics` = (last valid metrics, last test metrics), as the original did."""
    with swap_state(solver.model, state):
        # Saved inside the swap: package tensors may alias the parameters.
        package = serialize_model(solver.model, solver.args, solver.quantizer, half=half)
        package["metrics"] = last_metrics(solver.history)
        if sign:
            return save_with_checksum(package, path)
        save_atomic(package, path)
        return path


def remove_other_exports(out: Path, sig: str, keep: Path) -> None:
    """Delete earlier exports of `sig` (`SIG.th`, `SIG-CHECKSUM.th`): a repo holds one."""
    for path in out.glob(f"{sig}*.th"):
        if path != keep and split_package_name(path.stem)[0] == sig:
            path.unlink()
            print(f"Removed the previous export {path}")


def export(sig: str, out: Path, half: bool = True, best: bool = True,
           sign: bool = False) -> Path:
    """Export the XP `sig` into the folder `out`; returns the path of the package."""
    check_trained(sig)
    solver = train.get_solver_from_sig(sig, model_only=True)
    state = chosen_state(solver, sig, best)
    out.mkdir(parents=True, exist_ok=True)
    path = write_package(solver, state, out / f"{sig}.th", half, sign)
    remove_other_exports(out, sig, path)
    return path


def export_msst(sig: str, out: Path, best: bool = True) -> tp.Tuple[Path, Path]:
    """Write the XP `sig` as MSST's config.yaml and model.ckpt in the folder `out`."""
    check_trained(sig)
    solver = train.get_solver_from_sig(sig, model_only=True)
    state = chosen_state(solver, sig, best)
    with swap_state(solver.model, state):
        return write_msst(solver.model, out)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description="Export trained XPs as model packages "
                                     "for `demucs --repo OUT -n SIG`.")
    parser.add_argument("sigs", nargs="+", metavar="SIG", help="Signatures of the XPs.")
    parser.add_argument("-o", "--out", type=Path, default=Path("release_models"),
                        help="Folder of exported models (default: release_models).")
    parser.add_argument("-s", "--sign", action="store_true",
                        help="Name the packages SIG-CHECKSUM.th (sha256 prefix).")
    parser.add_argument("--half", action=argparse.BooleanOptionalAction, default=True,
                        help="Store the weights in float16 (default) or float32.")
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--best", dest="best", action="store_true", default=True,
                       help="Export the best state (default).")
    state.add_argument("--last", dest="best", action="store_false",
                       help="Export the last state rather than the best one.")
    parser.add_argument("--msst", type=Path, metavar="OUT_DIR",
                        help="Write MSST's config.yaml and model.ckpt in OUT_DIR instead "
                        "of a package (one SIG of model bs_roformer, mel_band_roformer or "
                        "scnet).")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Show the full traceback of errors.")
    return parser


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    with report_errors(PROG, args.verbose):
        if args.msst is not None:
            if len(args.sigs) != 1:
                raise DemucsError("--msst writes one model: give one SIG.")
            config, checkpoint = export_msst(args.sigs[0], args.msst, best=args.best)
            print(f"Exported XP {args.sigs[0]} for MSST: {config} and {checkpoint}")
            return
        for sig in args.sigs:
            path = export(sig, args.out, half=args.half, best=args.best, sign=args.sign)
            print(f"Exported XP {sig} to {path}")


if __name__ == "__main__":
    main()
