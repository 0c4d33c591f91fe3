"""Write `outputs.tar.gz`: a Dora XP folder holding the argv of known experiments.

The input is a JSON object `{signature: argv}` (e.g. the MDX experiments); each XP
becomes `outputs/xps/SIG/.argv.json`, a JSON list of its argv strings, which is what Dora
needs to find an XP by signature (`dora info -f SIG`, `dora run -f SIG`). The archive is
reproducible: same input, same bytes.

    python -m tools.make_outputs --xps path/to/mdx_xps.json --output outputs.tar.gz
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import sys
import tarfile
import typing as tp
from pathlib import Path

from demucs.errors import report_errors

PROG = "tools.make_outputs"
SIG_PATTERN = re.compile(r"[0-9a-f]{8}")
ROOT = "outputs/xps"


def load_xps(path: Path) -> dict[str, list[str]]:
    """Read and check `{signature: argv}` from a JSON file."""
    xps = json.loads(path.read_text())
    if not isinstance(xps, dict):
        raise ValueError(f"{path}: expected a JSON object {{signature: argv}}.")
    for sig, argv in xps.items():
        if not SIG_PATTERN.fullmatch(sig):
            raise ValueError(f"{path}: {sig!r} is not an 8 hex digits signature.")
        if not isinstance(argv, list) or not all(isinstance(arg, str) for arg in argv):
            raise ValueError(f"{path}: the argv of {sig} must be a list of strings.")
    return xps


def _info(name: str, size: int = 0, folder: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if folder else tarfile.REGTYPE
    info.mode = 0o755 if folder else 0o644
    info.size = size
    info.mtime = 0
    info.uname = info.gname = ""
    return info


def write_archive(xps: tp.Mapping[str, tp.Sequence[str]], output: Path) -> None:
    """Write the XPs as `outputs/xps/SIG/.argv.json` into the tar.gz `output`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for folder in ("outputs", ROOT):
            tar.addfile(_info(folder, folder=True))
        for sig in sorted(xps):
            data = json.dumps(list(xps[sig])).encode()
            tar.addfile(_info(f"{ROOT}/{sig}", folder=True))
            tar.addfile(_info(f"{ROOT}/{sig}/.argv.json", len(data)), io.BytesIO(data))
    with open(output, "wb") as file:
        # mtime=0 and no file name in the gzip header, for reproducible bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=file, mtime=0) as gz:
            gz.write(buffer.getvalue())


def read_archive(path: Path) -> dict[str, list[str]]:
    """The `{signature: argv}` stored in an archive written by `write_archive`."""
    xps = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.isfile() and parts[:2] == ROOT.split("/") and parts[3:] == [".argv.json"]:
                file = tar.extractfile(member)
                assert file is not None
                xps[parts[2]] = json.loads(file.read())
    return xps


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--xps", type=Path, required=True,
                        help="JSON file {signature: argv}, e.g. mdx_xps.json.")
    parser.add_argument("-o", "--output", type=Path, default=Path("outputs.tar.gz"),
                        help="Archive to write (default: outputs.tar.gz).")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Show the full traceback of errors.")
    return parser


def main(argv: tp.Sequence[str] | None = None) -> int:
    """Write the archive and return 0; a bad input file exits with status 1 (one line)."""
    args = get_parser().parse_args(argv)
    with report_errors(PROG, args.verbose, also=(OSError, ValueError)):
        xps = load_xps(args.xps)
        write_archive(xps, args.output)
        print(f"Wrote {len(xps)} XPs to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
