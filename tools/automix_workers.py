"""Run the jobs of `tools.automix` in this process or in worker processes.

Workers are spawned (fresh interpreters: nothing inherited from the parent's threads or
caches) and take one job at a time, so that the parent always knows which job each worker
is on. A worker that dies (killed, out of memory, a crash in native code) thus becomes a
one-line `WorkerError` naming that job, instead of a broken pool that names nothing; the
results received before are kept by the caller (`done` runs as each job finishes).

Each worker also gets its own numba cache folder (`NUMBA_CACHE_DIR`): processes that
compile and cache the same functions at the same time can leave a corrupt cache behind,
which then crashes every later run. The analysis compiles nothing (plain numpy); this
keeps any library that does from sharing a cache between workers.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import traceback
import typing as tp
from multiprocessing.connection import Connection, wait

from tqdm import tqdm

from demucs.errors import DemucsError

Job = tuple[tp.Any, ...]
Done = tp.Callable[[int, tp.Any], None]


class WorkerError(DemucsError):
    """A worker process died while on a job (killed, out of memory, crashed)."""


def _serve(conn: Connection) -> None:
    """Worker loop: run each (fn, args) received on `conn` until None, send the results."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us on Ctrl-C
    import torch
    torch.set_num_threads(1)
    conn.send((True, None))  # ready
    while True:
        message = conn.recv()
        if message is None:
            return
        fn, args = message
        try:
            conn.send((True, fn(*args)))
        except Exception as error:  # noqa: BLE001 - raised again in the parent
            conn.send((False, _portable(error)))


def _portable(error: Exception) -> Exception:
    """`error` as it can travel to the parent: user errors as they are, others as a
    RuntimeError carrying the worker's traceback."""
    if isinstance(error, DemucsError):
        try:
            pickle.dumps(error)
            return error
        except Exception:  # noqa: BLE001 - any pickling failure
            return DemucsError(str(error))
    return RuntimeError(f"{type(error).__name__} in a worker process:\n"
                        f"{traceback.format_exc()}")


@contextlib.contextmanager
def _environ(**values: str) -> tp.Iterator[None]:
    """`os.environ` with `values` set, restored on exit."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Workers:
    """Runs jobs in `count` worker processes, or here when `count` is at most 1.

    Use as a context manager; processes start with the first jobs and stop at the end."""

    def __init__(self, count: int):
        self.count = count
        self.processes: list[tp.Any] = []
        self.conns: list[Connection] = []
        self.tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(abort=kind is not None)

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.tmp = tempfile.TemporaryDirectory(prefix="automix-workers-")
        for index in range(self.count):
            parent, child = context.Pipe()
            process = context.Process(target=_serve, args=(child,), daemon=True,
                                      name=f"automix-{index}")
            # The environment is read when the process starts: its numba cache is its own
            # from its first import on.
            with _environ(NUMBA_CACHE_DIR=os.path.join(self.tmp.name, str(index))):
                process.start()
            child.close()
            self.processes.append(process)
            self.conns.append(parent)
        for worker in range(self.count):  # wait until each has imported what it needs
            wait([self.conns[worker], self.processes[worker].sentinel])
            self._receive(worker, None)

    def close(self, abort: bool = False) -> None:
        """Stop the workers (at once with `abort`, even busy ones) and remove their
        caches."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=0 if abort else 10)
            if process.is_alive():
                process.terminate()
                process.join()
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None

    def run(self, fn: tp.Callable[..., tp.Any], jobs: tp.Sequence[Job],
            labels: tp.Sequence[str], done: Done, desc: str) -> None:
        """`fn(*job)` for each job, calling `done(index, result)` as each one finishes.
        `labels[index]` says what a job does ("analysing track 'x'") in errors."""
        with tqdm(total=len(jobs), desc=desc, unit="track", file=sys.stderr, leave=False,
                  disable=None) as bar:  # no bar unless stderr is a terminal
            if self.count <= 1:
                for index, job in enumerate(jobs):
                    done(index, fn(*job))
                    bar.update()
                return
            if jobs and not self.processes:
                self._start()
            self._dispatch(fn, jobs, labels, done, bar.update)

    def _dispatch(self, fn: tp.Callable[..., tp.Any], jobs: tp.Sequence[Job],
                  labels: tp.Sequence[str], done: Done, tick: tp.Callable[[], tp.Any]) -> None:
        pending = list(range(len(jobs)))[::-1]
        busy: dict[int, int] = {}  # worker -> job index

        def assign(worker: int) -> None:
            if pending:
                busy[worker] = pending.pop()
                self.conns[worker].send((fn, jobs[busy[worker]]))

        for worker in range(len(self.processes)):
            assign(worker)
        while busy:
            waiting: dict[tp.Any, int] = {self.conns[w]: w for w in busy}
            waiting.update({self.processes[w].sentinel: w for w in busy})
            errors = []
            for worker in sorted({waiting[ready] for ready in wait(list(waiting))}):
                index = busy.pop(worker)
                try:
                    ok, value = self._receive(worker, labels[index])
                except WorkerError as error:
                    errors.append(error)
                    continue
                if not ok:
                    errors.append(value)
                    continue
                done(index, value)
                tick()
                assign(worker)
            if errors:  # after keeping the results that came with them
                raise errors[0]

    def _receive(self, worker: int, label: str | None) -> tuple[bool, tp.Any]:
        """The (ok, result or error) of `worker`'s job (`label`; None: its start); a
        WorkerError if it died."""
        conn, process = self.conns[worker], self.processes[worker]
        try:
            if conn.poll():
                return tp.cast(tuple[bool, tp.Any], conn.recv())
        except (EOFError, OSError):
            pass
        process.join(timeout=5)
        reason = _exit_reason(process.exitcode)
        if label is None:
            raise WorkerError(f"A worker process could not start ({reason}); its error is "
                              "printed above. --workers 0 works in the main process.")
        raise WorkerError(
            f"A worker process died ({reason}) while {label}; what was finished is kept: "
            "run the same command again with --overwrite to resume (--workers 0 works in "
            "the main process).")
