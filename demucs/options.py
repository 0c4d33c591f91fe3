"""The options of a separation, each declared once: the `demucs` command's flags, the
keyword arguments of `api.Separator` and `update_parameter`, and their checks all come
from the fields of the records here.

- `SeparationOptions`: how the model is applied (device, shifts, overlap, split,
  segment, jobs; and, for the Python API only, progress, callback and callback_arg).
- `OutputOptions`: how the `demucs` command writes the stems (folder and file names,
  format, bit depth, clipping, two stems).

A field is declared with `option(default, *flags, check=..., help=...)`: its flags (none
for the API-only fields), the check that turns a bad value into a one-line `ConfigError`,
and what `argparse` needs (help, type, action, choices). Building a record checks every
field, errors naming it by its keyword (`shifts must be ...`); `from_args` reads the
flags `add_flags` declared and names it by its flag instead (`--shifts must be ...`).
A new option is one field here; the code that uses it reads it from the record.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import math
import typing as tp
from dataclasses import Field, dataclass, field, fields
from pathlib import Path

import torch

from .audio import MP3_BITRATES, MP3_PRESETS, SAVE_SUFFIXES, check_mp3_options, pcm_subtype
from .backends import BACKENDS, PRECISIONS, check_precision, check_runtime
from .errors import ConfigError, DemucsError

Check = tp.Callable[[str, tp.Any], tp.Any]  # (the option's name, its value) -> checked value
Callback = tp.Callable[[tp.Dict[str, tp.Any]], None]
OptionsT = tp.TypeVar("OptionsT", bound="Options")
FuncT = tp.TypeVar("FuncT", bound=tp.Callable[..., tp.Any])
_SPEC = "demucs.option"  # the key of a field's `OptionSpec` in its metadata


@dataclass(frozen=True)
class OptionSpec:
    """How a field is given on the command line, and checked."""
    flags: tp.Tuple[str, ...]  # none: a field of the Python API only
    check: tp.Optional[Check]
    group: tp.Optional[str]  # the flags of one group exclude each other
    parser_kwargs: tp.Dict[str, tp.Any]  # for `add_argument`: help, type, action, ...

    @property
    def flag(self) -> str:
        """The name of the option in the command's errors: its longest flag."""
        return max(self.flags, key=len)

    def checked(self, name: str, value: tp.Any) -> tp.Any:
        choices = self.parser_kwargs.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, "
                              f"got {value!r}.")
        return value if self.check is None else self.check(name, value)


def option(default: tp.Any, *flags: str, check: tp.Optional[Check] = None,
           group: tp.Optional[str] = None, **parser_kwargs: tp.Any) -> tp.Any:
    """A field of an options record: its default, its flags (none: API only), its check,
    the `group` of flags it excludes, and the `add_argument` settings (`help`, ...)."""
    spec = OptionSpec(tuple(flags), check, group, parser_kwargs)
    return field(default=default, metadata={_SPEC: spec})


def spec_of(item: Field) -> OptionSpec:
    return item.metadata[_SPEC]


@dataclass(frozen=True)
class Options:
    """Base of the option records: frozen dataclasses whose fields come from `option`."""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = spec_of(item).checked(item.name, getattr(self, item.name))
            object.__setattr__(self, item.name, value)  # frozen: set once, when checked
        self.check_together()

    def check_together(self) -> None:
        """Checks across fields, after each field's own (for subclasses)."""

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """Add a flag for each field that has flags, its `dest` the field's name."""
        groups: tp.Dict[str, tp.Any] = {}
        for item in fields(cls):
            spec = spec_of(item)
            if not spec.flags:
                continue
            if spec.group is not None and spec.group not in groups:
                groups[spec.group] = parser.add_mutually_exclusive_group()
            target = parser if spec.group is None else groups[spec.group]
            target.add_argument(*spec.flags, dest=item.name, default=item.default,
                                **spec.parser_kwargs)

    @classmethod
    def from_args(cls: tp.Type[OptionsT], args: argparse.Namespace,
                  **api_only: tp.Any) -> OptionsT:
        """The record of the flags parsed into `args` (see `add_flags`), errors naming
        the flags; `api_only` gives the fields that have no flag."""
        given = {item.name: spec_of(item).checked(spec_of(item).flag, getattr(args, item.name))
                 for item in fields(cls) if spec_of(item).flags}
        return cls(**given, **api_only)

    def as_dict(self) -> tp.Dict[str, tp.Any]:
        """`{field: value}`, e.g. to give them as keyword arguments."""
        return {item.name: getattr(self, item.name) for item in fields(self)}


def takes_options(record: tp.Type[Options], default: tp.Any = inspect.Parameter.empty
                  ) -> tp.Callable[[FuncT], FuncT]:
    """Show the fields of `record` as arguments of the decorated function, in place of
    its `*args, **options` (for `help()` and `inspect.signature`), with `default` as
    their default (when given, else the field's). The function gets them by keyword:
    the positional ones are named after the fields, in their order (upstream's order)."""
    def decorate(func: FuncT) -> FuncT:
        signature = inspect.signature(func)
        kept = [p for p in signature.parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        added = [inspect.Parameter(item.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                   default=item.default if default is inspect.Parameter.empty
                                   else default, annotation=item.type)
                 for item in fields(record)]
        names = [item.name for item in fields(record)]

        @functools.wraps(func)
        def named(*args: tp.Any, **options: tp.Any) -> tp.Any:
            own, extra = args[:len(kept)], args[len(kept):]
            if len(extra) > len(names):
                raise TypeError(f"{func.__qualname__}() takes at most "
                                f"{len(kept) + len(names)} positional arguments")
            for name, value in zip(names, extra):
                if name in options:
                    raise TypeError(f"{func.__qualname__}() got multiple values for "
                                    f"argument {name!r}")
                options[name] = value
            return func(*own, **options)

        named.__signature__ = signature.replace(parameters=kept + added)  # type: ignore
        return tp.cast(FuncT, named)
    return decorate


# Checks: (name, value) -> the value, or a `ConfigError` naming the option
def count(name: str, value: tp.Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer, 0 or more, got {value!r}.")
    return value


def fraction(name: str, value: tp.Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}.")
    return float(value)


def seconds_or_none(name: str, value: tp.Any) -> tp.Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}.")
    return float(value)


def callable_or_none(name: str, value: tp.Any) -> tp.Any:
    if value is not None and not callable(value):
        raise ConfigError(f"{name} must be callable or None, got {value!r}.")
    return value


def mapping_or_none(name: str, value: tp.Any) -> tp.Dict[str, tp.Any]:
    if value is not None and not isinstance(value, tp.Mapping):
        raise ConfigError(f"{name} must be a dict or None, got {value!r}.")
    return dict(value or {})


def default_device() -> str:
    """cuda if available, else mps if available, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: tp.Union[str, torch.device]) -> torch.device:
    """`device` as a `torch.device`; `ConfigError` when it is unknown or not available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"Unknown device {str(device)!r}, use cpu, cuda, cuda:N or mps.") \
            from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"Device {device} asked for, but CUDA is not available; "
                              "use -d cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"Device {device} asked for, but there are only "
                              f"{torch.cuda.device_count()} CUDA device(s).")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"Device {device} asked for, but MPS is not available; "
                              "use -d cpu.")
    elif dev.type != "cpu":
        raise ConfigError(f"Unsupported device {device}, use cpu, cuda, cuda:N or mps.")
    return dev


def device_or_default(name: str, value: tp.Any) -> torch.device:
    return check_device(default_device() if value is None else value)


def runtime_installed(name: str, value: tp.Any) -> str:
    check_runtime(value, name)  # one line saying what to install
    return str(value)


def lame_bitrate(name: str, value: tp.Any) -> int:
    return _lame(name, value, value, MP3_PRESETS[0])


def lame_preset(name: str, value: tp.Any) -> int:
    return _lame(name, value, MP3_BITRATES[1], value)


def _lame(name: str, value: int, bitrate: int, preset: int) -> int:
    """`check_mp3_options` on one of its values (`value`), the other a valid one."""
    try:
        check_mp3_options(bitrate, preset)
    except DemucsError as error:
        raise ConfigError(f"{name}: {error}") from None
    return value


@dataclass(frozen=True)
class SeparationOptions(Options):
    """How a model is applied to a track: `api.Separator`'s keyword arguments (those of
    upstream Demucs 4.1) and the `demucs` command's flags of the same meaning."""
    # Where
    device: tp.Union[str, torch.device, None] = option(
        None, "-d", "--device", check=device_or_default,
        help="Device to use, default is cuda if available, else mps if available, else cpu.")
    # Averaging over random shifts
    shifts: int = option(
        1, "--shifts", type=int, check=count,
        help="Number of random shifts for equivariant stabilization. Increase separation "
             "time but improves quality for Demucs. 10 was used in the original paper.")
    # Segments
    overlap: float = option(0.25, "--overlap", type=float, check=fraction,
                            help="Overlap between the splits.")
    split: bool = option(
        True, "--no-split", action="store_false", group="split",
        help="Doesn't split audio in chunks. This can use large amounts of memory.")
    segment: tp.Optional[float] = option(
        None, "--segment", type=float, group="split", check=seconds_or_none,
        help="Set split size of each chunk, in seconds. This can help save memory of "
             "graphic card. Transformer models allow at most the length they were trained on.")
    jobs: int = option(
        0, "-j", "--jobs", type=int, check=count,
        help="Number of jobs. This can increase memory usage but will be much faster when "
             "multiple cores are available.")
    # Python API only (the command always shows progress bars)
    progress: bool = option(False)  # a progress bar per model and pass
    callback: tp.Optional[Callback] = option(None, check=callable_or_none)  # see api's doc
    callback_arg: tp.Optional[tp.Mapping[str, tp.Any]] = option(None, check=mapping_or_none)
    # What runs the model (demucs/backends.py, docs/onnx.md)
    backend: str = option(
        "torch", "--backend", choices=list(BACKENDS), check=runtime_installed,
        help="Run the model with PyTorch (default), or its ONNX graphs with onnxruntime or "
             "OpenVINO (exported once into ~/.cache/demucs/onnx, or -n an ONNX folder of "
             "tools.export_onnx); those run on the CPU.")
    precision: str = option(
        "float32", "--precision", choices=list(PRECISIONS),
        help="Compute in float32 (default) or bf16: about twice as fast with the torch and "
             "openvino backends where the CPU has bf16 instructions (AVX512-BF16, AMX) or "
             "on a recent GPU, and much slower on a CPU without them; the stems differ "
             "from float32's by about 1/300 of their level (docs/onnx.md).")

    def check_together(self) -> None:
        device = tp.cast(torch.device, self.device)
        if self.backend != "torch" and device.type != "cpu":
            raise ConfigError(f"backend {self.backend} runs on the CPU, not {device}; use "
                              "-d cpu.")
        check_precision(self.backend, self.precision)


@dataclass(frozen=True)
class OutputOptions(Options):
    """How the `demucs` command writes the stems of each track. Its checks across fields
    name the flags: this record is the command's only."""
    # Where
    out: Path = option(
        Path("separated"), "-o", "--out", type=Path,
        help="Folder where to put extracted tracks. A subfolder with the model name will "
             "be created.")
    filename: str = option(
        "{track}/{stem}.{ext}", "--filename",
        help="Set the name of output file. Use {track}, {trackext}, {stem}, {ext} for the "
             "track name without extension, the track extension, the stem name and the "
             "default output extension. Default is {track}/{stem}.{ext}.")
    # Which stems
    stem: tp.Optional[str] = option(
        None, "--two-stems", metavar="STEM",
        help="Only separate audio into {STEM} and no_{STEM}.")
    other_method: str = option(
        "add", "--other-method", choices=["none", "add", "minus"],
        help="With --two-stems, how to get the rest: 'add' sums the other stems into "
             "no_{STEM}, 'minus' writes the original track minus {STEM} as minus_{STEM}, "
             "'none' writes only {STEM}.")
    # Samples
    int24: bool = option(False, "--int24", action="store_true", group="depth",
                         help="Save wav (or flac) output as 24 bits.")
    float32: bool = option(False, "--float32", action="store_true", group="depth",
                           help="Save wav output as float32 (2x bigger).")
    clip_mode: str = option(
        "rescale", "--clip-mode", choices=["rescale", "clamp", "none"],
        help="Strategy for avoiding clipping: rescaling entire signal if necessary "
             "(rescale), hard clipping (clamp) or none.")
    # Format
    flac: bool = option(False, "--flac", action="store_true", group="format",
                        help="Convert the output wavs to flac.")
    mp3: bool = option(False, "--mp3", action="store_true", group="format",
                       help="Convert the output wavs to mp3.")
    mp3_bitrate: int = option(320, "--mp3-bitrate", type=int, check=lame_bitrate,
                              help="Bitrate of converted mp3, in kbps (8 to 320).")
    mp3_preset: int = option(
        2, "--mp3-preset", type=int, check=lame_preset,
        help="Encoder preset of MP3, 2 for highest quality, 7 for fastest speed. Default is 2.")

    @property
    def ext(self) -> str:
        """The extension of the files written, `{ext}` in the template."""
        return "mp3" if self.mp3 else "flac" if self.flac else "wav"

    def save_kwargs(self) -> tp.Dict[str, tp.Any]:
        """The keyword arguments of `audio.save_audio` for a stem."""
        return {"bitrate": self.mp3_bitrate, "preset": self.mp3_preset, "clip": self.clip_mode,
                "as_float": self.float32, "bits_per_sample": 24 if self.int24 else 16}

    def path(self, model: str, track: Path, stem: str) -> Path:
        """The file of `stem` of `track`: `OUT/MODEL/` + the `--filename` template."""
        track_name, _, track_ext = track.name.rpartition(".")
        if not track_name:  # no extension
            track_name, track_ext = track.name, ""
        try:
            relative = self.filename.format(track=track_name, trackext=track_ext, stem=stem,
                                            ext=self.ext)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as error:
            raise ConfigError(f"Invalid --filename {self.filename!r}: {error!r}; use the "
                              "fields {track}, {trackext}, {stem} and {ext}.") from None
        return self.out / model / relative

    def check_together(self) -> None:
        """The template renders, is relative, names each stem apart, and its extension is
        a format we write that agrees with --mp3/--flac/--float32."""
        sample = self.path("model", Path("track.wav"), "drums")
        if Path(self.filename).is_absolute():
            raise ConfigError(f"--filename {self.filename!r} must be relative to the output "
                              "folder (-o).")
        if self.path("model", Path("track.wav"), "bass") == sample:
            raise ConfigError(f"--filename {self.filename!r} would write every stem to the "
                              "same file; use {stem} in it.")
        suffix = sample.suffix.lower()
        if suffix not in SAVE_SUFFIXES:
            raise ConfigError(f"--filename {self.filename!r} gives files ending in {suffix!r}; "
                              f"the output formats are {', '.join(SAVE_SUFFIXES)} (use {{ext}}).")
        if (self.mp3 or self.flac) and suffix != "." + self.ext:
            raise ConfigError(f"--filename {self.filename!r} gives {suffix} files but "
                              f"--{self.ext} asks for .{self.ext}; use {{ext}} in the template.")
        if suffix != ".mp3":
            try:
                pcm_subtype(suffix, 24 if self.int24 else 16, self.float32)
            except DemucsError as error:
                raise ConfigError(f"--float32 with {suffix} output: {error}") from None
