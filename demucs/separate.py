"""The `demucs` command: separate tracks into their sources with a pre-trained model.

    demucs [-n NAME] [--repo DIR] [-o OUT] TRACK [TRACK ...]
    demucs --list-models [--repo DIR]

writes `OUT/NAME/TRACK/SOURCE.wav` for every source of the model, with the options of
upstream Demucs 4.1. Options, the output folder, the `--filename` template and the device
are checked before the model loads, and so is that no two outputs share a file: any of
these errors is one line on stderr and exit status 1. Then each track is separated on its
own: a track that fails (missing, unreadable, too short, an output that cannot be
written) is reported in one line naming it, the others are still separated, and a final
line `separated N of M tracks; failed: ...` ends a run that had failures with status 1.
`-v` prints the traceback of every error.
"""
from __future__ import annotations

import argparse
import os
import traceback
import typing as tp
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from .api import Separator
from .audio import AudioWriter
from .bag import BagOfModels
from .errors import (DemucsError, allocation_failed, exit_with_error, one_line, print_error,
                     report_errors)
from .graphs import is_graph_folder
from .options import OutputOptions, SeparationOptions
from .pretrained import add_model_flags, list_models, model_label
from .utils import map_large_buffers

Stems = tp.Dict[str, torch.Tensor]


def get_parser(prog: str = "demucs") -> argparse.ArgumentParser:
    """The command's flags: the model, the tracks, then the flags of `OutputOptions` and
    `SeparationOptions` (demucs/options.py), where each option is declared."""
    parser = argparse.ArgumentParser(prog, description="Separate the sources of the given tracks.")
    parser.add_argument("tracks", nargs="*", type=Path, help="Path to tracks")
    add_model_flags(parser)
    parser.add_argument("--list-models", action="store_true",
                        help="List the models of --repo (default: the pre-trained ones), "
                             "bags and single models, and exit.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Show full tracebacks on errors.")
    OutputOptions.add_flags(parser)
    SeparationOptions.add_flags(parser)
    return parser


@dataclass(frozen=True)
class Run:
    """One run of the command: the model, the tracks and the options, checked."""
    name: str
    repo: tp.Optional[Path]
    tracks: tp.List[Path]
    output: OutputOptions
    separation: SeparationOptions
    verbose: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Run":
        """What the command line asks for; the options are checked (errors name the flags),
        and so is the output folder."""
        output = OutputOptions.from_args(args)
        separation = SeparationOptions.from_args(args, progress=True)
        check_writable(output.out)
        return cls(args.name, args.repo, list(args.tracks), output, separation, args.verbose)

    @property
    def label(self) -> str:
        """The model's name in output folders (a folder of ONNX graphs: its name)."""
        return Path(self.name).name if is_graph_folder(self.name) else model_label(self.name)

    def path(self, track: Path, stem: str) -> Path:
        """The file of `stem` of `track`."""
        return self.output.path(self.label, track, stem)


def check_writable(folder: Path) -> None:
    """`folder` is a writable directory, or can be created."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DemucsError(f"Output folder {folder}: {existing} is not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DemucsError(f"Output folder {folder}: {existing} is not writable.")


def output_stems(output: OutputOptions, sources: tp.Sequence[str]) -> tp.List[str]:
    """The names of the files written per track."""
    if output.stem is None:
        return list(sources)
    extra = {"add": [f"no_{output.stem}"], "minus": [f"minus_{output.stem}"], "none": []}
    return [output.stem] + extra[output.other_method]


def check_outputs(run: Run, stems: tp.Sequence[str]) -> None:
    """No two tracks write the same file, and no output overwrites an input."""
    tracks = run.tracks
    inputs = {track.resolve(): track for track in tracks}
    owners: tp.Dict[Path, int] = {}
    for index, track in enumerate(tracks):
        for stem in stems:
            path = run.path(track, stem)
            key = path.resolve()
            if key in inputs:
                raise DemucsError(f"The output {path} of {track} would overwrite the input "
                                  f"track {inputs[key]}; change -o or --filename.")
            other = owners.setdefault(key, index)
            if other != index:
                raise DemucsError(f"Tracks {tracks[other]} and {track} would both be written to "
                                  f"{path}; change --filename (e.g. use {{trackext}}) or "
                                  "separate them in two runs.")


def early_failure(track: Path) -> tp.Optional[str]:
    """Why `track` cannot be separated, for what is known without decoding it."""
    if track.is_dir():
        return f"{track} is a directory, not an audio file."
    if not track.exists():
        return (f"{track} does not exist. If the path contains spaces, surround it "
                "with quotes.")
    if track.is_file() and track.stat().st_size == 0:
        return f"{track} is empty (0 bytes)."
    return None


# Separation
def stems_to_write(output: OutputOptions, origin: tp.Optional[torch.Tensor],
                   stems: Stems) -> Stems:
    """All stems, or with --two-stems the stem and the rest as --other-method says.
    `stems` and `origin` (the mix, which only 'minus' needs) cover the same samples: the
    whole track or one block of it."""
    if output.stem is None:
        return stems
    chosen = stems[output.stem]
    out = {output.stem: chosen}
    if output.other_method == "add":
        out[f"no_{output.stem}"] = torch.stack(
            [wav for name, wav in stems.items() if name != output.stem]).sum(0)
    elif output.other_method == "minus":
        assert origin is not None, "--other-method minus needs the mix"
        out[f"minus_{output.stem}"] = origin - chosen
    return out


def separate_track(separator: Separator, track: Path, run: Run) -> None:
    """Read `track` by blocks and write its stems as the segments complete: the memory
    does not grow with the track. Each file appears complete when the track is done; a
    failure leaves none of them half-written."""
    print(f"Separating track {track}")
    names = output_stems(run.output, separator.sources)
    with separator.open_audio_file(track) as mix, ExitStack() as files:
        writers = {name: files.enter_context(
            AudioWriter(run.path(track, name), separator.samplerate, mix.shape[0],
                        **run.output.save_kwargs())) for name in names}
        minus = run.output.stem is not None and run.output.other_method == "minus"
        for start, stems in separator.separate_stream(mix):
            length = next(iter(stems.values())).shape[-1]
            origin = mix[..., start:start + length] if minus else None
            for name, wav in stems_to_write(run.output, origin, stems).items():
                writers[name].write(wav)
            del stems, origin, wav  # not held while the next segment runs


def report_failure(prog: str, track: Path, error: BaseException, verbose: bool) -> None:
    """One line on stderr naming `track` and the cause (after the traceback with -v)."""
    if verbose:
        traceback.print_exception(type(error), error, error.__traceback__)
    message = one_line(error)
    if not isinstance(error, (DemucsError, OSError)):
        message = f"{type(error).__name__}: {message}"
    if str(track) not in message:
        message = f"{track}: {message}"
    print_error(prog, message)


def out_of_memory(error: torch.OutOfMemoryError, split: bool) -> DemucsError:
    """A device out of memory on a track, with what takes less (its cause kept for -v)."""
    fix = "lower --segment" if split else "drop --no-split (or set --segment)"
    hint = DemucsError(f"out of memory ({allocation_failed(error)}): {fix}, or separate on "
                       "the CPU (-d cpu).")
    hint.__cause__ = error
    return hint


def load_separator(run: Run) -> Separator:
    """The model of `run`, with its options; the segment and the stem checked against it."""
    options = run.separation.as_dict()
    segment = options.pop("segment")
    separator = Separator(run.name, repo=run.repo, **options)
    try:
        separator.update_parameter(segment=segment)
    except DemucsError as error:
        raise DemucsError(f"--segment: {error}") from None
    stem = run.output.stem
    if stem is not None and stem not in separator.sources:
        raise DemucsError(f'Stem "{stem}" is not in the selected model; STEM must be one '
                          f"of {', '.join(separator.sources)}.")
    separator.prepare()  # the runners of --backend: exported once, into the cache
    model = separator.model
    if isinstance(model, BagOfModels):
        print(f"Selected model is a bag of {len(model.models)} models. You will see that many "
              "progress bars per track.")
    return separator


def separate(run: Run, prog: str) -> tp.List[Path]:
    """Separate every track; return those that failed (each reported on stderr)."""
    check_outputs(run, ["STEM"])
    failed = []
    pending = []
    for track in run.tracks:
        reason = early_failure(track)
        if reason is None:
            pending.append(track)
        else:
            report_failure(prog, track, DemucsError(reason), False)
            failed.append(track)
    if not pending:
        return failed
    separator = load_separator(run)
    check_outputs(run, output_stems(run.output, separator.sources))
    print(f"Separated tracks will be stored in {(run.output.out / run.label).resolve()}")
    for track in pending:
        try:
            separate_track(separator, track, run)
        except torch.OutOfMemoryError as error:  # nor running out of device memory
            report_failure(prog, track, out_of_memory(error, run.separation.split), run.verbose)
            failed.append(track)
        except Exception as error:  # one track failing never stops the others
            report_failure(prog, track, error, run.verbose)
            failed.append(track)
    return sorted(failed, key=run.tracks.index)


def print_models(repo: tp.Optional[Path]) -> None:
    """`--list-models`: bags, then single models, each with what it is."""
    infos = list_models(repo)
    width = max((len(info.name) for info in infos), default=0) + 2
    for title, bag in [("Bags of models:", True), ("Single models:", False)]:
        print(title)
        for info in (i for i in infos if i.bag == bag):
            print(f"    {info.name:<{width}}{info.describe()}")


def main(argv: tp.Optional[tp.Sequence[str]] = None, prog: str = "demucs") -> None:
    args = get_parser(prog).parse_args(argv)
    if args.backend == "torch":  # (the runtimes' own buffers lose by it: bench/README.md)
        map_large_buffers()  # before any tensor: a peak that does not grow with the track
    with report_errors(prog, args.verbose):
        if args.list_models:
            print_models(args.repo)
            return
        if not args.tracks:
            raise DemucsError("the following arguments are required: tracks (or --list-models)")
        failed = separate(Run.from_args(args), prog)
    total = len(args.tracks)
    if failed:
        exit_with_error(prog, f"separated {total - len(failed)} of {total} tracks; failed: "
                              f"{', '.join(str(track) for track in failed)}")
    print(f"separated {total} of {total} tracks")


if __name__ == "__main__":
    main()
