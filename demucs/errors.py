"""User-facing errors.

Every error a user can fix (a bad file, a bad option, a missing program) is raised as a
subclass of `DemucsError`. Command-line entry points catch `DemucsError`, print its
one-line message and exit with a non-zero status instead of showing a traceback.
"""


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
