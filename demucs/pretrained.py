"""Pre-trained models: resolve a model or bag name to a loaded model.

Names are looked up in a local repository folder when one is given (`--repo DIR`, e.g. the
`release_models/` folder that `tools.export` fills), else in the remote repository of the
released models (`demucs/remote/files.txt` and the bags `demucs/remote/*.yaml`: the MDX 2021
bags and the v4 models). The remote base URL can be replaced with the `DEMUCS_REMOTE_ROOT`
environment variable (a mirror holding every file in one folder, or a local server in tests).

A name ending in `.th` or `.yaml` is a path: a model package, or a bag whose models are
looked up in `--repo` (default: the bag's own folder), then in the remote repository.
"""
from __future__ import annotations

import argparse
import os
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import ModelLoadingError
from .repo import (AnyModelRepo, BagOnlyRepo, ChainRepo, LocalRepo, RemoteRepo, check_checksum,
                   load_bag, read_bag, split_package_name)
from .states import load_model

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


def is_model_file(name: PathLike) -> bool:
    """True when `name` names a model package (`.th`) or bag (`.yaml`) file, not a name."""
    return Path(name).suffix.lower() in (".th", ".yaml")


def model_label(name: PathLike) -> str:
    """The name of a model for output folders: a file's signature or bag name."""
    if not is_model_file(name):
        return str(name)
    return split_package_name(Path(name).stem)[0]


def load_model_file(path: PathLike, repo: tp.Optional[PathLike] = None) -> nn.Module:
    """Load a package `SIG[-CHECKSUM].th` (checksum verified) or a bag `NAME.yaml`, whose
    models come from `repo` (default: the bag's folder), then from the remote repo."""
    path = Path(path)
    if not path.is_file():
        what = "a file" if path.exists() else "found"
        raise ModelLoadingError(f"Model file {path} is not {what}.")
    if path.suffix.lower() == ".th":
        _, checksum = split_package_name(path.stem)
        if checksum is not None:
            check_checksum(path, checksum)
        return load_model(path)
    local = LocalRepo(repo if repo is not None else path.parent)
    return load_bag(path, ChainRepo([local, get_remote_repo().model_repo]))


def get_model(name: str, repo: tp.Optional[PathLike] = None) -> nn.Module:
    """Load the model or bag of models `name`, from the folder `repo` or the remote repo;
    `name` may also be the path of a `.th` package or a `.yaml` bag (`load_model_file`)."""
    if is_model_file(name):
        model = load_model_file(name, repo)
        model.eval()
        return model
    any_repo = get_local_repo(repo) if repo is not None else get_remote_repo()
    if not any_repo.has_model(name):
        where = f"in {repo}" if repo is not None else "among the pre-trained models"
        available = ", ".join(any_repo.names()) or "none"
        raise ModelLoadingError(f"Unknown model {name!r} {where}; available: {available}.")
    model = any_repo.get_model(name)
    model.eval()
    return model


@dataclass
class ModelInfo:
    """One entry of a repository listing: a single model, or a bag of `size` models."""
    name: str
    bag: bool
    source: str  # the package path or URL, or the bag's yaml file
    size: int = 1
    problem: tp.Optional[str] = None  # why a bag file cannot be used, if it cannot

    def describe(self) -> str:
        if self.problem is not None:
            return f"invalid bag ({self.problem})"
        if self.bag:
            return f"bag of {self.size} model{'s' if self.size != 1 else ''}"
        return "single model"


def _bag_info(name: str, path: str) -> ModelInfo:
    try:
        size = len(read_bag(path).models)
    except ModelLoadingError as error:
        return ModelInfo(name, True, path, 0, str(error).rstrip("."))
    return ModelInfo(name, True, path, size)


def list_models(repo: tp.Optional[PathLike] = None) -> tp.List[ModelInfo]:
    """The bags (sorted) then the single models (sorted) of `repo` or the remote repo;
    bag files are read (not their models) to count their models."""
    any_repo = get_local_repo(repo) if repo is not None else get_remote_repo()
    bags = any_repo.bag_repo.list_model()
    singles = any_repo.model_repo.list_model()
    return ([_bag_info(name, bags[name]) for name in sorted(bags)] +
            [ModelInfo(name, False, singles[name]) for name in sorted(singles)])


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Add `-n/--name` and `--repo` to `parser`."""
    parser.add_argument("-n", "--name", default=DEFAULT_MODEL,
                        help="Pretrained model name or signature, or the path of a model "
                             f"package (.th) or bag (.yaml); default {DEFAULT_MODEL}.")
    parser.add_argument("--repo", type=Path,
                        help="Folder holding exported models (SIG.th) and bags (NAME.yaml).")


def get_model_from_args(args: argparse.Namespace) -> nn.Module:
    """Load the model named by `args.name` (and `args.repo`), see `add_model_flags`."""
    name = getattr(args, "name", None) or DEFAULT_MODEL
    return get_model(name, repo=getattr(args, "repo", None))
