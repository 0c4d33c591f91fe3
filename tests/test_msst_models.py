"""BS-RoFormer, Mel-Band RoFormer and SCNet against MSST's golden cases, and MSST's files
in and out: `tools.import_msst`, `tools.export --msst`, the `demucs` command on an
imported model, and the one-line errors of bad configs and checkpoints."""
from __future__ import annotations

import inspect
import subprocess
import sys
import typing as tp
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml

from demucs import msst
from demucs.apply import apply_model
from demucs.losses import LossOptions, reco_losses
from demucs.models import MODELS
from demucs.states import load_model
from helpers import assert_tensor_close, one_line, read_wav, write_wav

CASES = ["msst_bs_roformer_4stems", "msst_bs_roformer_vocals",
         "msst_mel_band_roformer_4stems", "msst_scnet_4stems"]
FOUR = ["drums", "bass", "other", "vocals"]
Case = tp.Dict[str, tp.Any]


@pytest.fixture(scope="module")
def cases(reference_dir: Path) -> tp.Dict[str, Case]:
    folder = reference_dir / "msst"
    found = {name: torch.load(folder / f"{name}.pt", weights_only=False)
             for name in CASES if (folder / f"{name}.pt").is_file()}
    assert sorted(found) == sorted(CASES), f"missing MSST golden cases in {folder}"
    return found


def case_config(case: Case, full: bool = False) -> tp.Dict[str, tp.Any]:
    """The MSST config.yaml of a golden case (its kwargs, or every default filled in)."""
    section = dict(case["full_kwargs" if full else "kwargs"])
    stems = len(section.get("sources", [])) or section["num_stems"]
    training: tp.Dict[str, tp.Any] = {"instruments": FOUR if stems == 4 else ["vocals", "other"]}
    if stems == 1:
        training["target_instrument"] = "vocals"
    return {"audio": {"chunk_size": case["mix"].shape[-1], "num_channels": 2,
                      "sample_rate": 44100},
            "model": section, "training": training}


def build(case: Case, full: bool = False) -> tp.Any:
    model = MODELS[case["arch"]](**msst.model_kwargs(case["arch"], case_config(case, full)))
    model.load_state_dict(case["state_dict"])
    return model.eval()


def golden_output(case: Case) -> torch.Tensor:
    """MSST's eval output as (B, S, C, T') (its one-stem Mel-Band RoFormer drops S)."""
    output = case["output"]
    return output[:, None] if output.dim() == 3 else output


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("full", [False, True], ids=["kwargs", "full_kwargs"])
def test_forward_matches_msst(name: str, full: bool, cases: tp.Dict[str, Case]) -> None:
    case = cases[name]
    model = build(case, full)
    assert list(model.state_dict()) == list(case["state_dict"])  # MSST's keys, in order
    with torch.no_grad():
        out = model(case["mix"])
    B, C, T = case["mix"].shape
    assert out.shape == (B, len(model.sources), C, T)  # (B, S, C, T) with the input's length
    golden = golden_output(case)
    assert_tensor_close(out[..., :golden.shape[-1]], golden)


@pytest.mark.parametrize("name", [n for n in CASES if "roformer" in n])
def test_roformer_loss_matches_msst(name: str, cases: tp.Dict[str, Case]) -> None:
    case = cases[name]
    if "loss" not in case or case["loss"] is None:
        pytest.fail(f"{name}: the golden case has no loss")
    model = build(case)
    with torch.no_grad():
        estimate = model(case["mix"])
    length = golden_output(case).shape[-1]  # MSST cuts the target to its output's length
    losses, _ = reco_losses("l1_multi_stft", estimate[..., :length],
                            case["target"][..., :length], LossOptions(model.multi_stft))
    golden = case["loss"].item()
    # The Mel-Band RoFormer's golden loss ran MSST's training forward, with its dropout.
    assert abs(losses.mean().item() / golden - 1) < 1e-5


def test_masked_mse_leaves_the_worst_examples_out() -> None:
    """MSST's masked loss: per source, the examples at or above the batch's q-quantile
    count as zero in the mean over the batch."""
    sources = torch.zeros(4, 2, 1, 10)
    estimate = torch.arange(1., 5.)[:, None, None, None].expand(4, 2, 1, 10).clone()
    estimate[:, 1] *= 2
    loss, reco = reco_losses("masked_mse", estimate, sources, LossOptions(q=0.95))
    # squared errors per example: 1, 4, 9, 16 (source 0) and 4, 16, 36, 64 (source 1);
    # the 0.95-quantile lies between the two largest: the largest is left out.
    assert torch.allclose(loss, torch.tensor([(1 + 4 + 9) / 4, (4 + 16 + 36) / 4]))
    assert torch.allclose(reco, torch.tensor([2.5, 5.0]))
    valid, _ = reco_losses("masked_mse", estimate, sources, LossOptions(q=0.95), train=False)
    assert torch.allclose(valid, torch.tensor([30 / 4, 120 / 4]))  # plain mse


def test_mel_bands_are_librosas() -> None:
    """The bands are where librosa's (Slaney) mel filters are positive."""
    librosa = pytest.importorskip("librosa")
    from demucs.mel_roformer import mel_bands
    for rate, n_fft, bands in [(44100, 2048, 60), (44100, 4096, 128), (48000, 2048, 64),
                               (32000, 1024, 32)]:
        ref = torch.from_numpy(librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=bands))
        ref[0, 0] = ref[-1, -1] = 1
        assert torch.equal(mel_bands(rate, n_fft, bands), ref > 0), (rate, n_fft, bands)


# ---------------------------------------------------------------------------------------
# MSST files: config + checkpoint


def write_msst_files(case: Case, folder: Path, wrap: bool = True) -> tp.Tuple[Path, Path]:
    """An MSST config.yaml (tuples as !!python/tuple) and a DDP-wrapped checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    config = case_config(case)
    config["model"] = {key: tuple(value) if key == "freqs_per_bands" else value
                       for key, value in config["model"].items()}
    config["inference"] = {"batch_size": 1, "num_overlap": 4}
    text = yaml.dump(config, sort_keys=False)  # the default dumper writes !!python/tuple
    (folder / "config.yaml").write_text(text)
    state = case["state_dict"]
    if wrap:
        state = {"state_dict": {f"module.{key}": value for key, value in state.items()}}
    torch.save(state, folder / "model.ckpt")
    return folder / "config.yaml", folder / "model.ckpt"


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_read_config_reads_python_tuples_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  freqs_per_bands: !!python/tuple [2, 4]\n")
    assert msst.read_config(path)["model"]["freqs_per_bands"] == [2, 4]
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(msst.MsstError, match="not a readable YAML config"):
        msst.read_config(path)


@pytest.mark.slow
def test_import_then_demucs_separates(cases: tp.Dict[str, Case], tmp_path: Path) -> None:
    """`tools.import_msst` writes a package that `demucs --repo` separates with, as
    MSST's model would (same weights: same output as the golden model on the chunk)."""
    case = cases["msst_bs_roformer_vocals"]
    config, checkpoint = write_msst_files(case, tmp_path / "msst")
    proc = run("tools.import_msst", "--model-type", "bs_roformer", "--config", str(config),
               "--checkpoint", str(checkpoint), "--out", "models/vocals.th", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "demucs --repo models -n vocals TRACK" in proc.stdout
    model = load_model(tmp_path / "models/vocals.th")  # weights_only: safe
    assert model.sources == ["vocals"] and model.samplerate == 44100
    assert model.segment == Fraction(case["mix"].shape[-1], 44100)
    with torch.no_grad():
        assert_tensor_close(model.eval()(case["mix"]), golden_output(case))

    mix = 0.3 * torch.randn(2, 3 * 44100, generator=torch.Generator().manual_seed(0))
    write_wav(tmp_path / "song.wav", mix, 44100, subtype="FLOAT")
    proc = run("demucs", "--repo", "models", "-n", "vocals", "--float32", "--shifts", "0",
               "--two-stems",
               "vocals", "--other-method", "minus", "-o", "separated", "song.wav",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    vocals = read_wav(tmp_path / "separated/vocals/song/vocals.wav")
    assert vocals.shape == mix.shape
    assert (tmp_path / "separated/vocals/song/minus_vocals.wav").is_file()
    with torch.no_grad():  # the command's output is apply_model's on the normalised mix
        ref = mix.mean(0)
        normed = (mix - ref.mean()) / ref.std()
        expected = apply_model(model, normed[None], split=True, overlap=0.25, shifts=0,
                               progress=False)[0, 0] * ref.std() + ref.mean()
    assert (vocals - expected).abs().max() < 1e-3 * expected.abs().max() + 1e-5

    proc = run("demucs", "--repo", "models", "-n", "vocals", "--segment", "5", "song.wav",
               cwd=tmp_path)
    assert proc.returncode == 1
    assert "segment" in one_line(proc.stderr)


@pytest.mark.parametrize("name", CASES)
def test_export_msst_round_trip(name: str, cases: tp.Dict[str, Case], tmp_path: Path) -> None:
    """Our model -> MSST's config.yaml + model.ckpt -> our model again: same kwargs,
    same weights; the config holds only options MSST's constructors know."""
    case = cases[name]
    model = build(case)
    config_path, checkpoint = msst.write_msst(model, tmp_path / "out")
    config = msst.read_config(config_path)
    assert set(config["model"]) <= set(case["full_kwargs"])
    for key, value in config["model"].items():
        assert value == case["full_kwargs"][key], key
    state = torch.load(checkpoint, weights_only=True)
    assert state.keys() == case["state_dict"].keys()
    again: tp.Any = msst.import_model(case["arch"], config_path, checkpoint)
    assert again._init_args_kwargs[1]["sources"] == model.sources
    with torch.no_grad():
        assert torch.equal(again.eval()(case["mix"]), model(case["mix"]))


# ---------------------------------------------------------------------------------------
# Bad input: one line each


def import_error(tmp_path: Path, arch: str, config: Path, checkpoint: Path) -> str:
    with pytest.raises(msst.MsstError) as info:
        msst.import_model(arch, config, checkpoint)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_model_option_is_named(cases: tp.Dict[str, Case], tmp_path: Path) -> None:
    case = cases["msst_bs_roformer_4stems"]
    config, checkpoint = write_msst_files(case, tmp_path)
    data = yaml.load(config.read_text(), Loader=msst.MsstLoader)
    data["model"]["sage_attention"] = True
    config.write_text(yaml.safe_dump(data))
    message = import_error(tmp_path, "bs_roformer", config, checkpoint)
    assert "model.sage_attention is not an option of our bs_roformer" in message


def test_checkpoint_of_another_architecture(cases: tp.Dict[str, Case], tmp_path: Path) -> None:
    config, _ = write_msst_files(cases["msst_bs_roformer_4stems"], tmp_path / "bs")
    _, checkpoint = write_msst_files(cases["msst_scnet_4stems"], tmp_path / "scnet")
    message = import_error(tmp_path, "bs_roformer", config, checkpoint)
    assert message.startswith(f"{checkpoint}: no layers.0.0.layers.0.0.rotary_embed.freqs")


def test_wrong_shape_names_both_shapes(cases: tp.Dict[str, Case], tmp_path: Path) -> None:
    case = cases["msst_bs_roformer_4stems"]
    config, checkpoint = write_msst_files(case, tmp_path, wrap=False)
    data = yaml.load(config.read_text(), Loader=msst.MsstLoader)
    data["model"]["mlp_expansion_factor"] = 4  # the checkpoint's estimators have 1
    config.write_text(yaml.safe_dump(data))
    message = import_error(tmp_path, "bs_roformer", config, checkpoint)
    assert "mask_estimators.0.to_freqs.0.0.0.weight has shape (32, 32), " \
           "the config gives (128, 32)" in message


def test_command_errors_are_one_line(cases: tp.Dict[str, Case], tmp_path: Path) -> None:
    config, checkpoint = write_msst_files(cases["msst_scnet_4stems"], tmp_path)
    proc = run("tools.import_msst", "--model-type", "htdemucs", "--config", str(config),
               "--checkpoint", str(checkpoint), "--out", "x.th", cwd=tmp_path)
    assert proc.returncode == 1
    assert "--model-type 'htdemucs' is not supported" in one_line(proc.stderr)
    checkpoint.write_bytes(b"garbage")
    proc = run("tools.import_msst", "--model-type", "scnet", "--config", str(config),
               "--checkpoint", str(checkpoint), "--out", "x.th", cwd=tmp_path)
    assert proc.returncode == 1
    assert one_line(proc.stderr).startswith(f"tools.import_msst: error: {checkpoint}: "
                                            "cannot load the checkpoint")
    assert not (tmp_path / "x.th").exists()


@pytest.mark.parametrize("name", CASES)
def test_defaults_are_mssts(name: str, cases: tp.Dict[str, Case]) -> None:
    """An option an MSST config leaves out means the same in ours: every default of
    MSST's constructor (in `full_kwargs`, not in `kwargs`) is our class's default."""
    case = cases[name]
    params = inspect.signature(MODELS[case["arch"]]).parameters
    left_out = {key: value for key, value in case["full_kwargs"].items()
                if key not in case["kwargs"] and key not in msst.DERIVED[case["arch"]]}
    assert left_out or case["arch"] == "scnet"
    for key, value in left_out.items():
        default = params[key].default
        assert (list(default) if isinstance(default, tuple) else default) == value, key
