"""User-facing errors, and the one way every command reports them.

Every error a user can fix (a bad file, a bad option, a missing program) is raised as a
subclass of `DemucsError`. Command-line entry points run their work inside
`report_errors(PROG, verbose)`, which prints `PROG: error: <one line>` to stderr and exits
with status 1 instead of showing a traceback; with `verbose`, the traceback is printed
first (to debug the tool itself).
"""
from __future__ import annotations

import sys
import traceback
import typing as tp
from contextlib import contextmanager

EXIT_USER_ERROR = 1


class DemucsError(Exception):
    """Base class of the errors that are reported to users as one clean line."""


class ModelLoadingError(DemucsError):
    """A model package or repository could not be loaded."""


class ConfigError(DemucsError):
    """A configuration value is invalid (unknown choice, missing path, ...)."""


class DatasetError(DemucsError):
    """A dataset folder or one of its files is missing, unreadable or inconsistent."""


class AudioError(DemucsError):
    """An audio file could not be read or written."""


class MissingProgramError(DemucsError):
    """An external program (ffmpeg, soundstretch) is needed but not on the PATH."""


def one_line(error: BaseException) -> str:
    """The message of `error` on a single line (whitespace runs collapsed)."""
    return " ".join(str(error).split()) or type(error).__name__


def allocation_failed(error: BaseException) -> str:
    """What an out-of-memory error says ran out and how much was asked, its first two
    sentences ("CUDA out of memory. Tried to allocate 2.00 GiB"), without the rest."""
    return ". ".join(one_line(error).split(". ")[:2]).rstrip(".")


def print_error(prog: str, message: str) -> None:
    """Print `PROG: error: MESSAGE` on stderr (e.g. for one failed track of a batch)."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


def exit_with_error(prog: str, message: str) -> tp.NoReturn:
    """Print `PROG: error: MESSAGE` on stderr and exit with status 1."""
    print_error(prog, message)
    sys.exit(EXIT_USER_ERROR)


@contextmanager
def report_errors(prog: str, verbose: bool = False,
                  also: tuple[type[BaseException], ...] = ()) -> tp.Iterator[None]:
    """Turn a `DemucsError` (or one of the `also` types) raised inside into one line on
    stderr and exit status 1; with `verbose`, print the traceback before that line."""
    caught: tuple[type[BaseException], ...] = (DemucsError, *also)
    try:
        yield
    except caught as error:
        if verbose:
            traceback.print_exc()
        exit_with_error(prog, one_line(error))


class TrainingError(DemucsError):
    """Training cannot go on (e.g. the loss became NaN); the last checkpoint is kept."""
