"""A one-node Slurm cluster on this machine, to try `dora grid` and to test the grids.

    python -m tools.slurm_local start --dir DIR [--partition local]
    python -m tools.slurm_local status --dir DIR
    python -m tools.slurm_local stop --dir DIR

`start` installs munge and Slurm with apt-get when they are missing, then runs a munge
daemon, slurmctld and slurmd as root with everything in DIR: the munge key, socket and
logs, `slurm.conf` (this machine as the only node, all its CPUs, one partition, free TCP
ports so that a real cluster's daemons on 6817/6818 are left alone), state, spool, pid and
log files. The machine's own configuration (/etc/munge, /etc/slurm, which installing
the packages may create) is neither read nor written. It waits for the node to be idle
and prints, on stdout, what makes Slurm's commands (and so `dora grid`) use this cluster:

    eval "$(python -m tools.slurm_local start --dir /tmp/slurm)"

The cluster keeps no accounting database, so the real `sacct` only answers "Slurm
accounting storage is disabled"; submitit, hence Dora, reads job states with `sacct`.
DIR/bin/sacct stands in for it (first on the PATH printed by `start`): it answers
submitit's query from the jobs that slurmctld keeps (finished ones for a week).

`stop` cancels the jobs of this cluster (only those), then stops its three daemons.
`start` and `stop` can be run again: they only start or stop what is needed.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from demucs.errors import DemucsError, MissingProgramError, report_errors

PROG = "tools.slurm_local"
PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")
CLUSTER_NAME = "demucs"
START_TIMEOUT = 60.  # seconds for the node to become idle
STOP_TIMEOUT = 15.  # seconds for the jobs, then each daemon, to end
READY_STATES = ("idle", "mix", "alloc")  # sinfo's short node states of a working node
MEMORY_KEPT = 0.1  # fraction of the machine's memory not offered to jobs
FINISHED_JOBS_KEPT = 7 * 24 * 3600  # seconds slurmctld remembers finished jobs (sacct)

# Answers submitit's `sacct -o JobID,State,NodeList --parsable2 -j ID ...` with every job
# that slurmctld knows, those of other users and finished ones included.
SACCT = """#!/bin/sh
# sacct of the Slurm cluster of tools.slurm_local, which keeps no accounting database:
# the jobs slurmctld still knows, in the format submitit (hence Dora) asks for.
case " $* " in
  *" JobID,State,NodeList "*) ;;
  *) echo "sacct: error: this cluster (tools.slurm_local) keeps no accounting; only" \\
          "'sacct -o JobID,State,NodeList --parsable2' (submitit's query) works" >&2
     exit 1 ;;
esac
echo 'JobID|State|NodeList'
SLURM_CONF='{conf}' exec squeue --noheader --states=all --format='%i|%T|%N'
"""


@dataclass(frozen=True)
class Daemon:
    """A daemon of the cluster: its program, pid file and log file."""
    name: str
    pid_file: Path
    log_file: Path


@dataclass(frozen=True)
class Cluster:
    """The files of the cluster in `root`, and the environment of its commands."""
    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_key(self) -> Path:
        return self.root / "munge.key"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge.socket"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def munged(self) -> Daemon:
        return Daemon("munged", self.root / "munged.pid", self.root / "munged.log")

    @property
    def slurmctld(self) -> Daemon:
        return Daemon("slurmctld", self.root / "slurmctld.pid", self.root / "slurmctld.log")

    @property
    def slurmd(self) -> Daemon:
        return Daemon("slurmd", self.root / "slurmd.pid", self.root / "slurmd.log")

    def daemons(self) -> list[Daemon]:
        """In the order they start; they stop in the reverse order."""
        return [self.munged, self.slurmctld, self.slurmd]

    def env(self) -> dict[str, str]:
        """This process's environment, with Slurm's commands using this cluster."""
        return {**os.environ, **exports(self)}


def exports(cluster: Cluster) -> dict[str, str]:
    """The variables that make Slurm's commands (and submitit's sacct) use `cluster`."""
    path = os.environ.get("PATH", os.defpath)
    if str(cluster.bin) not in path.split(os.pathsep):
        path = os.pathsep.join([str(cluster.bin), path])
    return {"SLURM_CONF": str(cluster.conf), "PATH": path}


def info(message: str) -> None:
    """Progress messages go to stderr: stdout only gets the `export` lines of `start`."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Installation


def program(name: str) -> str | None:
    """The path of the program `name`, also looked for in the sbin folders."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def missing_programs() -> list[str]:
    return [name for name in PROGRAMS if program(name) is None]


def apt_get(args: list[str], log: Path) -> bool:
    """Run `apt-get ARGS` non-interactively, appending its output to `log`."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open(log, "a") as out:
        return subprocess.run(["apt-get", *args], env=env, stdout=out, stderr=out,
                              stdin=subprocess.DEVNULL).returncode == 0


def install(log: Path) -> None:
    """Install munge and Slurm with apt-get when one of their programs is missing."""
    missing = missing_programs()
    if not missing:
        return
    what = f"{', '.join(missing)} not found"
    if shutil.which("apt-get") is None:
        raise MissingProgramError(f"{what} and apt-get is not available: install munge and "
                                  f"Slurm ({' '.join(PACKAGES)}) with your package manager.")
    info(f"Installing {' '.join(PACKAGES)} with apt-get (log: {log})")
    command = ["install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if not apt_get(command, log) and not (apt_get(["update", "-q"], log)
                                          and apt_get(command, log)):
        raise DemucsError(f"{what}; `apt-get install {' '.join(PACKAGES)}` failed "
                          f"(see {log}).")
    if missing_programs():
        raise MissingProgramError(f"{', '.join(missing_programs())} still not found after "
                                  f"installing {' '.join(PACKAGES)} (see {log}).")


# ---------------------------------------------------------------------------------------
# Configuration


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that nothing listens on now."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def memory_mb() -> int:
    """Memory offered to jobs: the machine's (/proc/meminfo) less a margin, in MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * (1 - MEMORY_KEPT))
    raise DemucsError("no MemTotal in /proc/meminfo: cannot tell this machine's memory.")


def node_name() -> str:
    """The short host name (`hostname -s`), the name of the node."""
    return socket.gethostname().split(".")[0]


def slurm_conf(cluster: Cluster, partition: str, ports: tp.Sequence[int]) -> str:
    """slurm.conf of a one-node cluster with all its files in `cluster.root`."""
    root, node = cluster.root, node_name()
    cpus = len(os.sched_getaffinity(0))
    lines = [
        f"ClusterName={CLUSTER_NAME}",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "# munge of this cluster, never the machine's own (/etc/munge)",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={cluster.munge_socket}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={cluster.slurmctld.pid_file}",
        f"SlurmdPidFile={cluster.slurmd.pid_file}",
        f"SlurmctldLogFile={cluster.slurmctld.log_file}",
        f"SlurmdLogFile={cluster.slurmd.log_file}",
        "# no cgroups, no accounting: processes are tracked through /proc",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "# jobs share the node CPU by CPU",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SlurmdParameters=config_overrides",
        "# fast: a node back as soon as it answers, 2 s between SIGTERM and SIGKILL",
        "ReturnToService=2",
        "SlurmdTimeout=30",
        "SlurmctldTimeout=10",
        "MessageTimeout=10",
        "InactiveLimit=0",
        "KillWait=2",
        "# requeue (submitit on timeouts and preemption), finished jobs kept for sacct",
        "JobRequeue=1",
        f"MinJobAge={FINISHED_JOBS_KEPT}",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb()} "
        "State=UNKNOWN",
        f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def check_folder(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise DemucsError(f"--dir {root} is a file, not a folder.")
    if any(char.isspace() or char == "#" for char in str(root)):
        raise DemucsError(f"--dir {root}: slurm.conf cannot hold paths with spaces or '#'; "
                          "choose another folder.")


def write_files(cluster: Cluster, partition: str) -> None:
    """The munge key (unless there is one), slurm.conf with new ports, the sacct script."""
    for folder in (cluster.root, cluster.root / "state", cluster.root / "spool", cluster.bin):
        folder.mkdir(parents=True, exist_ok=True)
    if not cluster.munge_key.exists():
        descriptor = os.open(cluster.munge_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as key:
            key.write(os.urandom(1024))
    cluster.conf.write_text(slurm_conf(cluster, partition, free_ports(2)))
    sacct = cluster.bin / "sacct"
    sacct.write_text(SACCT.format(conf=cluster.conf))
    sacct.chmod(0o755)


# ---------------------------------------------------------------------------------------
# Daemons


def running(daemon: Daemon) -> int | None:
    """The pid of `daemon` if its pid file names a live process of that program (not a
    zombie)."""
    try:
        pid = int(daemon.pid_file.read_text().split()[0])
        stat = Path(f"/proc/{pid}/stat").read_text()  # PID (NAME) STATE ...
    except (OSError, ValueError, IndexError):
        return None
    name, state = stat[stat.find("(") + 1:stat.rfind(")")], stat[stat.rfind(")") + 2:][:1]
    return pid if name == daemon.name and state != "Z" else None


def wait_for(condition: tp.Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def launch(cluster: Cluster, daemon: Daemon) -> None:
    """Start `daemon` (it forks to the background) and wait for its pid file."""
    if daemon.name == "munged":
        # --force: the socket's folder need not be reachable by every user (DIR may be
        # private, as pytest's temporary folders are); the only user here is root.
        args = ["--force", f"--key-file={cluster.munge_key}",
                f"--socket={cluster.munge_socket}", f"--pid-file={daemon.pid_file}",
                f"--log-file={daemon.log_file}", f"--seed-file={cluster.root / 'munged.seed'}"]
    elif daemon.name == "slurmd":
        args = ["-f", str(cluster.conf), "-N", node_name()]
    else:
        args = ["-f", str(cluster.conf)]
    command = [program(daemon.name) or daemon.name, *args]
    result = subprocess.run(command, env=cluster.env(), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    started = result.returncode == 0 and wait_for(lambda: running(daemon) is not None, 10)
    if not started:
        said = " ".join(result.stderr.split())[:300]
        raise DemucsError(f"{daemon.name} did not start{': ' + said if said else ''} "
                          f"(see {daemon.log_file}).")


def slurm(cluster: Cluster, *command: str) -> subprocess.CompletedProcess:
    """Run a Slurm client command on this cluster."""
    return subprocess.run(list(command), env=cluster.env(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)


def node_state(cluster: Cluster) -> str:
    """sinfo's short state of the node (idle, mix, down*, ...), or "" without answer."""
    result = slurm(cluster, "sinfo", "--noheader", "--Node", "--format=%t")
    return result.stdout.strip() if result.returncode == 0 else ""


def wait_ready(cluster: Cluster) -> None:
    """Wait for the node to take jobs; fail as soon as a daemon has died."""
    def ready() -> bool:
        for daemon in cluster.daemons():
            if running(daemon) is None:
                raise DemucsError(f"{daemon.name} stopped after it started (see "
                                  f"{daemon.log_file}).")
        return node_state(cluster) in READY_STATES
    if not wait_for(ready, START_TIMEOUT, step=0.5):
        state = node_state(cluster) or "no answer from slurmctld"
        raise DemucsError(f"the node is not idle after {START_TIMEOUT:.0f} s (sinfo: {state}; "
                          f"see {cluster.slurmd.log_file} and {cluster.slurmctld.log_file}).")


def terminate(daemon: Daemon) -> None:
    """SIGTERM, then SIGKILL if it is still there after STOP_TIMEOUT."""
    pid = running(daemon)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    if not wait_for(lambda: running(daemon) is None, STOP_TIMEOUT):
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: running(daemon) is None, STOP_TIMEOUT)
    info(f"Stopped {daemon.name} (pid {pid}).")


def job_ids(cluster: Cluster) -> list[str]:
    """The jobs of this cluster that have not ended."""
    result = slurm(cluster, "squeue", "--noheader", "--format=%A")
    return result.stdout.split() if result.returncode == 0 else []


def cancel_jobs(cluster: Cluster) -> None:
    ids = job_ids(cluster)
    if ids:
        info(f"Cancelling the jobs of this cluster: {' '.join(ids)}")
        slurm(cluster, "scancel", *ids)
        wait_for(lambda: not job_ids(cluster), STOP_TIMEOUT)


# ---------------------------------------------------------------------------------------
# Commands


def start(cluster: Cluster, partition: str) -> None:
    check_folder(cluster.root)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", partition):
        raise DemucsError(f"--partition {partition!r}: use letters, digits, '_', '.', '-'.")
    if os.geteuid() != 0:
        raise DemucsError("start runs Slurm's daemons as root (SlurmUser=root): run it as "
                          "root.")
    cluster.root.mkdir(parents=True, exist_ok=True)
    install(cluster.root / "apt.log")
    live = [daemon.name for daemon in cluster.daemons() if running(daemon) is not None]
    if len(live) == len(cluster.daemons()):
        info(f"The cluster in {cluster.root} is already running.")
    elif live:  # keep the configuration (ports) the running daemons use
        info(f"Starting what is not running ({', '.join(live)} already are).")
    else:
        write_files(cluster, partition)
    for daemon in cluster.daemons():
        if running(daemon) is None:
            launch(cluster, daemon)
    wait_ready(cluster)
    info(f"Slurm cluster up: node {node_name()}, configuration {cluster.conf}. "
         "To use it from a shell:")
    print(f"export SLURM_CONF={cluster.conf}")
    print(f"export PATH={cluster.bin}:$PATH", flush=True)


def stop(cluster: Cluster) -> None:
    check_folder(cluster.root)
    if running(cluster.slurmctld) is not None and cluster.conf.exists():
        cancel_jobs(cluster)
    stopped = False
    for daemon in reversed(cluster.daemons()):
        stopped |= running(daemon) is not None
        terminate(daemon)
    info(f"The cluster in {cluster.root} is stopped." if stopped else
         f"No cluster running in {cluster.root}.")


def status(cluster: Cluster) -> None:
    check_folder(cluster.root)
    if not cluster.conf.exists():
        raise DemucsError(f"no cluster in {cluster.root} (no slurm.conf): start one with "
                          f"`python -m {PROG} start --dir {cluster.root}`.")
    for daemon in cluster.daemons():
        pid = running(daemon)
        print(f"{daemon.name}: " + (f"running (pid {pid})" if pid else "stopped"))
    if running(cluster.slurmctld) is not None:
        for command in (["sinfo"], ["squeue", "--states=all"]):
            result = slurm(cluster, *command)
            print(result.stdout + result.stderr, end="")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, required=True,
                        help="Folder of the cluster's configuration, keys, state and logs.")
    parser.add_argument("-p", "--partition", default="local",
                        help="Name of the partition (start; default: local).")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Show the full traceback of errors.")
    return parser


def main(argv: tp.Sequence[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    cluster = Cluster(args.dir.resolve())
    also = (OSError, subprocess.SubprocessError)
    with report_errors(PROG, args.verbose, also=also):
        if args.command == "start":
            start(cluster, args.partition)
        elif args.command == "stop":
            stop(cluster)
        else:
            status(cluster)


if __name__ == "__main__":
    main()
