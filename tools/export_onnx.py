"""Export a model package or bag as ONNX graphs, to run without PyTorch.

    python -m tools.export_onnx NAME_OR_PKG -o DIR [--repo REPO] [--segment SECONDS]

NAME_OR_PKG is what `demucs -n` takes: a model name or signature (of `--repo`, or of the
remote list), or the path of a `.th` package or a `.yaml` bag. Writes into DIR one graph
per model (`model_0.onnx`, ...) and `demucs_onnx.json` (docs/onnx.md says what they
hold and how to run them); DiffQ packages are exported dequantized. The STFT and
inverse STFT stay outside the graphs. Then

    demucs --backend onnxruntime -n DIR my_track.wav

separates with them (or `--backend openvino`). A model with an option that a graph
cannot hold is one line naming the option, and nothing is written.
"""
from __future__ import annotations

import argparse
import typing as tp
from pathlib import Path

from demucs.errors import report_errors
from demucs.graphs import MANIFEST, export
from demucs.options import seconds_or_none
from demucs.pretrained import get_model_from_args

PROG = "tools.export_onnx"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description="Export a model or bag as ONNX graphs "
                                     "(the STFT outside), for `demucs --backend onnxruntime`.")
    parser.add_argument("model", metavar="NAME_OR_PKG",
                        help="Model name or signature, or the path of a .th package or "
                             ".yaml bag.")
    parser.add_argument("--repo", type=Path,
                        help="Folder holding exported models (SIG.th) and bags (NAME.yaml).")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help=f"Folder to write the graphs and {MANIFEST} into.")
    parser.add_argument("--segment", type=float,
                        help="Chunk length in seconds the graphs run on (default: each "
                             "model's segment; at most its training length for HTDemucs).")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Show the full traceback of errors.")
    return parser


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    with report_errors(PROG, args.verbose):
        segment = seconds_or_none("--segment", args.segment)
        args.name = args.model
        model = get_model_from_args(args)
        manifest = export(model, args.out, segment)
        for graph in manifest.graphs:
            print(f"Wrote {args.out / graph.file}: chunks of {graph.length} samples "
                  f"({graph.segment:g} s)")
        print(f"Wrote {args.out / MANIFEST}")


if __name__ == "__main__":
    main()
