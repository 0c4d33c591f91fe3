"""Our BS-RoFormer, Mel-Band RoFormer and SCNet side by side with MSST's own model code.

MSST (ZFTurbo's Music-Source-Separation-Training) is the `msst` package on PyPI,
installed in a virtual environment of its own (bench/README.md, "Side by side with
MSST") and used as a black box: its model classes and its chunked inference
(`msst.utils.model_utils.demix`) are imported and run, nothing of it is read or copied.
Both sides build the same configuration and hold the same weights: MSST's random
initialisation, saved to a temporary file, loaded into ours with `strict=True`.

Every measurement runs in a fresh process (the MSST side with the MSST environment's
Python, ours with this one), the two sides alternating, `--runs` times each; a side's
figure is its best run. Measured:
- check: one chunk through both models in eval mode (max error over the output's
  scale) and, for the RoFormers, MSST's training loss `model(mix, target=target)`
  against ours (`losses.reco_losses("l1_multi_stft", ...)`), to show the same weights;
- forward: separation of `--seconds` of stereo noise in chunks of `--chunk` samples
  with half-chunk steps: ours `apply.apply_model(split=True, overlap=0.5, shifts=0)`
  with `model.segment` the chunk, MSST's `demix` with `inference.num_overlap=2`
  (`--overlap` sets both); seconds, peak resident memory above the start (RSS), and
  the number of model calls each side made;
- train: Adam steps on a batch of `--batch` x chunk (forward, loss, backward, step):
  the RoFormers' L1 + multi-resolution STFT loss (MSST's `model(mix, target=target)`,
  ours `l1_multi_stft`), SCNet's MSE; seconds of the best step after a warm-up step,
  and the peak RSS above the start (the model and its Adam state included).
Float32 and bf16 autocast on the CPU (`--amps`).

    python bench/bench_msst.py [--msst-python /tmp/msst-venv/bin/python] [--small]
        [--models bs_roformer mel_band_roformer scnet scnet_large] [--runs 3]
        [--threads 2] [--seconds 30] [--chunk N] [--batch 2] [--amps float32 bf16]
        [--jobs check forward train]

This file is also the worker both environments run (`--worker SIDE JOB.json`): the
MSST side imports nothing of `demucs`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import typing as tp
from contextlib import nullcontext
from fractions import Fraction
from pathlib import Path

import torch

SOURCES = ["drums", "bass", "other", "vocals"]
RATE = 44100
ROOT = Path(__file__).resolve().parents[1]
# MSST's MUSDB18 configurations (its `model:` sections), and their training chunks
ROFORMER = dict(dim=192, stereo=True, num_stems=4, time_transformer_depth=1,
                freq_transformer_depth=1, dim_head=64, heads=8, attn_dropout=0.1,
                ff_dropout=0.1, flash_attn=True, mask_estimator_depth=2)
SCNET = dict(sources=SOURCES, audio_channels=2, nfft=4096, hop_size=1024, win_size=4096,
             normalized=True, band_SR=[0.175, 0.392, 0.433], band_stride=[1, 4, 16],
             band_kernel=[3, 4, 16], conv_depths=[3, 2, 1], compress=4, conv_kernel=3,
             num_dplayer=6, expand=1)
CONFIGS: tp.Dict[str, tp.Tuple[str, tp.Dict[str, tp.Any], int]] = {
    "bs_roformer": ("bs_roformer", dict(ROFORMER, depth=6), 131584),
    "mel_band_roformer": ("mel_band_roformer",
                          dict(ROFORMER, depth=8, num_bands=60), 131584),
    "scnet": ("scnet", dict(SCNET, dims=[4, 32, 64, 128]), 485100),
    "scnet_large": ("scnet", dict(SCNET, dims=[4, 64, 128, 256]), 485100),
}
# --small: fewer layers, the same widths and bands
SMALL = {"bs_roformer": dict(depth=2), "mel_band_roformer": dict(depth=2),
         "scnet": dict(num_dplayer=2), "scnet_large": dict(num_dplayer=2)}
LR = {"bs_roformer": 5e-5, "mel_band_roformer": 5e-5, "scnet": 5e-4}


# ---------------------------------------------------------------- worker (either side)

def status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (its peak since `reset_peak`) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.


def reset_peak() -> float:
    """Starts a new peak (loading the weights peaks higher than a forward); the RSS now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the process's peak stands
        pass
    return status_mb("VmRSS")


def peak_rss_mb() -> float:
    return max(status_mb("VmHWM"), status_mb("VmRSS"))


def build(side: str, arch: str, kwargs: tp.Dict[str, tp.Any]) -> torch.nn.Module:
    """MSST's model, or ours with `sources` for MSST's `num_stems`."""
    if side == "msst":
        from msst.models.bs_roformer import BSRoformer, MelBandRoformer
        from msst.models.scnet import SCNet
        classes: tp.Dict[str, tp.Any] = {"bs_roformer": BSRoformer,
                                         "mel_band_roformer": MelBandRoformer, "scnet": SCNet}
        return tp.cast(torch.nn.Module, classes[arch](**kwargs))
    from demucs.bs_roformer import BSRoformer as OurBS
    from demucs.mel_roformer import MelBandRoformer as OurMel
    from demucs.scnet import SCNet as OurSCNet
    ours: tp.Dict[str, tp.Any] = {"bs_roformer": OurBS, "mel_band_roformer": OurMel,
                                  "scnet": OurSCNet}
    kwargs = dict(kwargs)
    if arch != "scnet":
        kwargs["sources"] = SOURCES[:kwargs["num_stems"]]
    return tp.cast(torch.nn.Module, ours[arch](**kwargs))


def data(batch: int, length: int, seed: int = 1) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Sources (B, S, C, T) of noise and their mixture (B, C, T), the same on both sides."""
    generator = torch.Generator().manual_seed(seed)
    sources = 0.1 * torch.randn(batch, len(SOURCES), 2, length, generator=generator)
    return sources.sum(dim=1), sources


def amp_context(amp: str) -> tp.Any:
    if amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def loss_of(side: str, arch: str, model: torch.nn.Module, mix: torch.Tensor,
            target: torch.Tensor) -> torch.Tensor:
    """The training loss as each side computes it (SCNet: the MSE)."""
    if arch == "scnet":
        return torch.nn.functional.mse_loss(model(mix), target)
    if side == "msst":
        return tp.cast(torch.Tensor, model(mix, target=target))
    from demucs.losses import LossOptions, reco_losses
    options = LossOptions(multi_stft=tp.cast(tp.Any, model).multi_stft)
    return reco_losses("l1_multi_stft", model(mix), target, options)[0].mean()


def count_calls(model: torch.nn.Module) -> tp.List[int]:
    calls = [0]
    forward = model.forward

    def counted(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        calls[0] += 1
        return forward(*args, **kwargs)
    model.forward = counted  # type: ignore[method-assign]
    return calls


def job_check(side: str, job: tp.Dict[str, tp.Any], model: torch.nn.Module) -> tp.Dict:
    model.eval()
    mix, target = data(1, job["chunk"])
    result: tp.Dict[str, tp.Any] = {}
    with torch.no_grad():
        output = model(mix)
        if output.dim() == 3:  # (B, C, T): one stem
            output = output[:, None]
        if job["arch"] != "scnet":
            length = min(output.shape[-1], target.shape[-1])
            if side == "msst":
                result["loss"] = float(model(mix[..., :length], target=target[..., :length]))
            else:
                result["loss"] = float(loss_of(side, job["arch"], model, mix[..., :length],
                                               target[..., :length]))
    torch.save(output, job["out"])
    return result


def job_forward(side: str, job: tp.Dict[str, tp.Any], model: torch.nn.Module) -> tp.Dict:
    model.eval()
    mix, _ = data(1, int(job["seconds"] * RATE), seed=2)
    calls = count_calls(model)
    start_rss = reset_peak()
    begin, cpu = time.perf_counter(), time.process_time()
    with amp_context(job["amp"]):
        if side == "msst":
            from ml_collections import ConfigDict
            from msst.utils.model_utils import demix
            config = ConfigDict({
                "audio": {"chunk_size": job["chunk"], "num_channels": 2, "sample_rate": RATE},
                "inference": {"num_overlap": round(1 / (1 - job["overlap"])), "batch_size": 1},
                "training": {"instruments": SOURCES, "target_instrument": None}})
            demix(config, model, mix[0].numpy(), torch.device("cpu"), job["arch"])
        else:
            from demucs.apply import apply_model
            segment = Fraction(job["chunk"], RATE)
            tp.cast(tp.Any, model).segment = segment
            # given explicitly, the segment pads the last chunk to its length (as MSST)
            apply_model(model, mix, split=True, overlap=job["overlap"], shifts=0,
                        segment=float(segment))
    seconds, cpu = time.perf_counter() - begin, time.process_time() - cpu
    return {"seconds": seconds, "cpu": cpu, "peak_mb": peak_rss_mb() - start_rss,
            "calls": calls[0]}


def job_train(side: str, job: tp.Dict[str, tp.Any], model: torch.nn.Module) -> tp.Dict:
    model.train()
    optim = torch.optim.Adam(model.parameters(), lr=LR[job["arch"]])
    mix, target = data(job["batch"], job["chunk"], seed=3)
    start_rss = reset_peak()
    durations, cpus, losses = [], [], []
    for _ in range(1 + job["steps"]):
        begin, cpu = time.perf_counter(), time.process_time()
        optim.zero_grad(set_to_none=True)
        with amp_context(job["amp"]):
            loss = loss_of(side, job["arch"], model, mix, target)
        loss.backward()
        optim.step()
        durations.append(time.perf_counter() - begin)
        cpus.append(time.process_time() - cpu)
        losses.append(float(loss))
    return {"seconds": min(durations[1:]), "cpu": min(cpus[1:]),
            "peak_mb": peak_rss_mb() - start_rss, "loss": losses[0]}


def worker(side: str, job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    model = build(side, job["arch"], job["kwargs"])
    if job["kind"] == "init":  # MSST's random weights, which both sides load
        torch.save(model.state_dict(), job["state"])
        result: tp.Dict[str, tp.Any] = {"params": sum(p.numel() for p in model.parameters())}
    else:
        model.load_state_dict(torch.load(job["state"], weights_only=True), strict=True)
        jobs = {"check": job_check, "forward": job_forward, "train": job_train}
        result = jobs[job["kind"]](side, job, model)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the bench

def run_worker(args: argparse.Namespace, side: str, job: tp.Dict[str, tp.Any],
               folder: Path) -> tp.Dict:
    python = args.msst_python if side == "msst" else sys.executable
    path = folder / "job.json"
    path.write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]),
               MKL_NUM_THREADS=str(job["threads"]), PYTHONWARNINGS="ignore")
    command = [python, str(Path(__file__).resolve()), "--worker", side, str(path)]
    # the MSST side runs outside the repository, so that it cannot import our demucs
    cwd = str(ROOT) if side == "ours" else str(folder)
    begin = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    if args.verbose:
        print(f"    {side} {job['kind']} {job.get('amp', '')}: {time.perf_counter() - begin:.1f} s"
              f" in the process, {done.stdout.strip().splitlines()[-1:]}", flush=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{side} {job['kind']} {job['arch']} failed:\n{done.stderr[-3000:]}")
    return tp.cast(tp.Dict, json.loads(lines[-1][len("RESULT "):]))


def alternate(args: argparse.Namespace, job: tp.Dict[str, tp.Any],
              folder: Path) -> tp.Dict[str, tp.Dict[str, float]]:
    """`--runs` fresh processes per side, alternating; each figure: its best run."""
    best: tp.Dict[str, tp.Dict[str, float]] = {}
    for run in range(args.runs):
        sides = ("msst", "ours") if run % 2 == 0 else ("ours", "msst")
        for side in sides:
            result = run_worker(args, side, job, folder)
            kept = best.setdefault(side, result)
            for key in ("seconds", "cpu", "peak_mb"):
                kept[key] = min(kept[key], result[key])
    return best


def check(args: argparse.Namespace, job: tp.Dict[str, tp.Any], folder: Path) -> str:
    outputs, losses = {}, {}
    for side in ("msst", "ours"):
        out = folder / f"{side}.out.pt"
        result = run_worker(args, side, dict(job, kind="check", out=str(out)), folder)
        outputs[side] = torch.load(out, weights_only=True)
        losses[side] = result.get("loss")
    ref, ours = outputs["msst"], outputs["ours"][..., :outputs["msst"].shape[-1]]
    line = (f"  same weights: output {tuple(ours.shape)}, max error / scale "
            f"{float((ours - ref).abs().max() / ref.abs().max()):.1e}")
    if losses["msst"] is not None:
        line += (f"; loss {losses['msst']:.6f} (MSST) {losses['ours']:.6f} (ours), "
                 f"relative {abs(losses['ours'] / losses['msst'] - 1):.1e}")
    return line


def row(name: str, what: str, best: tp.Dict[str, tp.Dict[str, float]]) -> str:
    msst, ours = best["msst"], best["ours"]
    calls = f" ({int(ours['calls'])}/{int(msst['calls'])} calls)" if "calls" in ours else ""
    cells = [f"{side['seconds']:.2f} s ({side['cpu']:.1f} s CPU), {side['peak_mb']:.0f} MB"
             for side in (ours, msst)]
    ratios = (f"x{ours['seconds'] / msst['seconds']:.2f} (CPU x{ours['cpu'] / msst['cpu']:.2f}), "
              f"x{ours['peak_mb'] / msst['peak_mb']:.2f}")
    return f"| {name} | {what}{calls} | {cells[0]} | {cells[1]} | {ratios} |"


def bench_model(args: argparse.Namespace, name: str, folder: Path) -> tp.List[str]:
    arch, kwargs, chunk = CONFIGS[name]
    kwargs = dict(kwargs, **(SMALL[name] if args.small else {}))
    chunk = args.chunk or chunk
    job: tp.Dict[str, tp.Any] = dict(
        arch=arch, kwargs=kwargs, chunk=chunk, threads=args.threads, state=str(folder / "w.th"),
        seconds=args.seconds, overlap=args.overlap, batch=args.batch, steps=args.steps)
    params = run_worker(args, "msst", dict(job, kind="init"), folder)["params"]
    print(f"{name}: {params / 1e6:.1f} M parameters, chunk {chunk} samples", flush=True)
    if "check" in args.jobs:
        print(check(args, job, folder), flush=True)
    rows = []
    for kind in ("forward", "train"):
        if kind not in args.jobs:
            continue
        for amp in args.amps:
            what = (f"separate {args.seconds:g} s" if kind == "forward"
                    else f"train step {args.batch} x chunk") + f", {amp}"
            best = alternate(args, dict(job, kind=kind, amp=amp), folder)
            rows.append(row(name, what, best))
            print(rows[-1], flush=True)
    return rows


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--msst-python", default="/tmp/msst-venv/bin/python")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--small", action="store_true", help="fewer layers (quick runs)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30.)
    parser.add_argument("--chunk", type=int, help="samples (default: MSST's training chunk)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after a warm-up")
    parser.add_argument("--amps", nargs="+", default=["float32", "bf16"],
                        choices=["float32", "bf16"])
    parser.add_argument("--jobs", nargs="+", default=["check", "forward", "train"],
                        choices=["check", "forward", "train"])
    parser.add_argument("--verbose", action="store_true", help="a line per process")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, load "
          f"{os.getloadavg()[0]:.1f}, best of {args.runs} alternating runs per side")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(args, name, Path(tmp))
    print("\n| model | measure | ours: wall (CPU), peak RSS | MSST "
          "| ours / MSST: wall (CPU), peak |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
