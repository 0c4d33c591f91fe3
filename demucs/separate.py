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
from pathlib import Path

import torch

from .api import Separator, check_device, default_device
from .apply import BagOfModels
from .audio import SAVE_SUFFIXES, check_mp3_options, pcm_subtype, save_audio
from .errors import (DemucsError, allocation_failed, exit_with_error, one_line, print_error,
                     report_errors)
from .pretrained import add_model_flags, list_models, model_label

Stems = tp.Dict[str, torch.Tensor]


def get_parser(prog: str = "demucs") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog, description="Separate the sources of the given tracks.")
    parser.add_argument("tracks", nargs="*", type=Path, help="Path to tracks")
    add_model_flags(parser)
    parser.add_argument("--list-models", action="store_true",
                        help="List the models of --repo (default: the pre-trained ones), "
                             "bags and single models, and exit.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Show full tracebacks on errors.")
    parser.add_argument("-o", "--out", type=Path, default=Path("separated"),
                        help="Folder where to put extracted tracks. A subfolder with the "
                             "model name will be created.")
    parser.add_argument("--filename", default="{track}/{stem}.{ext}",
                        help="Set the name of output file. Use {track}, {trackext}, {stem}, "
                             "{ext} for the track name without extension, the track "
                             "extension, the stem name and the default output extension. "
                             "Default is {track}/{stem}.{ext}.")
    parser.add_argument("-d", "--device", default=default_device(),
                        help="Device to use, default is cuda if available, else mps if "
                             "available, else cpu.")
    parser.add_argument("--shifts", default=1, type=int,
                        help="Number of random shifts for equivariant stabilization. "
                             "Increase separation time but improves quality for Demucs. "
                             "10 was used in the original paper.")
    parser.add_argument("--overlap", default=0.25, type=float, help="Overlap between the splits.")
    split_group = parser.add_mutually_exclusive_group()
    split_group.add_argument("--no-split", action="store_false", dest="split", default=True,
                             help="Doesn't split audio in chunks. This can use large amounts "
                                  "of memory.")
    split_group.add_argument("--segment", type=float,
                             help="Set split size of each chunk, in seconds. This can help "
                                  "save memory of graphic card. Transformer models allow at "
                                  "most the length they were trained on.")
    parser.add_argument("--two-stems", dest="stem", metavar="STEM",
                        help="Only separate audio into {STEM} and no_{STEM}.")
    parser.add_argument("--other-method", dest="other_method", default="add",
                        choices=["none", "add", "minus"],
                        help="With --two-stems, how to get the rest: 'add' sums the other "
                             "stems into no_{STEM}, 'minus' writes the original track minus "
                             "{STEM} as minus_{STEM}, 'none' writes only {STEM}.")
    depth_group = parser.add_mutually_exclusive_group()
    depth_group.add_argument("--int24", action="store_true",
                             help="Save wav (or flac) output as 24 bits.")
    depth_group.add_argument("--float32", action="store_true",
                             help="Save wav output as float32 (2x bigger).")
    parser.add_argument("--clip-mode", default="rescale", choices=["rescale", "clamp", "none"],
                        help="Strategy for avoiding clipping: rescaling entire signal if "
                             "necessary (rescale), hard clipping (clamp) or none.")
    format_group = parser.add_mutually_exclusive_group()
    format_group.add_argument("--flac", action="store_true",
                              help="Convert the output wavs to flac.")
    format_group.add_argument("--mp3", action="store_true",
                              help="Convert the output wavs to mp3.")
    parser.add_argument("--mp3-bitrate", default=320, type=int,
                        help="Bitrate of converted mp3, in kbps (8 to 320).")
    parser.add_argument("--mp3-preset", default=2, type=int,
                        help="Encoder preset of MP3, 2 for highest quality, 7 for fastest "
                             "speed. Default is 2.")
    parser.add_argument("-j", "--jobs", default=0, type=int,
                        help="Number of jobs. This can increase memory usage but will be "
                             "much faster when multiple cores are available.")
    return parser


# Checks before the model loads
def check_options(args: argparse.Namespace) -> None:
    """Validate what argparse cannot, before any model is loaded."""
    if args.segment is not None and not args.segment > 0:
        raise DemucsError(f"--segment must be a positive number of seconds, got {args.segment}.")
    if args.shifts < 0:
        raise DemucsError(f"--shifts must be 0 or more, got {args.shifts}.")
    if not 0 <= args.overlap < 1:
        raise DemucsError(f"--overlap must be in [0, 1), got {args.overlap}.")
    if args.jobs < 0:
        raise DemucsError(f"--jobs must be 0 or more, got {args.jobs}.")
    if args.mp3:
        try:
            check_mp3_options(args.mp3_bitrate, args.mp3_preset)
        except DemucsError as error:
            flag = "--mp3-bitrate" if "bitrate" in str(error) else "--mp3-preset"
            raise DemucsError(f"{flag}: {error}") from None
    args.device = check_device(args.device)
    check_template(args)
    check_writable(args.out)


def output_ext(args: argparse.Namespace) -> str:
    return "mp3" if args.mp3 else "flac" if args.flac else "wav"


def render(args: argparse.Namespace, track: Path, stem: str) -> Path:
    """The output file of `stem` of `track`: `OUT/NAME/` + the `--filename` template."""
    track_name, _, track_ext = track.name.rpartition(".")
    if not track_name:  # no extension
        track_name, track_ext = track.name, ""
    try:
        relative = args.filename.format(track=track_name, trackext=track_ext, stem=stem,
                                        ext=output_ext(args))
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as error:
        raise DemucsError(f"Invalid --filename {args.filename!r}: {error!r}; use the fields "
                          "{track}, {trackext}, {stem} and {ext}.") from None
    return args.out / model_label(args.name) / relative


def check_template(args: argparse.Namespace) -> None:
    """The template renders, is relative, names each stem apart, and its extension is a
    format we write that agrees with --mp3/--flac/--float32."""
    sample = render(args, Path("track.wav"), "drums")
    if Path(args.filename).is_absolute():
        raise DemucsError(f"--filename {args.filename!r} must be relative to the output "
                          "folder (-o).")
    if render(args, Path("track.wav"), "bass") == sample:
        raise DemucsError(f"--filename {args.filename!r} would write every stem to the same "
                          "file; use {stem} in it.")
    suffix = sample.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise DemucsError(f"--filename {args.filename!r} gives files ending in {suffix!r}; "
                          f"the output formats are {', '.join(SAVE_SUFFIXES)} (use {{ext}}).")
    wanted = "." + output_ext(args)
    if (args.mp3 or args.flac) and suffix != wanted:
        raise DemucsError(f"--filename {args.filename!r} gives {suffix} files but "
                          f"--{wanted[1:]} asks for {wanted}; use {{ext}} in the template.")
    if suffix != ".mp3":
        try:
            pcm_subtype(suffix, 24 if args.int24 else 16, args.float32)
        except DemucsError as error:
            raise DemucsError(f"--float32 with {suffix} output: {error}") from None


def check_writable(folder: Path) -> None:
    """`folder` is a writable directory, or can be created."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DemucsError(f"Output folder {folder}: {existing} is not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DemucsError(f"Output folder {folder}: {existing} is not writable.")


def output_stems(args: argparse.Namespace, sources: tp.Sequence[str]) -> tp.List[str]:
    """The names of the files written per track."""
    if args.stem is None:
        return list(sources)
    extra = {"add": [f"no_{args.stem}"], "minus": [f"minus_{args.stem}"], "none": []}
    return [args.stem] + extra[args.other_method]


def check_outputs(args: argparse.Namespace, tracks: tp.Sequence[Path],
                  stems: tp.Sequence[str]) -> None:
    """No two tracks write the same file, and no output overwrites an input."""
    inputs = {track.resolve(): track for track in tracks}
    owners: tp.Dict[Path, int] = {}
    for index, track in enumerate(tracks):
        for stem in stems:
            path = render(args, track, stem)
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
def stems_to_write(args: argparse.Namespace, origin: torch.Tensor, stems: Stems) -> Stems:
    """All stems, or with --two-stems the stem and the rest as --other-method says."""
    if args.stem is None:
        return stems
    chosen = stems[args.stem]
    out = {args.stem: chosen}
    if args.other_method == "add":
        out[f"no_{args.stem}"] = torch.stack(
            [wav for name, wav in stems.items() if name != args.stem]).sum(0)
    elif args.other_method == "minus":
        out[f"minus_{args.stem}"] = origin - chosen
    return out


def separate_track(separator: Separator, track: Path, args: argparse.Namespace) -> None:
    print(f"Separating track {track}")
    origin, stems = separator.separate_audio_file(track)
    kwargs: tp.Dict[str, tp.Any] = {
        "samplerate": separator.samplerate, "bitrate": args.mp3_bitrate,
        "preset": args.mp3_preset, "clip": args.clip_mode, "as_float": args.float32,
        "bits_per_sample": 24 if args.int24 else 16}
    for name, wav in stems_to_write(args, origin, stems).items():
        save_audio(wav, render(args, track, name), **kwargs)


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


def out_of_memory(error: torch.OutOfMemoryError, args: argparse.Namespace) -> DemucsError:
    """A device out of memory on a track, with what takes less (its cause kept for -v)."""
    fix = "lower --segment" if args.split else "drop --no-split (or set --segment)"
    hint = DemucsError(f"out of memory ({allocation_failed(error)}): {fix}, or separate on "
                       "the CPU (-d cpu).")
    hint.__cause__ = error
    return hint


def load_separator(args: argparse.Namespace) -> Separator:
    separator = Separator(args.name, repo=args.repo, device=args.device, shifts=args.shifts,
                          overlap=args.overlap, split=args.split, jobs=args.jobs,
                          progress=True)
    if args.segment is not None:
        try:
            separator.update_parameter(segment=args.segment)
        except DemucsError as error:
            raise DemucsError(f"--segment: {error}") from None
    model = separator.model
    if args.stem is not None and args.stem not in separator.sources:
        raise DemucsError(f'Stem "{args.stem}" is not in the selected model; STEM must be one '
                          f"of {', '.join(separator.sources)}.")
    if isinstance(model, BagOfModels):
        print(f"Selected model is a bag of {len(model.models)} models. You will see that many "
              "progress bars per track.")
    return separator


def separate(args: argparse.Namespace, prog: str) -> tp.List[Path]:
    """Separate every track; return those that failed (each reported on stderr)."""
    check_options(args)
    check_outputs(args, args.tracks, ["STEM"])
    failed = []
    pending = []
    for track in args.tracks:
        reason = early_failure(track)
        if reason is None:
            pending.append(track)
        else:
            report_failure(prog, track, DemucsError(reason), False)
            failed.append(track)
    if not pending:
        return failed
    separator = load_separator(args)
    check_outputs(args, args.tracks, output_stems(args, separator.sources))
    print(f"Separated tracks will be stored in {(args.out / model_label(args.name)).resolve()}")
    for track in pending:
        try:
            separate_track(separator, track, args)
        except torch.OutOfMemoryError as error:  # nor running out of device memory
            report_failure(prog, track, out_of_memory(error, args), args.verbose)
            failed.append(track)
        except Exception as error:  # one track failing never stops the others
            report_failure(prog, track, error, args.verbose)
            failed.append(track)
    return sorted(failed, key=args.tracks.index)


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
    with report_errors(prog, args.verbose):
        if args.list_models:
            print_models(args.repo)
            return
        if not args.tracks:
            raise DemucsError("the following arguments are required: tracks (or --list-models)")
        failed = separate(args, prog)
    total = len(args.tracks)
    if failed:
        exit_with_error(prog, f"separated {total - len(failed)} of {total} tracks; failed: "
                              f"{', '.join(str(track) for track in failed)}")
    print(f"separated {total} of {total} tracks")


if __name__ == "__main__":
    main()
