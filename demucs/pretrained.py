"""Pre-trained models: resolve a model or bag name to a loaded model.

Names are looked up in a local repository folder when one is given (`--repo DIR`, e.g. the
`release_models/` folder that `tools.export` fills), else in the remote repository of the
MDX 2021 models (`demucs/remote/files.txt` and the bags `demucs/remote/*.yaml`).
The remote base URL can be replaced with the `DEMUCS_REMOTE_ROOT` environment variable
(a mirror, or a local server in tests).
"""
from __future__ import annotations

import argparse
import os
import typing as tp
from pathlib import Path

from torch import nn

from .errors import ModelLoadingError
from .repo import AnyModelRepo, BagOnlyRepo, LocalRepo, RemoteRepo, split_package_name

DEFAULT_MODEL = "mdx_extra_q"
REMOTE_ROOT = Path(__file__).parent / "remote"
REMOTE_ENV = "DEMUCS_REMOTE_ROOT"

PathLike = tp.Union[str, Path]


def parse_files_list(text: str, root_url: tp.Optional[str] = None) -> tp.Dict[str, str]:
    """Parse a `files.txt`: `root: URL` lines set the base URL of the file names below.

    `root_url`, when given, replaces every `root:` value. Returns `{file name: URL}`.
    """
    urls: tp.Dict[str, str] = {}
    current: tp.Optional[str] = root_url
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("root:"):
            current = root_url or line[len("root:"):].strip()
            continue
        if current is None:
            raise ModelLoadingError(f"files list line {number}: {line!r} comes before any "
                                    "`root:` line.")
        urls[line] = current.rstrip("/") + "/" + line
    return urls


def get_remote_repo(root_url: tp.Optional[str] = None,
                    files: tp.Optional[PathLike] = None,
                    bags: tp.Optional[PathLike] = None) -> AnyModelRepo:
    """The remote repository: packages from `files`, bags `*.yaml` from the `bags` folder."""
    files = Path(files) if files is not None else REMOTE_ROOT / "files.txt"
    bags = Path(bags) if bags is not None else REMOTE_ROOT
    root_url = root_url or os.environ.get(REMOTE_ENV) or None
    urls = parse_files_list(files.read_text(), root_url)
    model_repo = RemoteRepo(_by_signature(urls))
    return AnyModelRepo(model_repo, BagOnlyRepo(bags, model_repo))


def _by_signature(urls: tp.Mapping[str, str]) -> tp.Dict[str, str]:
    return {split_package_name(Path(name).stem)[0]: url for name, url in urls.items()}


def get_local_repo(repo: PathLike) -> AnyModelRepo:
    """A folder of packages (`SIG.th`, `SIG-CHECKSUM.th`) and bags (`NAME.yaml`)."""
    model_repo = LocalRepo(repo)
    return AnyModelRepo(model_repo, BagOnlyRepo(repo, model_repo))


def get_model(name: str, repo: tp.Optional[PathLike] = None) -> nn.Module:
    """Load the model or bag of models `name`, from the folder `repo` or the remote repo."""
    any_repo = get_local_repo(repo) if repo is not None else get_remote_repo()
    if not any_repo.has_model(name):
        where = f"in {repo}" if repo is not None else "among the pre-trained models"
        available = ", ".join(any_repo.names()) or "none"
        raise ModelLoadingError(f"Unknown model {name!r} {where}; available: {available}.")
    model = any_repo.get_model(name)
    model.eval()
    return model


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Add `-n/--name` and `--repo` to `parser`."""
    parser.add_argument("-n", "--name", default=DEFAULT_MODEL,
                        help=f"Pretrained model name or signature (default {DEFAULT_MODEL}).")
    parser.add_argument("--repo", type=Path,
                        help="Folder holding exported models (SIG.th) and bags (NAME.yaml).")


def get_model_from_args(args: argparse.Namespace) -> nn.Module:
    """Load the model named by `args.name` (and `args.repo`), see `add_model_flags`."""
    name = getattr(args, "name", None) or DEFAULT_MODEL
    return get_model(name, repo=getattr(args, "repo", None))
