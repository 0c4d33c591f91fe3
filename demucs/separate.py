"""The `demucs` command: separate tracks into their sources with a pre-trained model.

    demucs [-n NAME] [--repo DIR] [-o OUT] TRACK [TRACK ...]

writes `OUT/NAME/TRACK/SOURCE.wav` for every source of the model. Any user-facing error
(missing file, unknown model, corrupt package, unreadable audio) is printed as one line on
stderr and the command exits with a non-zero status.
"""
from __future__ import annotations

import argparse
import typing as tp
from pathlib import Path

import torch

from .apply import apply_model
from .audio import read_audio, save_audio
from .errors import DemucsError, report_errors
from .pretrained import add_model_flags, get_model_from_args

# A model (Demucs, HDemucs) or a BagOfModels: all have `sources`, `samplerate`,
# `audio_channels` and go through `apply_model`. `Any` because `nn.Module.__getattr__`
# types every attribute as `Tensor | Module`.
Model = tp.Any


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "demucs", description="Separate the sources of the given tracks.")
    parser.add_argument("tracks", nargs="+", type=Path, help="Path to tracks")
    add_model_flags(parser)
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
    parser.add_argument("-d", "--device",
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Device to use, default is cuda if available else cpu.")
    parser.add_argument("--shifts", default=1, type=int,
                        help="Number of random shifts for equivariant stabilization. "
                             "Increase separation time but improves quality for Demucs. "
                             "10 was used in the original paper.")
    parser.add_argument("--overlap", default=0.25, type=float, help="Overlap between the splits.")
    split_group = parser.add_mutually_exclusive_group()
    split_group.add_argument("--no-split", action="store_false", dest="split", default=True,
                             help="Doesn't split audio in chunks. This can use large amounts "
                                  "of memory.")
    split_group.add_argument("--segment", type=int,
                             help="Set split size of each chunk, in seconds. This can help "
                                  "save memory of graphic card.")
    parser.add_argument("--two-stems", dest="stem", metavar="STEM",
                        help="Only separate audio into {STEM} and no_{STEM}.")
    depth_group = parser.add_mutually_exclusive_group()
    depth_group.add_argument("--int24", action="store_true", help="Save wav output as 24 bits wav.")
    depth_group.add_argument("--float32", action="store_true",
                             help="Save wav output as float32 (2x bigger).")
    parser.add_argument("--clip-mode", default="rescale", choices=["rescale", "clamp"],
                        help="Strategy for avoiding clipping: rescaling entire signal if "
                             "necessary (rescale) or hard clipping (clamp).")
    parser.add_argument("--mp3", action="store_true", help="Convert the output wavs to mp3.")
    parser.add_argument("--mp3-bitrate", default=320, type=int, help="Bitrate of converted mp3.")
    parser.add_argument("-j", "--jobs", default=0, type=int,
                        help="Number of jobs. This can increase memory usage but will be "
                             "much faster when multiple cores are available.")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Validate what argparse cannot, before any model is loaded."""
    for track in args.tracks:
        if not track.is_file():
            raise DemucsError(f"File {track} does not exist. If the path contains spaces, "
                              "surround it with quotes.")
    if args.segment is not None and args.segment < 1:
        raise DemucsError(f"--segment must be at least 1 second, got {args.segment}.")
    if args.shifts < 0:
        raise DemucsError(f"--shifts must be 0 or more, got {args.shifts}.")
    if not 0 <= args.overlap < 1:
        raise DemucsError(f"--overlap must be in [0, 1), got {args.overlap}.")
    if args.jobs < 0:
        raise DemucsError(f"--jobs must be 0 or more, got {args.jobs}.")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise DemucsError(f"Device {args.device} asked for, but CUDA is not available; "
                          "use -d cpu.")


def set_segment(model: Model, segment: tp.Optional[int]) -> None:
    """Use chunks of `segment` seconds: on every model of a bag, or on the single model."""
    if segment is None:
        return
    models = getattr(model, "models", None)
    for sub in (models if models is not None else [model]):
        sub.segment = segment


def load_model(args: argparse.Namespace) -> Model:
    model: Model = get_model_from_args(args)
    set_segment(model, args.segment)
    if args.stem is not None and args.stem not in model.sources:
        raise DemucsError(f'Stem "{args.stem}" is not in the selected model; STEM must be one '
                          f"of {', '.join(model.sources)}.")
    model.cpu()
    model.eval()
    return model


def separate_track(model: Model, track: Path, args: argparse.Namespace) -> torch.Tensor:
    """Separate one track, `(S, C, T)` at the model's sample rate, in the mix's scale."""
    wav = read_audio(track, model.samplerate, model.audio_channels)
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std()
    if std == 0 or not torch.isfinite(std):
        std = torch.ones_like(std)  # a silent (or constant) track: nothing to rescale
    wav = (wav - mean) / std
    sources = apply_model(model, wav[None], device=args.device, shifts=args.shifts,
                          split=args.split, overlap=args.overlap, progress=True,
                          num_workers=args.jobs)[0]
    return sources * std + mean


def output_path(args: argparse.Namespace, track: Path, stem: str) -> Path:
    ext = "mp3" if args.mp3 else "wav"
    track_name, _, track_ext = track.name.rpartition(".")
    if not track_name:  # no extension
        track_name, track_ext = track.name, ""
    try:
        relative = args.filename.format(track=track_name, trackext=track_ext, stem=stem, ext=ext)
    except (KeyError, IndexError, ValueError) as error:
        raise DemucsError(f"Invalid --filename {args.filename!r}: {error!r}; use the fields "
                          "{track}, {trackext}, {stem} and {ext}.") from None
    return args.out / args.name / relative


def save_sources(model: Model, sources: torch.Tensor, track: Path,
                 args: argparse.Namespace) -> None:
    kwargs: tp.Dict[str, tp.Any] = {
        "samplerate": model.samplerate, "bitrate": args.mp3_bitrate, "clip": args.clip_mode,
        "as_float": args.float32, "bits_per_sample": 24 if args.int24 else 16}
    if args.stem is None:
        stems = dict(zip(model.sources, sources))
    else:
        index = model.sources.index(args.stem)
        rest = torch.cat([sources[:index], sources[index + 1:]]).sum(0)
        stems = {args.stem: sources[index], f"no_{args.stem}": rest}
    for name, source in stems.items():
        save_audio(source, output_path(args, track, name), **kwargs)


def separate(args: argparse.Namespace) -> None:
    check_args(args)
    model = load_model(args)
    out = args.out / args.name
    out.mkdir(parents=True, exist_ok=True)
    print(f"Separated tracks will be stored in {out.resolve()}")
    for track in args.tracks:
        print(f"Separating track {track}")
        sources = separate_track(model, track, args)
        save_sources(model, sources, track, args)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    with report_errors("demucs", args.verbose):
        separate(args)


if __name__ == "__main__":
    main()
