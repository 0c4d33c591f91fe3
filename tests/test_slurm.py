"""`dora grid` on a real Slurm cluster: the `smoke` and `smoke_refine` grids, scheduling,
the metrics table, cancelling, and resuming a job killed by `scancel` (`-r`).

The cluster is this machine, started by `python -m tools.slurm_local start` (which
installs munge and Slurm with apt-get when missing: it needs root) and stopped at the
end. Every command runs as users type it, in a subprocess: `dora -P demucs grid ...` from
a temporary folder (Dora's `outputs/` is relative to it), with the variables printed by
`start` (SLURM_CONF, PATH), MUSDB_PATH on a small synthetic dataset and PYTHONPATH on the
repository. Each scenario has its own folder, hence its own XPs and jobs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest

from demucs.grids import _slurm, smoke
from demucs.grids.smoke import LONG, SEEDS, TINY
from helpers import REPO, main_error, one_line, skip_or_fail
from tools.slurm_local import PROGRAMS, program
from tools.synth_dataset import generate_dataset

Env = dict[str, str]
# Patterns of `dora grid smoke PATTERN`: XP names hold their overrides.
LONG_XP = f"epochs={LONG['epochs']}"
JOB_TIMEOUT = 200.  # s for jobs to end, under pytest-timeout's 300 s per test
ACTIVE = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING", "SUSPENDED")


def command(cwd: Path, env: Env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m ARGS` in `cwd`; stdout and stderr as text."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def dora(cwd: Path, env: Env, *args: str) -> str:
    """Run `dora -P demucs ARGS`; its output (Dora logs to stderr), without colors."""
    result = command(cwd, env, "dora", "-P", "demucs", *args)
    output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    assert result.returncode == 0, output[-3000:]
    return output


def exported(stdout: str) -> Env:
    """The variables of the `export KEY=VALUE` lines of `slurm_local start`."""
    env: Env = {}
    for key, value in re.findall(r"^export (\w+)=(.*)$", stdout, re.MULTILINE):
        env[key] = value.replace("$PATH", os.environ.get("PATH", os.defpath))
    return env


# ---------------------------------------------------------------------------------------
# Fixtures: the cluster, the dataset, the environment of the commands


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> tp.Iterator[Env]:
    """A one-node Slurm cluster on this machine; the variables that select it."""
    if os.geteuid() != 0:
        skip_or_fail("the Slurm tests run Slurm's daemons, which needs root")
    if any(program(name) is None for name in PROGRAMS) and shutil.which("apt-get") is None:
        skip_or_fail("Slurm is not installed and apt-get is not there to install it")
    root = str(tmp_path_factory.mktemp("slurm"))
    started = command(REPO, dict(os.environ), "tools.slurm_local", "start", "--dir", root,
                      timeout=300)  # apt-get install included
    try:
        assert started.returncode == 0, started.stderr
        yield exported(started.stdout)
    finally:
        stopped = command(REPO, dict(os.environ), "tools.slurm_local", "stop", "--dir", root)
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def env(cluster: Env, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """The environment of the commands: the cluster, a small synthetic MusDB."""
    data = tmp_path_factory.mktemp("data")
    generate_dataset(data / "musdb", tracks=4, seconds=4, test_tracks=1)
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith(("DORA_", "DEMUCS_SLURM_", "DEMUCS_SMOKE_"))}
    return {**environ, **cluster, "MUSDB_PATH": str(data / "musdb"),
            "METADATA_PATH": str(data / "metadata"), "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1"}  # one thread per 1-CPU job on shared cores


@pytest.mark.slow
def test_start_again_and_status_find_the_running_cluster(cluster: Env) -> None:
    root = str(Path(cluster["SLURM_CONF"]).parent)
    again = command(REPO, dict(os.environ), "tools.slurm_local", "start", "--dir", root)
    assert again.returncode == 0, again.stderr
    assert f"The cluster in {root} is already running." in again.stderr
    assert exported(again.stdout) == cluster
    status = command(REPO, dict(os.environ), "tools.slurm_local", "status", "--dir", root)
    assert status.returncode == 0, status.stderr
    for daemon in ("munged", "slurmctld", "slurmd"):
        assert re.search(rf"^{daemon}: running \(pid \d+\)$", status.stdout, re.MULTILINE)
    assert re.search(r"^local\*\s+up\s+infinite\s+1\s+(idle|mix|alloc)\s", status.stdout,
                     re.MULTILINE), status.stdout


def test_stop_without_cluster_is_fine(tmp_path: Path) -> None:
    result = command(REPO, dict(os.environ), "tools.slurm_local", "stop", "--dir",
                     str(tmp_path))
    assert result.returncode == 0 and "No cluster running" in result.stderr


# ---------------------------------------------------------------------------------------
# XPs and jobs


def xp_folders(cwd: Path) -> list[Path]:
    return sorted((cwd / "outputs" / "xps").iterdir())


def job_id(folder: Path) -> str:
    """The id of the last Slurm job of the XP in `folder` (written by Dora)."""
    return str(json.loads((folder / "job.json").read_text())["job_id"])


def history(folder: Path) -> list[dict[str, tp.Any]]:
    path = folder / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def job_states(env: Env) -> dict[str, str]:
    """State of every job the cluster knows, finished ones included."""
    result = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i %T"],
                            env=env, capture_output=True, text=True, check=True, timeout=30)
    return dict(line.split() for line in result.stdout.splitlines() if line.strip())


def wait_for(condition: tp.Callable[[], bool], what: str, timeout: float = JOB_TIMEOUT,
             step: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what} after {timeout:.0f} s"
        time.sleep(step)


def wait_jobs_done(env: Env, folders: tp.Sequence[Path]) -> dict[str, str]:
    """Wait for the last job of each XP to end; the final state of each."""
    ids = [job_id(folder) for folder in folders]
    wait_for(lambda: all(job_states(env).get(id_, "") not in ACTIVE for id_ in ids),
             f"jobs {' '.join(ids)}")
    states = job_states(env)
    return {folder.name: states[id_] for folder, id_ in zip(folders, ids)}


def log(folder: Path) -> str:
    """The log of the last job of the XP (submitit's, stdout and stderr)."""
    path = folder / "submitit" / f"{job_id(folder)}_0_log.out"
    return path.read_text(errors="replace") if path.exists() else f"(no log {path})"


def completed(states: dict[str, str], folders: tp.Sequence[Path]) -> bool:
    """Whether every job COMPLETED; otherwise fails with the end of the others' logs."""
    failed = [folder for folder in folders if states[folder.name] != "COMPLETED"]
    assert not failed, "\n".join(f"XP {folder.name}: {states[folder.name]}\n{log(folder)[-2000:]}"
                                  for folder in failed)
    return True


def table(output: str) -> dict[str, dict[str, str]]:
    """The rows of `dora grid`'s table by signature: name, state, and the train, valid
    and test groups as text."""
    rows = {}
    pattern = (r"^\d+\s+(?P<name>.*?)\s+(?P<state>[A-Z/]{3})\s+(?P<sig>[0-9a-f]{8})\s+\d*\s*"
               r"\|(?P<train>.*?)\|(?P<valid>.*?)\|(?P<test>.*)$")
    for match in re.finditer(pattern, output, re.MULTILINE):
        rows[match["sig"]] = match.groupdict()
    return rows


# ---------------------------------------------------------------------------------------
# Scheduling, training, the table and the fine-tuning grid


@pytest.fixture(scope="module")
def trained(env: Env, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tp.Any]:
    """`dora grid smoke --no_monitoring` then its jobs run to their end."""
    cwd = tmp_path_factory.mktemp("grid")
    submitted = dora(cwd, env, "grid", "smoke", "--no_monitoring")
    folders = xp_folders(cwd)
    states = wait_jobs_done(env, folders)
    return {"cwd": cwd, "submitted": submitted, "folders": folders, "states": states}


@pytest.mark.slow
def test_grid_schedules_trains_and_shows_metrics(env: Env, trained: dict[str, tp.Any]) -> None:
    folders = trained["folders"]
    assert len(folders) == len(SEEDS) + 1
    for folder in folders:
        assert f"Scheduled job {job_id(folder)} for sheep {folder.name}" in trained["submitted"]
    assert completed(trained["states"], folders)
    slurm = json.loads((folders[0] / "job.json").read_text())["slurm_config"]
    assert {key: slurm[key] for key in ["gpus", "cpus_per_task", "partition", "constraint",
                                        "setup"]} == {"gpus": 0, "cpus_per_task": 1,
                                                      "partition": None, "constraint": None,
                                                      "setup": []}
    epochs = {folder.name: len(history(folder)) for folder in folders}
    assert sorted(epochs.values()) == sorted([TINY["epochs"]] * len(SEEDS) + [LONG["epochs"]])
    rows = table(dora(trained["cwd"], env, "grid", "smoke", "--no_monitoring"))
    assert set(rows) == set(epochs)
    for sig, row in rows.items():
        assert row["state"] == "COM"
        epoch, reco = row["train"].split()  # epoch count, last train reco
        assert int(epoch) == epochs[sig] and float(reco) > 0
        assert re.search(r"-?\d+\.\d\d", row["test"]), row  # test nSDR at the end


@pytest.mark.slow
def test_refine_grid_continues_from_each_smoke_xp(env: Env,
                                                  trained: dict[str, tp.Any]) -> None:
    cwd = trained["cwd"]
    parents = {folder.name for folder in trained["folders"]}
    dora(cwd, env, "grid", "smoke_refine", "--no_monitoring")
    children = [folder for folder in xp_folders(cwd) if folder.name not in parents]
    assert len(children) == len(parents)
    assert completed(wait_jobs_done(env, children), children)
    started_from = set()
    for folder in children:
        text = log(folder)
        found = re.search(r"Starting from the best_state of (\S+)/checkpoint\.th", text)
        assert found, text[-3000:]
        started_from.add(Path(found[1]).name)
        assert len(history(folder)) == 2
    assert started_from == parents


def test_refine_grid_before_smoke_says_so(tmp_path: Path) -> None:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("DORA_")}
    environ.update(PYTHONPATH=str(REPO), MUSDB_PATH=str(tmp_path / "musdb"))
    result = command(tmp_path, environ, "dora", "-P", "demucs", "grid", "smoke_refine")
    assert result.returncode == 1
    error = one_line(result.stderr)
    assert "smoke_refine needs XP" in error and "run `dora grid smoke`" in error


# ---------------------------------------------------------------------------------------
# Cancelling, and resuming after scancel


@pytest.mark.slow
def test_grid_cancel_cancels_the_jobs(env: Env, tmp_path: Path) -> None:
    dora(tmp_path, env, "grid", "smoke", "--no_monitoring", "-p", "local")  # -p: Dora's flag
    ids = [job_id(folder) for folder in xp_folders(tmp_path)]
    partitions = subprocess.run(["squeue", "--noheader", "--format=%P", "--jobs", ",".join(ids)],
                                env=env, capture_output=True, text=True, timeout=30).stdout
    assert partitions.split() == ["local"] * len(ids)

    def one_running() -> bool:
        states = [job_states(env)[id_] for id_ in ids]
        assert set(states) & set(ACTIVE), f"the jobs ended before --cancel: {states}"
        return "RUNNING" in states
    wait_for(one_running, "a running job")
    canceled = dora(tmp_path, env, "grid", "smoke", "--cancel")
    for id_ in ids:
        assert f"Canceling job {id_} for sheep" in canceled
    wait_for(lambda: all(job_states(env)[id_] not in ACTIVE for id_ in ids), "the cancel")
    assert {job_states(env)[id_] for id_ in ids} == {"CANCELLED"}
    rows = table(dora(tmp_path, env, "grid", "smoke", "--no_monitoring"))
    assert [row["state"] for row in rows.values()] == ["CAN"] * len(ids)


@pytest.mark.slow
def test_job_killed_by_scancel_resumes_with_retry(env: Env, tmp_path: Path) -> None:
    dora(tmp_path, env, "grid", "smoke", LONG_XP, "--no_monitoring")
    [folder] = xp_folders(tmp_path)
    first = job_id(folder)

    def checkpointed() -> bool:  # after the first epoch's history and checkpoint
        if (folder / "checkpoint.th").exists() and history(folder):
            return True
        assert job_states(env)[first] in ACTIVE, f"job {first} ended:\n{log(folder)[-2000:]}"
        return False
    wait_for(checkpointed, "the first checkpoint", step=0.2)
    subprocess.run(["scancel", first], env=env, check=True, timeout=30)
    wait_for(lambda: job_states(env)[first] not in ACTIVE, "scancel")
    assert job_states(env)[first] == "CANCELLED"
    before = history(folder)
    assert 1 <= len(before) < LONG["epochs"], "the job ended before it was killed"
    retried = dora(tmp_path, env, "grid", "smoke", LONG_XP, "--no_monitoring",
                   "-r")
    assert job_id(folder) != first and f"Scheduled job {job_id(folder)}" in retried
    assert completed(wait_jobs_done(env, [folder]), [folder])
    resumed = re.search(r"Resuming from \S+/checkpoint\.th after (\d+) epochs", log(folder))
    assert resumed, log(folder)[-3000:]
    # Killed between an epoch's history and its checkpoint, the job redoes that epoch.
    kept = int(resumed[1])
    assert 1 <= kept and kept in (len(before), len(before) - 1)
    after = history(folder)
    assert len(after) == LONG["epochs"] and after[:kept] == before[:kept]


# ---------------------------------------------------------------------------------------
# Slurm settings of the grids: flags, then environment, then the grid's defaults


def test_flags_given_reads_dora_grid_flags() -> None:
    argv = ["-P", "demucs", "grid", "smoke", "pat", "-g", "1", "--dev", "--no_monitoring"]
    assert _slurm.flags_given(argv) == {"gpus", "partition"}
    assert _slurm.flags_given(["grid", "smoke", "--constraint", "a100", "-c", "x"]) == {
        "constraint", "comment"}
    assert _slurm.flags_given(["-x", "tests/test_slurm.py"]) == set()  # not dora grid


def test_smoke_slurm_settings(monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    for variable in [*_slurm.SLURM_ENV.values(), smoke.GPUS_ENV]:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(sys, "argv", ["dora", "grid", "smoke"])
    assert smoke.slurm() == {"gpus": 0, "mem_per_gpu": 3, "cpus_per_task": 1, "time": 60,
                             "partition": None, "constraint": None, "setup": []}
    monkeypatch.setenv(smoke.GPUS_ENV, "2")
    monkeypatch.setenv("DEMUCS_SLURM_PARTITION", "gpu")
    monkeypatch.setenv("DEMUCS_SLURM_SETUP", "module load cuda")
    settings = smoke.slurm()
    assert (settings["gpus"], settings["partition"]) == (2, "gpu")
    assert settings["setup"] == ["module load cuda"] and settings["constraint"] is None
    monkeypatch.setattr(sys, "argv", ["dora", "grid", "smoke", "-g", "1", "-p", "debug"])
    assert "gpus" not in smoke.slurm() and "partition" not in smoke.slurm()  # flags win
    monkeypatch.setenv(smoke.GPUS_ENV, "two")
    error = main_error(lambda argv: smoke.slurm(), [], capsys)  # in `dora`: one line
    assert error == ("demucs.train: error: DEMUCS_SMOKE_GPUS='two' must be a number of GPUs "
                     "(0 or more).")


# ---------------------------------------------------------------------------------------
# The tool's errors


@pytest.mark.parametrize("action, make, message", [
    ("status", "folder", "no cluster in {path} (no slurm.conf): start one with"),
    ("start", "file", "--dir {path} is a file, not a folder."),
    ("stop", "file", "--dir {path} is a file, not a folder."),
])
def test_slurm_local_errors_in_one_line(tmp_path: Path, action: str, make: str,
                                        message: str) -> None:
    path = tmp_path / "cluster"
    path.mkdir() if make == "folder" else path.write_text("")
    result = command(REPO, dict(os.environ), "tools.slurm_local", action, "--dir", str(path))
    assert result.returncode == 1
    error = one_line(result.stderr)
    assert error.startswith(f"tools.slurm_local: error: {message.format(path=path)}"), error
