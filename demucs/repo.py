"""Model repositories: where the `demucs` command finds models and bags of models.

- A *local* repository is a folder of model packages named `SIG.th` or `SIG-CHECKSUM.th`
  (CHECKSUM being the first 8 hex digits of the file's sha256, checked on load), as
  `tools.export` and `demucs.states.save_with_checksum` write them.
- A *remote* repository is a list of URLs of such packages. Files are downloaded once into
  the torch hub cache (`torch.hub.get_dir()/checkpoints`), their checksum verified.
- A *bag* repository is a folder of `NAME.yaml` files listing models of another repository
  (`models: [...]`, optional per-model, per-source `weights: [[...], ...]` and `segment:`).

`AnyModelRepo` combines a model repository and a bag repository: a name is looked up as a
single model first, then as a bag; `ChainRepo` searches several model repositories in
order. Every failure raises `ModelLoadingError`.
"""
from __future__ import annotations

import hashlib
import re
import typing as tp
import urllib.error
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from .bag import BagOfModels
from .errors import ModelLoadingError
from .states import load_model

PathLike = tp.Union[str, Path]
CHECKSUM_RE = re.compile(r"^(?P<sig>.+)-(?P<checksum>[0-9a-f]{8})$")
HASH_CHUNK = 1 << 20


def split_package_name(stem: str) -> tp.Tuple[str, tp.Optional[str]]:
    """`'81de367c-ab12cd34'` -> `('81de367c', 'ab12cd34')`, `'81de367c'` -> (.., None)."""
    match = CHECKSUM_RE.match(stem)
    if match is None:
        return stem, None
    return match.group("sig"), match.group("checksum")


def file_sha256(path: PathLike) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(HASH_CHUNK), b""):
            sha.update(chunk)
    return sha.hexdigest()


def check_checksum(path: PathLike, checksum: str) -> None:
    """Raise `ModelLoadingError` unless the file's sha256 starts with `checksum`."""
    actual = file_sha256(path)[:len(checksum)]
    if actual != checksum:
        raise ModelLoadingError(
            f"Checksum mismatch for {path}: expected {checksum}, got {actual}; the file is "
            "corrupt or was modified, delete it and download or export it again.")


class ModelOnlyRepo(ABC):
    """A repository of single models, addressed by signature."""

    @abstractmethod
    def has_model(self, sig: str) -> bool:
        ...

    @abstractmethod
    def get_model(self, sig: str) -> nn.Module:
        ...

    @abstractmethod
    def list_model(self) -> tp.Dict[str, str]:
        """Map each signature to where it comes from (a path or a URL)."""


class LocalRepo(ModelOnlyRepo):
    """Model packages `SIG.th` / `SIG-CHECKSUM.th` in a folder."""

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ModelLoadingError(f"Model repository {self.root} is not a directory.")
        self._models: tp.Dict[str, tp.Tuple[Path, tp.Optional[str]]] = {}
        for path in sorted(self.root.glob("*.th")):
            sig, checksum = split_package_name(path.stem)
            if sig in self._models:
                other = self._models[sig][0]
                raise ModelLoadingError(
                    f"Duplicate model {sig} in {self.root}: {other.name} and {path.name}; "
                    "remove one of them.")
            self._models[sig] = (path, checksum)

    def has_model(self, sig: str) -> bool:
        return sig in self._models

    def get_model(self, sig: str) -> nn.Module:
        if sig not in self._models:
            raise ModelLoadingError(f"Could not find model {sig} in {self.root}.")
        path, checksum = self._models[sig]
        if checksum is not None:
            check_checksum(path, checksum)
        return load_model(path)

    def list_model(self) -> tp.Dict[str, str]:
        return {sig: str(path) for sig, (path, _) in self._models.items()}


def _cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download(url: str, dest: Path, checksum: tp.Optional[str]) -> None:
    """Download `url` to `dest` atomically (temp file then move), with a progress bar."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=checksum, progress=True)
    except (urllib.error.URLError, OSError) as error:
        raise ModelLoadingError(f"Could not download {url}: {error}; check the network "
                                "connection, or use --repo with a folder of models.") from None
    except RuntimeError as error:  # raised by torch.hub on a hash mismatch
        raise ModelLoadingError(f"Downloaded {url} is corrupt: {error}") from None


class RemoteRepo(ModelOnlyRepo):
    """Packages downloaded from URLs into the torch hub cache, then loaded safely."""

    def __init__(self, models: tp.Mapping[str, str]) -> None:
        self._models = dict(models)

    @classmethod
    def from_files(cls, root_url: str, files: tp.Iterable[str]) -> "RemoteRepo":
        """Build from a base URL and package file names (`SIG-CHECKSUM.th`)."""
        root_url = root_url if root_url.endswith("/") else root_url + "/"
        models = {}
        for name in files:
            sig, _ = split_package_name(Path(name).stem)
            models[sig] = root_url + name
        return cls(models)

    def has_model(self, sig: str) -> bool:
        return sig in self._models

    def get_model(self, sig: str) -> nn.Module:
        if sig not in self._models:
            raise ModelLoadingError(f"Could not find pre-trained model {sig}.")
        url = self._models[sig]
        filename = url.rsplit("/", 1)[-1]
        _, checksum = split_package_name(Path(filename).stem)
        dest = _cache_dir() / filename
        if dest.exists() and checksum is not None and \
                file_sha256(dest)[:len(checksum)] != checksum:
            dest.unlink()  # a corrupt cached copy is downloaded again
        if not dest.exists():
            _download(url, dest, checksum)
        return load_model(dest)

    def list_model(self) -> tp.Dict[str, str]:
        return dict(self._models)


@dataclass
class BagSpec:
    """The content of a bag yaml file."""
    models: tp.List[str]
    weights: tp.Optional[tp.List[tp.List[float]]] = None
    segment: tp.Optional[float] = None


def _fail(path: Path, reason: str) -> tp.NoReturn:
    raise ModelLoadingError(f"Invalid bag of models {path}: {reason}.")


def _is_number(value: tp.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_bag(path: PathLike) -> BagSpec:
    """Read and validate a bag yaml file."""
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        _fail(path, f"cannot be read as yaml ({str(error).splitlines()[0]})")
    if not isinstance(content, dict) or "models" not in content:
        _fail(path, "expected a mapping with a `models:` list")
    models = content["models"]
    if not isinstance(models, list) or not models or \
            not all(isinstance(m, (str, int)) for m in models):
        _fail(path, "`models` must be a non-empty list of model signatures")
    weights = content.get("weights")
    if weights is not None:
        if not isinstance(weights, list) or len(weights) != len(models) or not all(
                isinstance(w, list) and all(_is_number(x) for x in w) for w in weights):
            _fail(path, f"`weights` must be a list of {len(models)} lists of numbers, one per "
                  "model, each with one weight per source")
    segment = content.get("segment")
    if segment is not None and (not _is_number(segment) or segment <= 0):
        _fail(path, f"`segment` must be a positive number of seconds, got {segment!r}")
    unknown = set(content) - {"models", "weights", "segment"}
    if unknown:
        _fail(path, f"unknown keys {sorted(unknown)}, expected models, weights, segment")
    return BagSpec([str(m) for m in models], weights, segment)


def load_bag(path: PathLike, model_repo: ModelOnlyRepo) -> nn.Module:
    """The `BagOfModels` described by the yaml file `path`, its models from `model_repo`."""
    path = Path(path)
    spec = read_bag(path)
    missing = [sig for sig in spec.models if not model_repo.has_model(sig)]
    if missing:
        _fail(path, f"model(s) {', '.join(missing)} not found; export them first")
    models = [model_repo.get_model(sig) for sig in spec.models]
    try:
        return BagOfModels(models, spec.weights, spec.segment)
    except (ValueError, AssertionError) as error:
        _fail(path, str(error) or "the models do not fit together")


class ChainRepo(ModelOnlyRepo):
    """Several model repositories searched in order (e.g. a local folder, then remote)."""

    def __init__(self, repos: tp.Sequence[ModelOnlyRepo]) -> None:
        self.repos = list(repos)

    def has_model(self, sig: str) -> bool:
        return any(repo.has_model(sig) for repo in self.repos)

    def get_model(self, sig: str) -> nn.Module:
        for repo in self.repos:
            if repo.has_model(sig):
                return repo.get_model(sig)
        raise ModelLoadingError(f"Could not find model {sig}.")

    def list_model(self) -> tp.Dict[str, str]:
        models: tp.Dict[str, str] = {}
        for repo in reversed(self.repos):
            models.update(repo.list_model())
        return models


class BagOnlyRepo:
    """Bags of models `NAME.yaml` in a folder, their models taken from `model_repo`."""

    def __init__(self, root: PathLike, model_repo: ModelOnlyRepo) -> None:
        self.root = Path(root)
        self.model_repo = model_repo
        self._bags = {path.stem: path for path in sorted(self.root.glob("*.yaml"))}

    def has_model(self, name: str) -> bool:
        return name in self._bags

    def get_model(self, name: str) -> nn.Module:
        if name not in self._bags:
            raise ModelLoadingError(f"Could not find bag of models {name} in {self.root}.")
        return load_bag(self._bags[name], self.model_repo)

    def list_model(self) -> tp.Dict[str, str]:
        return {name: str(path) for name, path in self._bags.items()}


class AnyModelRepo:
    """Look a name up as a single model first, then as a bag of models."""

    def __init__(self, model_repo: ModelOnlyRepo, bag_repo: BagOnlyRepo) -> None:
        self.model_repo = model_repo
        self.bag_repo = bag_repo

    def has_model(self, name_or_sig: str) -> bool:
        return self.model_repo.has_model(name_or_sig) or self.bag_repo.has_model(name_or_sig)

    def get_model(self, name_or_sig: str) -> nn.Module:
        if self.model_repo.has_model(name_or_sig):
            return self.model_repo.get_model(name_or_sig)
        if self.bag_repo.has_model(name_or_sig):
            return self.bag_repo.get_model(name_or_sig)
        raise ModelLoadingError(
            f"Unknown model {name_or_sig!r}; available: {', '.join(self.names()) or 'none'}.")

    def names(self) -> tp.List[str]:
        return sorted(self.bag_repo.list_model()) + sorted(self.model_repo.list_model())

    def list_model(self) -> tp.Dict[str, str]:
        return {**self.model_repo.list_model(), **self.bag_repo.list_model()}
