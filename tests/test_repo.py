"""Model repositories: local packages and bags, the remote repo over HTTP, pretrained names."""
from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import typing as tp
from pathlib import Path

import pytest
import torch
import yaml

from demucs import pretrained
from demucs.apply import BagOfModels
from demucs.errors import ModelLoadingError
from demucs.hdemucs import HDemucs
from demucs.repo import (AnyModelRepo, BagOnlyRepo, ChainRepo, LocalRepo, RemoteRepo,
                         check_checksum, file_sha256, read_bag, split_package_name)
from demucs.states import save_with_checksum, serialize_model

from helpers import SOURCES, imported_modules, same_state, tiny_hdemucs


def tiny_model(seed: int = 0, sources: tp.Sequence[str] = SOURCES) -> HDemucs:
    return tiny_hdemucs(seed, sources, segment=1)


def export(model: torch.nn.Module, folder: Path, name: str, checksum: bool = True) -> Path:
    package = serialize_model(model, {"model": "hdemucs"}, half=False)
    if checksum:
        return save_with_checksum(package, folder / f"{name}.th")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(package, folder / f"{name}.th")
    return folder / f"{name}.th"


@pytest.fixture(scope="module")
def models() -> list[HDemucs]:
    return [tiny_model(seed) for seed in range(3)]


@pytest.fixture
def local_repo(tmp_path: Path, models: list[HDemucs]) -> Path:
    repo = tmp_path / "release_models"
    export(models[0], repo, "aaaa1111")
    export(models[1], repo, "bbbb2222")
    export(models[2], repo, "plain", checksum=False)
    return repo


def test_split_package_name() -> None:
    assert split_package_name("81de367c-0f06f20e") == ("81de367c", "0f06f20e")
    assert split_package_name("81de367c") == ("81de367c", None)
    assert split_package_name("my-model") == ("my-model", None)
    assert split_package_name("my-model-0123abcd") == ("my-model", "0123abcd")


def test_local_repo_loads_models(local_repo: Path, models: list[HDemucs]) -> None:
    repo = LocalRepo(local_repo)
    assert sorted(repo.list_model()) == ["aaaa1111", "bbbb2222", "plain"]
    assert repo.has_model("aaaa1111") and not repo.has_model("cccc3333")
    loaded = repo.get_model("bbbb2222")
    assert isinstance(loaded, HDemucs)
    assert same_state(loaded, models[1])
    assert same_state(repo.get_model("plain"), models[2])


def test_checksum_mismatch_is_refused(local_repo: Path) -> None:
    path = next(local_repo.glob("aaaa1111-*.th"))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadingError, match=f"Checksum mismatch for .*{path.name}"):
        LocalRepo(local_repo).get_model("aaaa1111")
    with pytest.raises(ModelLoadingError, match="expected"):
        check_checksum(path, path.stem.rsplit("-", 1)[1])


def test_local_repo_errors(tmp_path: Path, local_repo: Path) -> None:
    with pytest.raises(ModelLoadingError, match="not a directory"):
        LocalRepo(tmp_path / "missing")
    shutil.copy(next(local_repo.glob("aaaa1111-*.th")), local_repo / "aaaa1111.th")
    with pytest.raises(ModelLoadingError, match="Duplicate model aaaa1111"):
        LocalRepo(local_repo)


def write_bag(folder: Path, name: str, content: tp.Any) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content) if not isinstance(content, str) else content)
    return path


def test_bag_from_yaml(local_repo: Path, models: list[HDemucs]) -> None:
    weights = [[1.0, 1.0, 0.0, 0.5], [0.0, 1.0, 1.0, 0.5]]
    write_bag(local_repo, "my_bag", {"models": ["aaaa1111", "bbbb2222"], "weights": weights,
                                     "segment": 0.5})
    repo = pretrained.get_local_repo(local_repo)
    bag = repo.get_model("my_bag")
    assert isinstance(bag, BagOfModels)
    assert bag.weights == weights
    assert len(bag.models) == 2 and all(m.segment == 0.5 for m in bag.models)
    assert same_state(bag.models[0], models[0]) and same_state(bag.models[1], models[1])
    assert bag.sources == SOURCES
    # Without weights every model counts fully, and the models keep their own segment.
    write_bag(local_repo, "plain_bag", {"models": ["plain"]})
    bag = pretrained.get_model("plain_bag", repo=local_repo)
    assert isinstance(bag, BagOfModels)
    assert bag.weights == [[1.0] * 4]
    assert bag.models[0].segment == 1


def test_the_golden_bag_loads(tmp_path: Path, reference_dir: Path) -> None:
    golden = reference_dir / "golden"
    for name in ["pub_81de367c.th", "pub_80a68df8.th", "bag_pair.yaml"]:
        shutil.copy(golden / name, tmp_path / name)
    bag = pretrained.get_model("bag_pair", repo=tmp_path)
    assert isinstance(bag, BagOfModels)
    assert len(bag.models) == 2
    assert bag.weights == [[1.0, 1.0, 0.0, 0.5], [0.0, 1.0, 1.0, 0.5]]


@pytest.mark.parametrize("content,match", [
    ("models: [aaaa1111\n", "cannot be read as yaml"),
    ({"weights": [[1.0]]}, "models"),
    ({"models": []}, "non-empty list"),
    ({"models": ["aaaa1111"], "weights": [[1, 1, 1, 1], [1, 1, 1, 1]]}, "weights"),
    ({"models": ["aaaa1111"], "weights": [["a", 1, 1, 1]]}, "weights"),
    ({"models": ["aaaa1111"], "segment": -2}, "segment"),
    ({"models": ["aaaa1111"], "segmnet": 8}, "unknown keys"),
    ({"models": ["aaaa1111", "zzzz9999"]}, "zzzz9999 not found"),
    ({"models": ["aaaa1111"], "weights": [[1, 1]]}, "one weight per source"),
])
def test_invalid_bags(local_repo: Path, content: tp.Any, match: str) -> None:
    write_bag(local_repo, "bad", content)
    with pytest.raises(ModelLoadingError, match=match) as info:
        pretrained.get_model("bad", repo=local_repo)
    assert "bad.yaml" in str(info.value)
    assert "\n" not in str(info.value)


def test_bag_of_models_with_different_sources(local_repo: Path) -> None:
    export(tiny_model(0, sources=["vocals", "accompaniment"]), local_repo, "twostems")
    write_bag(local_repo, "mixed", {"models": ["aaaa1111", "twostems"]})
    with pytest.raises(ModelLoadingError, match="mixed.yaml.*sources"):
        pretrained.get_model("mixed", repo=local_repo)
    assert read_bag(local_repo / "mixed.yaml").models == ["aaaa1111", "twostems"]


def test_unknown_name_lists_available(local_repo: Path) -> None:
    write_bag(local_repo, "my_bag", {"models": ["aaaa1111"]})
    with pytest.raises(ModelLoadingError) as info:
        pretrained.get_model("nope", repo=local_repo)
    message = str(info.value)
    assert "'nope'" in message
    for name in ["my_bag", "aaaa1111", "bbbb2222", "plain"]:
        assert name in message


def test_model_before_bag(local_repo: Path, models: list[HDemucs]) -> None:
    write_bag(local_repo, "aaaa1111", {"models": ["bbbb2222"]})
    models_repo = LocalRepo(local_repo)
    repo = AnyModelRepo(models_repo, BagOnlyRepo(local_repo, models_repo))
    assert repo.has_model("aaaa1111")
    assert same_state(repo.get_model("aaaa1111"), models[0])


# Remote repository, served by a local HTTP server.
Server = tuple[str, Path, list[str]]  # base URL, served folder, requested paths


@pytest.fixture
def server(tmp_path: Path) -> tp.Iterator[Server]:
    root = tmp_path / "www"
    root.mkdir()
    requests: tp.List[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args: tp.Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/models/", root, requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_remote_repo_downloads_once(server: Server, hub: Path,
                                    models: list[HDemucs]) -> None:
    url, root, requests = server
    path = export(models[0], root / "models", "cafe0001")
    repo = RemoteRepo.from_files(url, [path.name])
    assert repo.has_model("cafe0001")
    model = repo.get_model("cafe0001")
    assert same_state(model, models[0])
    assert (hub / path.name).is_file()
    assert file_sha256(hub / path.name) == file_sha256(path)
    assert [p.name for p in hub.iterdir()] == [path.name]  # nothing left half-written
    repo.get_model("cafe0001")
    assert requests == [f"/models/{path.name}"]
    # A corrupt cached copy is downloaded again.
    (hub / path.name).write_bytes(b"garbage")
    assert same_state(repo.get_model("cafe0001"), models[0])
    assert len(requests) == 2


def test_remote_checksum_mismatch(server: Server, hub: Path, models: list[HDemucs]) -> None:
    url, root, _ = server
    path = export(models[0], root / "models", "cafe0001")
    wrong = path.with_name("cafe0001-00000000.th")
    path.rename(wrong)
    repo = RemoteRepo.from_files(url, [wrong.name])
    with pytest.raises(ModelLoadingError, match="cafe0001-00000000.th.*corrupt"):
        repo.get_model("cafe0001")
    assert not hub.exists() or list(hub.iterdir()) == []


def test_remote_missing_file(server: Server, hub: Path) -> None:
    url, _, _ = server
    repo = RemoteRepo.from_files(url, ["dead0000-12345678.th"])
    with pytest.raises(ModelLoadingError, match="Could not download .*dead0000-12345678.th"):
        repo.get_model("dead0000")
    with pytest.raises(ModelLoadingError, match="beef"):
        repo.get_model("beef")


def test_remote_bags(server: Server, hub: Path, models: list[HDemucs],
                     tmp_path: Path) -> None:
    url, root, _ = server
    names = [export(m, root / "models", f"cafe000{i}").name for i, m in enumerate(models[:2])]
    files = tmp_path / "files.txt"
    files.write_text("# test models\nroot: https://example.invalid/\n" + "\n".join(names) + "\n")
    bags = tmp_path / "bags"
    bags.mkdir()
    write_bag(bags, "duo", {"models": ["cafe0000", "cafe0001"], "segment": 0.5})
    repo = pretrained.get_remote_repo(root_url=url, files=files, bags=bags)
    assert repo.names() == ["duo", "cafe0000", "cafe0001"]
    bag = repo.get_model("duo")
    assert isinstance(bag, BagOfModels) and len(bag.models) == 2
    assert sorted(p.name for p in hub.iterdir()) == sorted(names)


MDX_ROOT = "https://dl.fbaipublicfiles.com/demucs/mdx_final/"
V4_ROOT = "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/"
V4_FILES = {  # upstream Demucs 4.1 remote/files.txt
    "955717e8-8726e21a.th", "f7e0c4bc-ba3fe64a.th", "d12395a8-e57c48e6.th",
    "92cfc3b6-ef3bcb9c.th", "04573f0d-f3cf25b2.th", "75fc33f5-1941ce65.th",
    "5c90dfd2-34c22ccb.th"}


def test_default_remote_repo_matches_reference(reference_dir: Path) -> None:
    """The MDX part is the original's remote.json exactly; the v4 models are added."""
    reference = json.loads((reference_dir / "remote.json").read_text())
    repo = pretrained.get_remote_repo()
    urls = repo.model_repo.list_model()
    expected = {name.split("-")[0]: reference["root_url"] + name for name in reference["files"]}
    expected.update({name.split("-")[0]: V4_ROOT + name for name in V4_FILES})
    assert urls == expected
    assert reference["root_url"] == MDX_ROOT
    assert pretrained.DEFAULT_MODEL == reference["default_model"] == "mdx_extra_q"
    bags = repo.bag_repo.list_model()
    v4_bags = ["hdemucs_mmi", "htdemucs", "htdemucs_6s", "htdemucs_ft"]
    assert sorted(bags) == sorted([*reference["bags"], *v4_bags])
    for name, content in reference["bags"].items():
        spec = read_bag(bags[name])
        assert spec.models == content["models"] and spec.segment == content["segment"]
        assert spec.weights == content.get("weights")


def test_remote_v4_bags() -> None:
    bags = pretrained.get_remote_repo().bag_repo.list_model()
    assert read_bag(bags["htdemucs"]).models == ["955717e8"]
    assert read_bag(bags["htdemucs_6s"]).models == ["5c90dfd2"]
    mmi = read_bag(bags["hdemucs_mmi"])
    assert mmi.models == ["75fc33f5"] and mmi.segment == 44
    ft = read_bag(bags["htdemucs_ft"])
    assert ft.models == ["f7e0c4bc", "d12395a8", "92cfc3b6", "04573f0d"]
    assert ft.segment is None
    assert ft.weights == [[float(i == j) for j in range(4)] for i in range(4)]  # one-hot


def test_remote_root_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pretrained.REMOTE_ENV, "http://mirror.example/demucs")
    urls = pretrained.get_remote_repo().model_repo.list_model()
    assert urls["e51eebcc"] == "http://mirror.example/demucs/e51eebcc-c1b80bdd.th"


def test_unknown_pretrained_name() -> None:
    with pytest.raises(ModelLoadingError, match="Unknown model 'nope'.*mdx_extra_q"):
        pretrained.get_model("nope")


def test_files_list_needs_a_root() -> None:
    with pytest.raises(ModelLoadingError, match="root"):
        pretrained.parse_files_list("a-12345678.th\n")


@pytest.mark.slow
def test_separation_path_imports_no_training_stack() -> None:
    loaded = imported_modules("demucs.separate", "demucs.api", "demucs.pretrained",
                              "demucs.repo", "demucs.audio")
    training = {"hydra", "dora", "omegaconf", "museval", "musdb", "submitit", "treetable"}
    ours = {"demucs.train", "demucs.solver", "demucs.wav", "demucs.evaluate", "demucs.augment",
            "demucs.repitch"}
    assert not {m for m in loaded if m.split(".")[0] in training or m in ours}


def test_model_file_paths(tmp_path: Path, local_repo: Path, models: list[HDemucs]) -> None:
    package = next(local_repo.glob("bbbb2222-*.th"))
    assert same_state(pretrained.get_model(str(package)), models[1])
    assert same_state(pretrained.get_model(str(local_repo / "plain.th")), models[2])
    assert pretrained.model_label(package) == "bbbb2222"
    assert pretrained.model_label("mdx_extra_q") == "mdx_extra_q"
    # A bag file: models from its own folder, or from `repo`.
    write_bag(local_repo, "pair", {"models": ["aaaa1111", "plain"]})
    bag = pretrained.get_model(str(local_repo / "pair.yaml"))
    assert isinstance(bag, BagOfModels) and same_state(bag.models[1], models[2])
    elsewhere = write_bag(tmp_path, "pair2", {"models": ["bbbb2222"]})
    bag = pretrained.get_model(str(elsewhere), repo=local_repo)
    assert isinstance(bag, BagOfModels) and same_state(bag.models[0], models[1])
    assert pretrained.model_label(elsewhere) == "pair2"
    with pytest.raises(ModelLoadingError, match="pair2.yaml.*bbbb2222 not found"):
        pretrained.get_model(str(elsewhere))


def test_model_file_errors(tmp_path: Path, local_repo: Path) -> None:
    with pytest.raises(ModelLoadingError, match="nothere.th is not found"):
        pretrained.get_model(str(tmp_path / "nothere.th"))
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ModelLoadingError, match="folder.yaml is not a file"):
        pretrained.get_model(str(tmp_path / "folder.yaml"))
    package = next(local_repo.glob("aaaa1111-*.th"))
    data = bytearray(package.read_bytes())
    data[-100] ^= 0xFF
    package.write_bytes(bytes(data))
    with pytest.raises(ModelLoadingError, match="Checksum mismatch"):
        pretrained.get_model(str(package))


def test_chain_repo_searches_in_order(server: Server, hub: Path, local_repo: Path,
                                      models: list[HDemucs]) -> None:
    url, root, requests = server
    remote_file = export(models[2], root / "models", "aaaa1111")  # shadowed by the local one
    other = export(models[2], root / "models", "cafe0001")
    chain = ChainRepo([LocalRepo(local_repo),
                       RemoteRepo.from_files(url, [remote_file.name, other.name])])
    assert chain.has_model("cafe0001") and not chain.has_model("nope")
    assert same_state(chain.get_model("aaaa1111"), models[0])
    assert requests == []
    assert same_state(chain.get_model("cafe0001"), models[2])
    assert chain.list_model()["aaaa1111"].endswith(".th") and \
        not chain.list_model()["aaaa1111"].startswith("http")
    with pytest.raises(ModelLoadingError, match="nope"):
        chain.get_model("nope")


def test_list_models_describes_each_name(local_repo: Path) -> None:
    write_bag(local_repo, "pair", {"models": ["aaaa1111", "bbbb2222"]})
    write_bag(local_repo, "broken", "models: [\n")
    infos = pretrained.list_models(local_repo)
    described = [(info.name, info.describe()) for info in infos]
    assert described[0][0] == "broken" and described[0][1].startswith("invalid bag (")
    assert described[1:] == [("pair", "bag of 2 models"), ("aaaa1111", "single model"),
                             ("bbbb2222", "single model"), ("plain", "single model")]
    assert infos[1].bag and infos[1].size == 2 and infos[1].source.endswith("pair.yaml")
    remote = {info.name: info for info in pretrained.list_models()}
    assert remote["htdemucs_ft"].describe() == "bag of 4 models"
    assert remote["955717e8"].source == V4_ROOT + "955717e8-8726e21a.th"
