"""Import a model of Music-Source-Separation-Training (MSST) as one of our packages.

    python -m tools.import_msst --model-type bs_roformer --config config.yaml \
        --checkpoint model.ckpt --out release_models/my_roformer.th [--sign]

`--model-type` is MSST's (`bs_roformer`, `mel_band_roformer`, `scnet`), the config its
YAML (read safely, `!!python/tuple` included), the checkpoint its state_dict file. The
package (float32 weights unless `--half`; `--sign` names it NAME-CHECKSUM.th) then works
as any other: `demucs --repo release_models -n my_roformer track.wav`,
`demucs.pretrained.load_model`, bags, `continue_pretrained=PATH.th` to fine-tune it (the
command prints the `dora run` overrides that build the same model). Its `training_args`
keep the MSST config it came from.
"""
from __future__ import annotations

import argparse
import typing as tp
from pathlib import Path

from torch import nn

from demucs import train
from demucs.errors import DemucsError, report_errors
from demucs.msst import ARCHS, import_model, model_arch, read_config
from demucs.states import save_atomic, save_with_checksum, serialize_model
from demucs.weights import package_overrides

PROG = "tools.import_msst"


def import_package(arch: str, config: Path, checkpoint: Path, out: Path, half: bool = False,
                   sign: bool = False) -> tp.Tuple[Path, nn.Module]:
    """Write the package of the MSST model (`config`, `checkpoint`) to `out`; returns its
    path and the model."""
    if out.suffix != ".th":
        raise DemucsError(f"--out {out}: a package file ends with .th.")
    model = import_model(arch, config, checkpoint)
    package = serialize_model(model, {"msst": {"model_type": arch, **read_config(config)}},
                              half=half)
    out.parent.mkdir(parents=True, exist_ok=True)
    if sign:
        return save_with_checksum(package, out), model
    save_atomic(package, out)
    return out, model


def finetune_overrides(model: nn.Module) -> tp.List[str]:
    """The `dora run` overrides that build `model` (`model=...`, its section's keys that
    differ from the defaults, `dset.sources`, `weights`), to fine-tune its package."""
    arch = model_arch(model)
    return [f"model={arch}",
            *package_overrides(model, train.main.get_xp([f"model={arch}"]).cfg)]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description="Import an MSST model (config + "
                                     "checkpoint) as a Demucs model package.")
    parser.add_argument("--model-type", required=True, metavar="ARCH",
                        help=f"MSST's --model_type: {', '.join(ARCHS)}.")
    parser.add_argument("--config", required=True, type=Path, help="MSST's config.yaml.")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="MSST's checkpoint (.ckpt, .pth, .th).")
    parser.add_argument("--out", required=True, type=Path, help="The package to write (.th).")
    parser.add_argument("--half", action="store_true", help="Store the weights in float16.")
    parser.add_argument("-s", "--sign", action="store_true",
                        help="Name the package NAME-CHECKSUM.th (sha256 prefix).")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Show the full traceback of errors.")
    return parser


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    with report_errors(PROG, args.verbose):
        path, model = import_package(args.model_type, args.config, args.checkpoint,
                                     args.out, half=args.half, sign=args.sign)
        print(f"Imported the {args.model_type} of {args.checkpoint} as {path}.")
        print(f"Separate with: demucs --repo {path.parent} -n {path.stem} TRACK")
        overrides = " ".join(finetune_overrides(model))
        print(f"Fine-tune with: dora run {overrides} continue_pretrained={path.resolve()}")


if __name__ == "__main__":
    main()
