"""A real distributed training: `python -m dora -P demucs run -d --ddp_workers 2 ARGV`, as
a user types it. Dora starts two worker processes that join a gloo process group (NCCL
where there are two GPUs or more) and train a tiny Hybrid Demucs together.

What the workers do inside is recorded by a probe: a `sitecustomize` module put on the
workers' PYTHONPATH that wraps (never replaces) three functions of `demucs.solver` and
`distrib.wrap` (whose DDP gets a communication hook that records each gradient exchange
and then makes DDP's own all-reduce), and at the end of `Solver.train` saves what this
worker holds. It shows what the files of the XP cannot: that both workers end with the
same weights, that each saw its own examples, that the logged metrics are the averages
over both, that gradients are exchanged once per optimizer step, and that only rank 0
wrote files. Where a test asks, the probe also makes one worker's loss NaN, or the disk
full when rank 0 saves epoch 2.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from demucs import distrib
from demucs.checkpoints import load_checkpoint
from demucs.states import load_model
from helpers import DEFAULT_THREADS, assert_same_tensors, threads_set_by_tests
from tools.synth_dataset import generate_dataset

# A tiny Hybrid Demucs (as TINY in test_gpu.py), but with remix groups of 1: each worker's
# batch holds batch_size / 2 = 1 example.
ARGV = ["model=hdemucs", "hdemucs.channels=4", "hdemucs.depth=4", "hdemucs.nfft=1024",
        "dset.segment=2", "dset.shift=1", "batch_size=2", "epochs=2", "max_batches=2",
        "misc.num_workers=0", "test.sdr=false", "augment.remix.group_size=1",
        "augment.repitch.proba=0", "ema.batch=[0.9]"]
WORKERS = 2
TIMEOUT = 240  # s, under pytest-timeout's 300: a hang fails the test and kills the workers

PROBE = '''\
"""Probe of tests/test_ddp.py: records what a DDP worker does, changes nothing."""
import os

if os.environ.get("DDP_PROBE_DIR") and os.environ.get("RANK"):  # workers only
    from pathlib import Path

    import torch
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from demucs import checkpoints, distrib, metrics, solver

    _out = Path(os.environ["DDP_PROBE_DIR"])
    _reductions, _saves, _exchanges = [], [], []
    _reduce, _train, _save_atomic, _wrap = (metrics.Averager.reduce, solver.Solver.train,
                                            checkpoints.save_atomic, distrib.wrap)

    def exchange(state, bucket):  # DDP's own all-reduce (average), each bucket recorded
        _exchanges.append(bucket.index())
        return allreduce_hook(state, bucket)

    def wrap(model):
        wrapped = _wrap(model)
        wrapped.register_comm_hook(None, exchange)
        return wrapped

    def reduce(self):
        reduced = _reduce(self)
        _reductions.append({"local": self.mean(), "count": self.counts["loss"],  # batches
                            "reduced": reduced})
        return reduced

    def save_atomic(content, path):
        _saves.append(Path(path).name)
        if os.environ.get("DDP_PROBE_FULL_DISK") and _saves.count("best.th") == 2:
            import errno
            raise OSError(errno.ENOSPC, "No space left on device")  # at epoch 2
        _save_atomic(content, path)

    def train(self):
        initial = solver.copy_state(self.model.state_dict())
        _train(self)
        dist = torch.distributed
        torch.save({"initial": initial, "final": solver.copy_state(self.model.state_dict()),
                    "emas": [solver.copy_state(ema.state) for ema in self.emas["batch"]],
                    "optimizer": self.optimizer.state_dict(),
                    "rank": dist.get_rank(), "world_size": dist.get_world_size(),
                    "backend": str(dist.get_backend()), "wrapper": type(self.dmodel).__name__,
                    "threads": torch.get_num_threads(),
                    "reductions": _reductions, "saves": _saves, "exchanges": _exchanges},
                   _out / f"rank{os.environ['RANK']}.th")

    metrics.Averager.reduce, solver.Solver.train = reduce, train
    checkpoints.save_atomic, distrib.wrap = save_atomic, wrap

    if os.environ.get("DDP_PROBE_NAN_RANK") == os.environ["RANK"]:
        _metrics = solver.Solver._batch_metrics

        def nan_from_second_epoch(self, estimate, sources, train):  # training batches only
            loss, metrics = _metrics(self, estimate, sources, train)
            return (loss * float("nan") if self.history and loss.requires_grad
                    else loss), metrics

        solver.Solver._batch_metrics = nan_from_second_epoch
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ddp(cwd: Path, env: dict[str, str], argv: list[str]) -> tuple[int, str]:
    """`python -m dora -P demucs run -d --ddp_workers 2 ARGV` in `cwd`: (status, output).

    Dora's process and its workers share a new session, all killed on a timeout (killing
    only Dora's process would leave the workers running)."""
    command = [sys.executable, "-m", "dora", "-P", "demucs", "run", "-d", "--ddp_workers",
               str(WORKERS), *argv]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"no end after {TIMEOUT} s (a worker hangs?):\n{output[-3000:]}")
    return process.returncode, output


BACKENDS = [
    pytest.param("gloo", id="cpu-gloo"),
    pytest.param("nccl", id="cuda-nccl", marks=pytest.mark.skipif(
        torch.cuda.device_count() < WORKERS, reason=f"needs {WORKERS} CUDA GPUs")),
]


def ddp_env(tmp_path: Path, backend: str) -> dict[str, str]:
    """The data, the probe and the environment of a two-worker run in `tmp_path`.

    3 training tracks of 3 s: 6 examples of 1 s, 3 per worker and epoch, in batches of
    batch_size / 2 = 1 (max_batches=2 lets 3 through). 3 valid tracks: 2 for rank 0, 1
    for rank 1, so that an unweighted mean of the workers would be wrong. 1 test track:
    rank 1 has none."""
    generate_dataset(tmp_path / "musdb", tracks=6, seconds=3, valid_tracks=3, test_tracks=1)
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(PROBE)
    env = {key: value for key, value in os.environ.items() if not key.startswith("DORA_")}
    if threads_set_by_tests():  # the workers share out the cores themselves
        del env["OMP_NUM_THREADS"]
    env.update(MUSDB_PATH=str(tmp_path / "musdb"), METADATA_PATH=str(tmp_path / "metadata"),
               DDP_PROBE_DIR=str(tmp_path / "probe"), MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "probe"),
                                                         env.get("PYTHONPATH")])))
    if backend == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU workers, even on a GPU machine
    return env


def xp_folder(tmp_path: Path, output: str) -> tuple[Path, Path]:
    """The one XP folder of a run, and the log of rank 1 in it (Dora's place for it)."""
    folders = list((tmp_path / "outputs" / "xps").glob("*"))
    assert len(folders) == 1, (folders, output[-3000:])
    worker_log = folders[0] / "worker_1.log"
    assert worker_log.is_file(), output[-3000:]
    return folders[0], worker_log


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_run_ddp_two_workers(tmp_path: Path, backend: str, accumulate: int) -> None:
    # With optim.accumulate=2, the optimizer steps after batches 2 and 3 (see `ddp_env`).
    env = ddp_env(tmp_path, backend)
    argv = ARGV + ([f"optim.accumulate={accumulate}"] if accumulate > 1 else [])
    status, output = run_ddp(tmp_path, env, argv)
    folder, worker_log = xp_folder(tmp_path, output)
    assert status == 0, output[-3000:] + "\n--- worker_1.log:\n" + worker_log.read_text()[-3000:]
    assert f"Starting {WORKERS} worker processes for DDP" in output
    assert "Distributed init: 1/2" in worker_log.read_text()

    history = json.loads((folder / "history.json").read_text())
    assert len(history) == 2
    for epoch in history:
        assert math.isfinite(epoch["train"]["loss"]) and math.isfinite(epoch["valid"]["loss"])
    assert "nsdr" in history[-1]["test"]

    probes = [torch.load(tmp_path / "probe" / f"rank{rank}.th", map_location="cpu",
                         weights_only=True)
              for rank in range(WORKERS)]
    for rank, probe in enumerate(probes):
        assert (probe["rank"], probe["world_size"]) == (rank, WORKERS)
        assert probe["backend"] == backend and probe["wrapper"] == "DistributedDataParallel"
        if backend == "gloo" and "OMP_NUM_THREADS" not in env:  # the cores are shared
            assert probe["threads"] == max(1, DEFAULT_THREADS // WORKERS)

    # Same start, different examples, same end: the gradients were averaged.
    zero, one = probes
    assert_same_tensors(zero["initial"], one["initial"])
    assert any(not torch.equal(zero["initial"][key], zero["final"][key])
               for key in zero["final"])
    assert_same_tensors(zero["final"], one["final"], "final")
    assert_same_tensors(zero["emas"], one["emas"], "emas")
    assert_same_tensors(zero["optimizer"], one["optimizer"], "optimizer")

    # The gradients are exchanged once per optimizer step (3 or 2 per epoch), not once per
    # batch: a batch that only accumulates keeps its gradients local. DDP's first bucket
    # holds the last parameters, which every backward reduces.
    steps = sum(1 for batch in range(1, 4) if batch % accumulate == 0 or batch == 3)
    for probe in probes:
        assert probe["exchanges"].count(0) == steps * len(history)

    # Per epoch: train, valid of the live weights, valid of the EMA, in that order.
    assert len(zero["reductions"]) == len(one["reductions"]) == 3 * len(history)
    for index, (mine, theirs) in enumerate(zip(zero["reductions"], one["reductions"])):
        stage = "train" if index % 3 == 0 else "valid"
        assert (mine["count"], theirs["count"]) == ((3, 3) if stage == "train" else (2, 1))
        assert mine["reduced"] == theirs["reduced"]
        if stage == "train":  # not the same examples, so not the same loss
            assert mine["local"]["loss"] != theirs["local"]["loss"]
        total = mine["count"] + theirs["count"]
        for key, value in mine["reduced"].items():
            weighted = (mine["local"][key] * mine["count"]
                        + theirs["local"][key] * theirs["count"]) / total
            assert value == pytest.approx(weighted, rel=1e-12), (index, key)
    for epoch, entry in enumerate(history):
        assert entry["train"] == zero["reductions"][3 * epoch]["reduced"]
        assert entry["valid"]["main"] == zero["reductions"][3 * epoch + 1]["reduced"]
        assert entry["valid"]["ema_batch_0"] == zero["reductions"][3 * epoch + 2]["reduced"]

    # Only rank 0 writes: the checkpoint and best.th once per epoch, of its weights.
    assert one["saves"] == []
    assert zero["saves"] == ["best.th", "checkpoint.th"] * len(history)
    checkpoint = load_checkpoint(folder / "checkpoint.th")
    assert_same_tensors(checkpoint["state"], zero["final"], "checkpoint")
    assert checkpoint["history"] == history
    model = load_model(folder / "best.th")
    assert_same_tensors(model.state_dict(), checkpoint["best_state"], "best.th")


def test_nan_loss_on_one_worker_stops_every_worker(tmp_path: Path) -> None:
    """Rank 1's loss becomes NaN at the first batch of epoch 2: both workers stop there
    with the same line, and the checkpoint of epoch 1 stays. Had rank 1 stopped alone,
    rank 0 would have waited for its gradients: killed by Dora here (with no word of why),
    left to the all-reduce's timeout in other launchers."""
    env = ddp_env(tmp_path, "gloo")
    env["DDP_PROBE_NAN_RANK"] = "1"
    status, output = run_ddp(tmp_path, env, ARGV)
    folder, worker_log = xp_folder(tmp_path, output)
    message = "the training loss became nan at epoch 2, batch 1: training stopped"
    assert status != 0
    assert message in output, output[-3000:]  # rank 0, whose own loss was finite
    assert message in worker_log.read_text(), worker_log.read_text()[-3000:]
    assert len(load_checkpoint(folder / "checkpoint.th")["history"]) == 1


def test_full_disk_on_the_first_worker_stops_every_worker(tmp_path: Path) -> None:
    """Rank 0 cannot write epoch 2's checkpoint: both workers stop there, each with one
    line, and the checkpoint of epoch 1 stays. Had rank 0 stopped alone, rank 1 would have
    waited for it at its next exchange (Dora kills it here; other launchers leave it to
    the all-reduce's timeout)."""
    env = ddp_env(tmp_path, "gloo")
    env["DDP_PROBE_FULL_DISK"] = "1"
    status, output = run_ddp(tmp_path, env, ARGV)
    folder, worker_log = xp_folder(tmp_path, output)
    kept = (f"training stopped, the checkpoint of epoch 1 is kept in "
            f"{folder / 'checkpoint.th'}; free some space and run the same command to resume.")
    assert status != 0
    assert f"could not save epoch 2: [Errno 28] No space left on device: {kept}" in output
    assert (f"the first worker could not save epoch 2: {kept}"
            in worker_log.read_text()), worker_log.read_text()[-3000:]
    assert len(load_checkpoint(folder / "checkpoint.th")["history"]) == 1


# Each worker's means and how many batches counted each: rank 1 had no finite `grad` (an
# fp16 worker whose steps all overflowed), only rank 1 has `reco`, nobody counted `ms`.
AVERAGED = [({"loss": 1., "grad": 2., "ms": math.nan}, {"loss": 3, "grad": 1, "ms": 0}),
            ({"loss": 4., "grad": math.nan, "reco": 5., "ms": math.nan},
             {"loss": 1, "grad": 0, "reco": 2, "ms": 0})]


def average_worker(rank: int, store: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=len(AVERAGED))
    try:
        metrics, counts = AVERAGED[rank]
        averaged = distrib.average(metrics, counts)
        Path(f"{store}.{rank}.json").write_text(json.dumps(averaged))
    finally:
        torch.distributed.destroy_process_group()


def test_average_weights_each_metric_by_its_own_count(tmp_path: Path) -> None:
    """`distrib.average` between two real gloo workers, each metric weighted by the
    batches that counted it on each worker."""
    store = str(tmp_path / "store")
    torch.multiprocessing.spawn(average_worker, args=(store,), nprocs=len(AVERAGED))
    for rank in range(len(AVERAGED)):
        averaged = json.loads(Path(f"{store}.{rank}.json").read_text())
        assert list(averaged) == ["loss", "grad", "ms", "reco"]
        assert averaged["loss"] == (1. * 3 + 4. * 1) / 4
        assert averaged["grad"] == 2. and averaged["reco"] == 5.
        assert math.isnan(averaged["ms"])
