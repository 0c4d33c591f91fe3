"""ONNX graphs and their runners (demucs/graphs.py, demucs/backends.py, tools/export_onnx.py).

Agreement with the torch path: max|runner - torch| <= 1e-4 * max|torch| (its scale), on
the whole output. An HTDemucs graph runs on fixed-length chunks, as the torch path does;
the graphs of the v3 models (HDemucs, Demucs) take any (valid) length, so that the
runners chunk, shift and pad as the torch path does (the last, shorter chunk run short;
random shifts within each chunk).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from demucs.apply import BagOfModels, apply_model
from demucs.backends import GraphRunner, cache_root, load_runners, model_key
from demucs.bag import sub_models
from demucs.errors import ConfigError, ModelLoadingError
from demucs.graphs import MANIFEST, Core, Manifest, export
from demucs.states import load_model, save_atomic, serialize_model

from helpers import (REPO, SOURCES, noise, normalized, one_line, read_wav, skip_or_fail,
                     tiny_demucs, tiny_hdemucs, tiny_htdemucs, write_wav)

RUNTIMES = ["onnxruntime", "openvino"]
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def runtimes_installed() -> None:
    """The extras (`pip install .[onnx,openvino]`, which `make install` does); without
    them these tests skip, except on CI."""
    for package in ["onnx", "onnxscript", *RUNTIMES]:
        try:
            __import__(package)
        except ImportError:
            skip_or_fail(f"{package} is not installed (pip install .[onnx,openvino])")


def assert_scaled_close(ours: torch.Tensor, torch_out: torch.Tensor, scale: float,
                        factor: float = 1.) -> None:
    assert ours.shape == torch_out.shape, (ours.shape, torch_out.shape)
    error = (ours - torch_out).abs().max().item() / scale
    assert error <= factor * TOLERANCE, f"error {error:.3g} of the scale"


class TorchSession:
    """The graph's computation run by torch itself, as a runtime session."""

    def __init__(self, model: nn.Module):
        self.core = Core(model).eval()

    def run(self, inputs: tp.Dict[str, np.ndarray]) -> tp.List[np.ndarray]:
        state = random.getstate()  # the runner makes the forward's draws (Graph.draws)
        with torch.no_grad():
            outputs = self.core(*(torch.from_numpy(value) for value in inputs.values()))
        random.setstate(state)
        return [out.numpy() for out in outputs]

    def shapes(self) -> tp.Dict[str, tp.List[tp.Optional[int]]]:
        return {}


def torch_runner(model: nn.Module, folder: Path) -> nn.Module:
    """The runners of the graphs in `folder`, the graphs computed by torch."""
    manifest = Manifest.read(folder)
    runners = [GraphRunner(manifest, graph, TorchSession(member))
               for member, graph in zip(sub_models(model), manifest.graphs)]
    if isinstance(model, BagOfModels):
        return BagOfModels(runners, model.weights)
    return runners[0]


def separate(model: nn.Module, mix: torch.Tensor, shifts: int = 0,
             split: bool = True) -> torch.Tensor:
    """`apply_model` as the golden files were made: (C, T) -> (S, C, T)."""
    random.seed(1234)
    return apply_model(model, mix[None], shifts=shifts, split=split, overlap=0.25)[0]


def check_runtimes(folder: Path, mix: torch.Tensor, torch_out: torch.Tensor,
                   factor: float = 1., shifts: int = 0, split: bool = True) -> None:
    """Each runtime's output agrees with `torch_out` (the torch path, `shifts`, `split`)
    on the whole track."""
    scale = torch_out.abs().max().item()
    for backend in RUNTIMES:
        out = separate(load_runners(folder, backend), mix, shifts, split)
        assert_scaled_close(out, torch_out, scale, factor)


# ---------------------------------------------------------------------------------------
# Every golden package, v3 and v4

V3 = ["pub_81de367c", "pub_80a68df8", "pub_e51eebcc", "pub_9357e12e", "pub_default_hdemucs",
      "pub_hd_wiener", "pub_hd_spec_only", "pub_hd_chtime_d5", "pub_demucs_lstm",
      "pub_81de367c_diffq", "pub_81de367c_half"]
V4 = ["v4_htdemucs", "v4_htdemucs_6s", "v4_htdemucs_bottom", "v4_htdemucs_wiener",
      "v4_htdemucs_exported"]
# Wiener filtering amplifies float rounding (tests/test_golden.py gives it 2.5x too).
NOISY = {"pub_hd_wiener": 2.5}


def golden_bag(folder: Path, name: str) -> nn.Module:
    spec = yaml.safe_load((folder / f"{name}.yaml").read_text())
    models = [load_model(folder / f"{member}.th").eval() for member in spec["models"]]
    return BagOfModels(models, spec["weights"], spec.get("segment"))


# A case takes 40 to 75 s here, most of it exporting a full-size model (two passes over
# its graph: the long sums', then the exporter's); a bag exports each of its models
# (bag_pair 154 s here, over pytest's 300 s in CI).
@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", V3 + V4 + ["bag_pair", "v4_bag"])
def test_golden_packages_separate_as_in_torch(name: str, reference_dir: Path,
                                              tmp_path: Path) -> None:
    folder = reference_dir / ("v4/golden" if name.startswith("v4") else "golden")
    model = (golden_bag(folder, name) if name.endswith("bag") or name == "bag_pair"
             else load_model(folder / f"{name}.th").eval())
    io_file = folder / f"{name.removesuffix('_half')}.io.pt"
    mix = normalized(torch.load(io_file)["mix"])
    export(model, tmp_path / "graphs")
    check_runtimes(tmp_path / "graphs", mix, separate(model, mix), NOISY.get(name, 1.))


# ---------------------------------------------------------------------------------------
# Tiny random models of each class

# (A small Demucs and HDemucs of the defaults' kinds: `v3_bag` below.)
TINY: tp.Dict[str, tp.Callable[[], nn.Module]] = {
    "hdemucs_spec_only_wiener": lambda: tiny_hdemucs(samplerate=8000, segment=0.5,
                                                     hybrid=False, cac=False, nfft=1024,
                                                     depth=4, wiener_iters=1),
    "htdemucs": lambda: tiny_htdemucs(),
    "htdemucs_masks_cape": lambda: tiny_htdemucs(cac=False, t_emb="cape"),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name == "htdemucs"
                                                else [pytest.mark.slow]) for name in TINY])
def test_tiny_models_separate_as_in_torch(name: str, tmp_path: Path) -> None:
    model: tp.Any = TINY[name]().eval()
    mix = noise(2, int(1.3 * model.samplerate), seed=1)
    manifest = export(model, tmp_path / "graphs")
    assert [graph.file for graph in manifest.graphs] == ["model_0.onnx"]
    check_runtimes(tmp_path / "graphs", mix, separate(model, mix))


# Small v3 models of each class, with a BLSTM (framed on long inputs) and attention in
# their DConvs: `segment` 0.5 s at 8 kHz.
SMALL_V3: tp.Dict[str, tp.Any] = {"samplerate": 8000, "segment": 0.5, "dconv_lstm": 2,
                                  "dconv_attn": 2}


@pytest.fixture(scope="module")
def v3_bag(tmp_path_factory: pytest.TempPathFactory) -> tp.Tuple[nn.Module, Path]:
    """A bag of a small Demucs and a small HDemucs, and its graphs."""
    bag = BagOfModels([tiny_demucs(depth=4, lstm_layers=1, **SMALL_V3).eval(),
                       tiny_hdemucs(nfft=256, depth=4, **SMALL_V3).eval()],
                      [[1., 0., 1., 1.], [0., 1., 1., 1.]])
    folder = tmp_path_factory.mktemp("v3") / "graphs"
    manifest = export(bag, folder)
    assert [graph.inputs["mix"] for graph in manifest.graphs] == [[1, 2, "length"]] * 2
    return bag, folder


@pytest.mark.parametrize("seconds,shifts,split", [
    (1.3, 0, True), (1.3, 1, True),  # a short last chunk, with and without random shifts
    (0.3, 0, True), (0.3, 1, True),  # shorter than a segment
    (4.1, 0, False),  # in one piece: long enough for the BLSTMs to cut it into frames
])
def test_v3_graphs_separate_whole_tracks_as_in_torch(
        v3_bag: tp.Tuple[nn.Module, Path], seconds: float, shifts: int, split: bool) -> None:
    """The v3 graphs take any length: the runners chunk, shift and pad as the torch path
    does, and the whole output agrees, with each model of the bag alone too."""
    bag, folder = v3_bag
    mix = noise(2, int(seconds * 8000), seed=1)
    check_runtimes(folder, mix, separate(bag, mix, shifts, split), shifts=shifts, split=split)
    runners = load_runners(folder, "onnxruntime")
    assert isinstance(runners, BagOfModels)
    models: tp.List[nn.Module] = list(tp.cast(BagOfModels, bag).models)
    for model, runner in zip(models, runners.models):
        expected = separate(model, mix, shifts, split)
        assert_scaled_close(separate(runner, mix, shifts, split), expected,
                            expected.abs().max().item())


@pytest.mark.slow
def test_a_bag_with_shifts_runs_the_graphs_as_torch_does(tmp_path: Path) -> None:
    """A bag of an HTDemucs and a Demucs with its weights, 2 random shifts: one graph per
    model, the same output as torch with the same graphs."""
    bag = BagOfModels([tiny_htdemucs().eval(), tiny_demucs(samplerate=8000).eval()],
                      [[1., 0., 1., 1.], [0., 1., 1., 1.]], segment=0.5)
    manifest = export(bag, tmp_path / "graphs")
    assert [graph.weights for graph in manifest.graphs] == bag.weights
    mix = noise(2, 9000, seed=2)
    expected = separate(torch_runner(bag, tmp_path / "graphs"), mix, shifts=2)
    runners = load_runners(tmp_path / "graphs", "onnxruntime")
    assert isinstance(runners, BagOfModels) and runners.weights == bag.weights
    out = separate(runners, mix, shifts=2)
    assert_scaled_close(out, expected, expected.abs().max().item())


def test_htdemucs_graph_is_deterministic(tmp_path: Path) -> None:
    """CAPE's random augmentation is off in the graph: two runs give the same output;
    a random shift of the sin embedding at every forward cannot be exported."""
    export(tiny_htdemucs(t_emb="cape").eval(), tmp_path / "graphs")
    runner = load_runners(tmp_path / "graphs", "onnxruntime")
    mix = noise(2, 4000, seed=3)[None]
    assert torch.equal(runner(mix), runner(mix))
    with pytest.raises(ConfigError, match="t_sin_random_shift=3"):
        export(tiny_htdemucs(t_sin_random_shift=3).eval(), tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_manifest_describes_the_graphs(tmp_path: Path) -> None:
    model = tiny_htdemucs().eval()
    export(model, tmp_path / "graphs")
    data = json.loads((tmp_path / "graphs" / MANIFEST).read_text())
    length = model.valid_length(1)
    frames = -(-length // (model.nfft // 4))  # ceil: the hybrid STFT frames
    assert data["sources"] == SOURCES and data["samplerate"] == 8000
    assert data["audio_channels"] == 2 and data["opset"] == 18
    graph = data["graphs"][0]
    assert graph["length"] == length == 4000 and graph["segment"] == 0.5
    assert graph["inputs"] == {"mix": [1, 2, length], "spec": [1, 4, 1024, frames]}
    assert graph["outputs"] == {"freq": [1, 4, 4, 1024, frames], "time": [1, 4, 2, length]}
    assert graph["spectrogram"]["nfft"] == 2048 and graph["spectrogram"]["cac"] is True
    assert sorted(p.name for p in (tmp_path / "graphs").iterdir()) == [MANIFEST,
                                                                      "model_0.onnx"]


def test_a_folder_that_does_not_match_its_manifest_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "graphs"
    export(tiny_htdemucs().eval(), folder)
    data = json.loads((folder / MANIFEST).read_text())
    data["graphs"][0]["inputs"]["mix"][2] = 8000
    (folder / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ModelLoadingError, match=r"model_0\.onnx: its inputs and outputs"):
        load_runners(folder, "onnxruntime")
    (folder / "model_0.onnx").unlink()
    with pytest.raises(ModelLoadingError, match=r"model_0\.onnx: no such file"):
        load_runners(folder, "openvino")
    (folder / MANIFEST).write_text("{")
    with pytest.raises(ModelLoadingError, match=MANIFEST):
        load_runners(folder, "openvino")


def test_cache_key_follows_weights_and_segment(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setenv("DEMUCS_ONNX_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    model = tiny_hdemucs(samplerate=8000, segment=0.5)
    key = model_key(model, None)
    assert key == model_key(tiny_hdemucs(samplerate=8000, segment=0.5), 0.5)
    assert key != model_key(model, 0.25)
    assert key != model_key(tiny_hdemucs(seed=1, samplerate=8000, segment=0.5), None)


# ---------------------------------------------------------------------------------------
# The commands, as users type them


def run(*args: str, env: tp.Optional[tp.Dict[str, str]] = None,
        cwd: tp.Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run([*args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, **(env or {})})


DEMUCS = str(Path(sys.executable).parent / "demucs")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HTDemucs package, and a 1.3 s track next to it."""
    folder = tmp_path_factory.mktemp("package")
    save_atomic(serialize_model(tiny_htdemucs().eval(), {}, half=False), folder / "tiny.th")
    write_wav(folder / "track.wav", 0.3 * noise(2, 10400, seed=4), 8000, "FLOAT")
    return folder / "tiny.th"


def stems(folder: Path) -> torch.Tensor:
    return torch.stack([read_wav(folder / f"{source}.wav") for source in SOURCES])


def test_export_command_then_demucs_runs_the_folder(package: Path, tmp_path: Path) -> None:
    track = package.parent / "track.wav"
    proc = run(sys.executable, "-m", "tools.export_onnx", str(package), "-o",
               str(tmp_path / "graphs"), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"Wrote {tmp_path / 'graphs' / 'model_0.onnx'}: chunks of 4000 samples (0.5 s)",
        f"Wrote {tmp_path / 'graphs' / MANIFEST}"]
    for args in [["-n", str(tmp_path / "graphs"), "--backend", "onnxruntime"],
                 ["-n", str(package)]]:
        proc = run(DEMUCS, *args, "--float32", "--shifts", "0", "-o", str(tmp_path / "out"),
                   str(track))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == "separated 1 of 1 tracks"
    ours, expected = stems(tmp_path / "out/graphs/track"), stems(tmp_path / "out/tiny/track")
    assert_scaled_close(ours, expected, expected.abs().max().item())


@pytest.mark.slow
def test_demucs_backend_exports_once_into_the_cache(package: Path, tmp_path: Path) -> None:
    track = package.parent / "track.wav"
    env = {"DEMUCS_ONNX_CACHE": str(tmp_path / "cache")}
    for backend in ["openvino", "onnxruntime"]:
        proc = run(DEMUCS, "-n", str(package), "--backend", backend, "--float32",
                   "--shifts=0", "-o", str(tmp_path / backend), str(track), env=env)
        assert proc.returncode == 0, proc.stderr
        exported = [line for line in proc.stdout.splitlines() if "Exporting" in line]
        assert len(exported) == (backend == "openvino")  # the second run finds it
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and (folders[0] / MANIFEST).is_file()
    first = stems(tmp_path / "openvino/tiny/track")
    second = stems(tmp_path / "onnxruntime/tiny/track")
    assert_scaled_close(first, second, second.abs().max().item())


def test_export_command_error_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    save_atomic(serialize_model(tiny_htdemucs(t_sin_random_shift=2), {}, half=False),
                tmp_path / "shifty.th")
    proc = run(sys.executable, "-m", "tools.export_onnx", str(tmp_path / "shifty.th"),
               "-o", str(tmp_path / "graphs"), cwd=REPO)
    assert proc.returncode == 1
    assert one_line(proc.stderr).startswith(
        "tools.export_onnx: error: Cannot export an HTDemucs with t_sin_random_shift=2")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shifty.th"]


def fake_runtime(folder: Path, module: str, code: str) -> tp.Dict[str, str]:
    """An environment where `import module` runs `code` instead of the real package."""
    (folder / module).mkdir(parents=True)
    (folder / module / "__init__.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


@pytest.mark.parametrize("backend,code,expected", [
    ("openvino", "raise ImportError('no openvino')",
     "demucs: error: --backend openvino needs the openvino package, which is not installed: "
     "pip install .[openvino] (or pip install openvino)."),
    ("onnxruntime", "__version__ = '1.10.0'",
     "demucs: error: --backend onnxruntime needs onnxruntime >= 1.16, found 1.10.0: pip "
     "install --upgrade onnxruntime."),
])
def test_missing_or_old_runtime_is_one_line_before_any_track(
        backend: str, code: str, expected: str, package: Path, tmp_path: Path) -> None:
    env = fake_runtime(tmp_path / "fake", backend, code)
    proc = run(DEMUCS, "-n", str(package), "--backend", backend, "-o", str(tmp_path / "out"),
               str(package.parent / "track.wav"), env=env)
    assert proc.returncode == 1 and one_line(proc.stderr) == expected
    assert "Separating" not in proc.stdout and not (tmp_path / "out").exists()


def test_folder_of_graphs_needs_a_runtime_backend(package: Path, tmp_path: Path) -> None:
    export(load_model(package).eval(), tmp_path / "graphs")
    shutil.copy(package.parent / "track.wav", tmp_path)
    proc = run(DEMUCS, "-n", str(tmp_path / "graphs"), "-o", str(tmp_path / "out"),
               str(tmp_path / "track.wav"))
    assert proc.returncode == 1
    assert one_line(proc.stderr) == (f"demucs: error: {tmp_path / 'graphs'} is a folder of "
                                     "ONNX graphs: separate with backend onnxruntime or "
                                     "openvino.")


def test_separator_backend_and_update(package: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from demucs.api import Separator
    monkeypatch.setenv("DEMUCS_ONNX_CACHE", str(tmp_path))
    wav = 0.3 * noise(2, 9000, seed=5)
    separator = Separator(str(package), backend="onnxruntime", device="cpu", shifts=0)
    assert separator.options.backend == "onnxruntime"
    _, ours = separator.separate_tensor(wav, 8000)
    separator.update_parameter(backend="torch")
    _, expected = separator.separate_tensor(wav, 8000)
    scale = max(wav.abs().max().item() for wav in expected.values())
    for source in SOURCES:
        assert_scaled_close(ours[source], expected[source], scale)
    with pytest.raises(ConfigError, match="backend must be one of torch, onnxruntime, openvino"):
        separator.update_parameter(backend="tensorrt")


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    return 10 * torch.log10(reference.pow(2).sum() / (other - reference).pow(2).sum()).item()


@pytest.mark.slow
def test_bf16_precision_stays_close_to_float32(package: Path, tmp_path: Path) -> None:
    """`demucs --precision bf16` with torch (autocast) and OpenVINO (its bf16 inference):
    stems 35 dB or more above their difference from float32's (about 50 dB and 60 dB on
    this tiny model, docs/onnx.md)."""
    track = package.parent / "track.wav"
    env = {"DEMUCS_ONNX_CACHE": str(tmp_path / "cache")}
    for backend, precision in [("torch", "float32"), ("torch", "bf16"), ("openvino", "bf16")]:
        proc = run(DEMUCS, "-n", str(package), "--backend", backend, "--precision", precision,
                   "--float32", "--shifts", "0", "-o", str(tmp_path / f"{backend}_{precision}"),
                   str(track), env=env)
        assert proc.returncode == 0, proc.stderr
    reference = stems(tmp_path / "torch_float32/tiny/track")
    autocast = stems(tmp_path / "torch_bf16/tiny/track")
    assert 35 < snr_db(reference, autocast) < 100  # close, but computed in bf16
    assert snr_db(reference, stems(tmp_path / "openvino_bf16/tiny/track")) > 35


def test_bf16_with_onnxruntime_is_one_line_before_any_track(package: Path,
                                                            tmp_path: Path) -> None:
    proc = run(DEMUCS, "-n", str(package), "--backend", "onnxruntime", "--precision", "bf16",
               "-o", str(tmp_path / "out"), str(package.parent / "track.wav"))
    assert proc.returncode == 1
    assert one_line(proc.stderr) == ("demucs: error: bf16 runs with the torch and openvino "
                                     "backends; onnxruntime's CPU kernels are float32 only.")
    assert not (tmp_path / "out").exists()


def test_separator_bf16_bag_keeps_the_bag(tmp_path: Path) -> None:
    """`Separator(precision="bf16")` on a bag: each model under autocast, the bag's
    weights kept, float32 stems close to float32's."""
    from demucs.api import Separator
    models = [tiny_hdemucs(seed=1).eval(), tiny_hdemucs(seed=2).eval()]
    for index, model in enumerate(models):
        save_atomic(serialize_model(model, {}, half=False), tmp_path / f"m{index}.th")
    (tmp_path / "bag.yaml").write_text(yaml.safe_dump(
        {"models": ["m0", "m1"], "weights": [[1., 0., 1., 0.], [0., 1., 1., 1.]]}))
    wav = 0.3 * noise(2, 9000, seed=5)
    separator = Separator("bag", repo=tmp_path, device="cpu", shifts=0)
    _, expected = separator.separate_tensor(wav, 8000)
    separator.update_parameter(precision="bf16")
    bag = separator.prepare()
    assert isinstance(bag, BagOfModels) and bag.weights == [[1., 0., 1., 0.], [0., 1., 1., 1.]]
    _, ours = separator.separate_tensor(wav, 8000)
    for source in SOURCES:
        assert ours[source].dtype == torch.float32
        assert 35 < snr_db(expected[source], ours[source]) < 100
