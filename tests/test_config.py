"""The Hydra configuration and the builders of demucs.train (no subprocess here)."""
from __future__ import annotations

import copy
import json
import typing as tp
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from demucs import checks, train
from demucs.demucs import Demucs
from demucs.errors import ConfigError
from demucs.hdemucs import HDemucs
from demucs.train import main
from helpers import new_xp
from tools.synth_dataset import generate_dataset

# Keys whose values are ours to choose (dataset locations).
PATH_KEYS = {"dset.musdb", "dset.wav", "dset.wav2", "dset.metadata"}
SMALL_HDEMUCS = ["model=hdemucs", "hdemucs.channels=4", "hdemucs.depth=4",
                 "hdemucs.nfft=512", "model_segment=1"]


def flatten(data: tp.Mapping[str, tp.Any], prefix: str = "") -> dict[str, tp.Any]:
    out: dict[str, tp.Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def parse_facts(lines: tp.Iterable[str]) -> dict[str, str]:
    """`key = repr(value)` lines into {key: repr}."""
    facts = {}
    for line in lines:
        key, sep, value = line.partition(" = ")
        if sep:
            facts[key] = value
    return facts


def parse_groups(text: str) -> dict[str, dict[str, str]]:
    """config_groups.txt: {'dset/aetl': {key: repr}, ...}."""
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("## group "):
            current = groups.setdefault(line.split()[2].removesuffix(".yaml"), [])
        else:
            current.append(line)
    return {name: parse_facts(lines) for name, lines in groups.items()}


# Keys of ours beyond the original's (see docs/training.md), with their defaults: being
# defaults, they enter no signature.
OUR_KEYS = {"optim.amp": "None", "optim.accumulate": "1", "optim.cuda_graph": "False",
            "optim.loss_q": "0.95"}
# The sections of MSST's architectures (docs/training.md, "Training RoFormers and SCNet").
OUR_SECTIONS = ("bs_roformer", "mel_band_roformer", "scnet")


def parse_v4_delta(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """config_defaults_v4_delta.txt: ({added key: repr}, {changed key: v4 repr})."""
    added, changed = {}, {}
    for line in text.splitlines():
        kind, _, fact = line.partition(" ")
        if kind == "+":
            added.update(parse_facts([fact]))
        elif kind == "~":
            changed.update(parse_facts([fact.partition("   (v3: ")[0]]))
    return added, changed


def as_facts(data: tp.Mapping[str, tp.Any]) -> dict[str, str]:
    return {key: repr(value) for key, value in flatten(data).items()}


def without_paths(facts: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in facts.items() if key not in PATH_KEYS}


def base_config() -> dict[str, tp.Any]:
    return tp.cast(dict, OmegaConf.to_container(main._base_cfg, resolve=True))


@pytest.fixture(scope="module")
def v4_delta(reference_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    return parse_v4_delta((reference_dir / "v4" / "config_defaults_v4_delta.txt").read_text())


def test_defaults_match_reference(reference_dir: Path,
                                  v4_delta: tuple[dict[str, str], dict[str, str]]) -> None:
    """The v3 base config (same keys in the same order) plus the keys and changes of v4."""
    lines = (reference_dir / "config_defaults.txt").read_text().splitlines()
    v3 = parse_facts(lines)
    added, changed = v4_delta
    assert added and len(changed) == 2 and set(changed) <= set(v3)
    assert not set(added) & set(v3)
    ours = {key: value for key, value in as_facts(base_config()).items()
            if key.split(".")[0] not in OUR_SECTIONS}
    assert [key for key in ours if key in v3] == list(v3)
    assert [key for key in ours if key in added] == list(added)
    assert set(ours) == set(v3) | set(added) | set(OUR_KEYS)
    expected = {**v3, **changed, **added, **OUR_KEYS}
    assert without_paths(ours) == without_paths(expected)


def test_changed_v4_defaults_stay_out_of_signatures(
        v4_delta: tuple[dict[str, str], dict[str, str]]) -> None:
    """The two defaults v4 changes are Dora settings and Slurm settings, never hashed."""
    _, changed = v4_delta
    assert set(changed) == {"dora.exclude", "slurm.setup"}
    for key in ["dset.backend", "slurm.setup", "dora.exclude"]:
        assert main.dora.is_excluded(key), key
    assert main.get_xp(["dset.backend=soundfile"]).sig == main.get_xp([]).sig


@pytest.mark.parametrize("facts_file", ["config_groups.txt", "v4/config_groups_v4.txt"])
def test_groups_match_reference(reference_dir: Path, facts_file: str) -> None:
    expected = parse_groups((reference_dir / facts_file).read_text())
    assert expected
    for name, facts in expected.items():
        content = OmegaConf.load(checks.CONFIG_DIR / f"{name}.yaml")
        ours = as_facts(tp.cast(dict, OmegaConf.to_container(content) or {}))
        assert set(ours) == set(facts), name
        assert without_paths(ours) == without_paths(facts), name


def test_group_files() -> None:
    assert checks.group_choices("dset") == [
        "aetl", "auto_extra", "auto_extra_test", "auto_mus", "extra44", "extra_mmi_goodclean",
        "extra_test", "musdb44", "sdx23_bleeding", "sdx23_labelnoise"]
    assert checks.group_choices("svd") == ["base", "base2", "default"]
    assert checks.group_choices("variant") == ["default", "example", "finetune"]
    auto_extra = OmegaConf.load(checks.CONFIG_DIR / "dset" / "auto_extra.yaml")
    assert auto_extra.dset.wav is not None


def test_hydra_settings_are_explicit() -> None:
    config = OmegaConf.load(checks.CONFIG_DIR / "config.yaml")
    assert config.hydra.job.chdir is False
    assert train.HYDRA_VERSION_BASE == "1.3"
    assert main.hydra_kwargs == {"version_base": "1.3"}
    with initialize_config_dir(str(checks.CONFIG_DIR), version_base="1.3"):
        full = compose("config", return_hydra_config=True)
    assert full.hydra.job.chdir is False
    choices = full.hydra.runtime.choices
    assert choices["hydra/job_logging"] == choices["hydra/hydra_logging"] == "colorlog"
    assert (choices.dset, choices.svd, choices.variant) == ("musdb44", "default", "default")


def test_composition_has_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        main.get_xp(["dset=extra44", "variant=finetune", "model=hdemucs"])


def test_paths_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["dset=auto_mus", "model=hdemucs"]
    sig = main.get_xp(argv).sig
    monkeypatch.setenv("MUSDB_PATH", "/somewhere/musdb")
    monkeypatch.setenv("AUTOMIX_MUSDB_PATH", "/somewhere/automix")
    monkeypatch.setenv("METADATA_PATH", "/somewhere/metadata")
    xp = main.get_xp(argv)
    assert xp.cfg.dset.musdb == "/somewhere/musdb"
    assert xp.cfg.dset.wav == "/somewhere/automix"
    assert xp.cfg.dset.metadata == "/somewhere/metadata"
    assert xp.sig == sig


@pytest.mark.parametrize("arg, key, choice", [
    ("dset=musdb", "dset='musdb'", "musdb44"),
    ("svd=base3", "svd='base3'", "base2"),
    ("variant=mine", "variant='mine'", "finetune"),
    ("model=tasnet", "model='tasnet'", "hdemucs"),
    ("optim.optim=sgd", "optim.optim='sgd'", "adamw"),
    ("optim.loss=l3", "optim.loss='l3'", "mse"),
])
def test_bad_choices(arg: str, key: str, choice: str) -> None:
    with pytest.raises(ConfigError, match="choose one of") as error:
        main.get_xp([arg])
    assert key in str(error.value) and choice in str(error.value)


def test_unknown_key() -> None:
    with pytest.raises(ConfigError, match="foo.bar"):
        main.get_xp(["foo.bar=1"])


def cfg_of(*argv: str) -> DictConfig:
    return main.get_xp(list(argv)).cfg


def test_dataset_paths(tmp_path: Path) -> None:
    cfg = cfg_of(f"dset.musdb={tmp_path}")
    checks.check_dataset_paths(cfg.dset)
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=f"dset.musdb='{missing}'"):
        checks.check_dataset_paths(cfg_of(f"dset.musdb={missing}").dset)
    with pytest.raises(ConfigError, match=f"dset.wav='{missing}'"):
        checks.check_dataset_paths(cfg_of(f"dset.musdb={tmp_path}", f"dset.wav={missing}").dset)


@pytest.mark.parametrize("name, klass", [("adam", torch.optim.Adam),
                                         ("adamw", torch.optim.AdamW)])
def test_optimizer(name: str, klass: type) -> None:
    model = torch.nn.Linear(3, 2)
    cfg = cfg_of(f"optim.optim={name}", "optim.lr=0.01", "optim.weight_decay=0.5",
                 "svd=base")
    loop = klass(copy.deepcopy(model).parameters(), lr=0.01, betas=(0.9, 0.9998),
                 weight_decay=0.5, foreach=False)
    optimizer = train.get_optimizer(model, cfg)
    assert type(optimizer) is klass
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.5
    assert group["betas"] == (0.9, 0.9998)
    # The multi-tensor step gives what PyTorch's default loop over the parameters gives.
    torch.manual_seed(0)
    params = [group["params"], loop.param_groups[0]["params"]]
    for _ in range(3):
        grads = [torch.randn_like(param) for param in params[0]]
        for group_params in params:
            for param, grad in zip(group_params, grads):
                param.grad = grad.clone()
        optimizer.step()
        loop.step()
    assert group["foreach"]
    assert all(torch.equal(a, b) for a, b in zip(*params))


def test_optimizer_unknown() -> None:
    cfg = cfg_of()
    cfg.optim.optim = "sgd"
    with pytest.raises(ConfigError, match="optim.optim='sgd'.*adam, adamw"):
        train.get_optimizer(torch.nn.Linear(3, 2), cfg)


def test_get_model_unknown() -> None:
    cfg = cfg_of()
    cfg.model = "tasnet"
    with pytest.raises(ConfigError, match="model='tasnet'.*demucs, hdemucs"):
        train.get_model(cfg)


def test_get_model_hdemucs() -> None:
    cfg = cfg_of(*SMALL_HDEMUCS, "dset.sources=[drums,bass]")
    model = train.get_model(cfg)
    assert type(model) is HDemucs
    assert model.sources == ["drums", "bass"]
    assert model.audio_channels == 2 and model.samplerate == 44100 and model.segment == 1


def test_get_model_demucs() -> None:
    cfg = cfg_of("demucs.channels=4", "demucs.depth=2", "dset.segment=2")
    model = train.get_model(cfg)
    assert type(model) is Demucs
    assert model.segment == 8  # 4 * dset.segment


def test_show(capsys: pytest.CaptureFixture[str]) -> None:
    train.run(cfg_of(*SMALL_HDEMUCS, "misc.show=1", "dset.musdb=/nowhere"))
    out = capsys.readouterr().out
    assert out.startswith("HDemucs(")
    assert "Size: " in out and " MB" in out


def test_show_receptive_field(capsys: pytest.CaptureFixture[str]) -> None:
    class Tiny(torch.nn.Linear):
        def valid_length(self, length: int) -> int:
            return length + 441
    train.show_model(Tiny(256, 256, bias=False), 44100)
    out = capsys.readouterr().out
    assert "Size: 0.2 MB" in out and "Field: 10.0 ms" in out


def test_unknown_signature() -> None:
    with pytest.raises(ConfigError, match="unknown XP signature 'deadbeef'"):
        train.get_solver_from_sig("deadbeef")


def test_model_kwargs_match_reference(reference_dir: Path) -> None:
    """The golden models were built from these XPs: same class, same arguments."""
    manifest = json.loads((reference_dir / "golden" / "manifest.json").read_text())
    assert manifest
    for case in manifest:
        cfg = cfg_of(*case["xp_argv"])
        assert cfg.model == case["model"], case["name"]
        kwargs = train.get_model_kwargs(cfg)
        assert kwargs == case["kwargs"], case["name"]
        assert list(kwargs) == list(case["kwargs"]), case["name"]


def test_golden_models_build(reference_dir: Path) -> None:
    manifest = json.loads((reference_dir / "golden" / "manifest.json").read_text())
    for case in manifest:
        model = train.get_model(cfg_of(*case["xp_argv"]))
        assert len(model.state_dict()) == case["num_state_tensors"], case["name"]


class FakeSolver:
    """Stands for demucs.solver.Solver: records what get_solver gives it."""

    def __init__(self, loaders: tp.Any, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, cfg: DictConfig,
                 find_xp: tp.Callable[[str], Path] | None = None) -> None:
        self.loaders, self.model, self.optimizer, self.cfg = loaders, model, optimizer, cfg
        self.find_xp = find_xp


@pytest.fixture
def fake_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train, "Solver", FakeSolver)
    monkeypatch.setattr(train, "get_model", lambda cfg: torch.nn.Linear(2, 2))


def test_solver_from_sig(fake_solver: None, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    xp = new_xp(["optim.optim=adamw", "svd=base"])
    solver = train.get_solver_from_sig(xp.sig)
    assert isinstance(solver, FakeSolver) and solver.loaders is None
    assert isinstance(solver.optimizer, torch.optim.AdamW)
    assert solver.cfg.optim.beta2 == 0.9998


def test_solver_loaders(fake_solver: None, tmp_path: Path) -> None:
    generate_dataset(tmp_path / "musdb", tracks=3, seconds=3, valid_tracks=1,
                     test_tracks=0)
    cfg = cfg_of(f"dset.musdb={tmp_path / 'musdb'}", f"dset.metadata={tmp_path / 'meta'}",
                 "dset.segment=1", "batch_size=2", "misc.num_workers=0",
                 "augment.repitch.proba=0")
    solver = train.get_solver(cfg)
    assert solver.loaders is not None
    batch = next(iter(solver.loaders["train"]))
    assert batch.shape == (2, 4, 2, 44100)  # (B, S, C, T)
    track = next(iter(solver.loaders["valid"]))
    assert track.shape[:3] == (1, 5, 2)  # the mixture first, then the sources
