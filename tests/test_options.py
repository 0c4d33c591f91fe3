"""The options of a separation (`demucs.options`): each declared once, as a field that
gives the command its flag and the API its keyword, checked the same way by both."""
from __future__ import annotations

import argparse
import dataclasses
import typing as tp
from pathlib import Path

import pytest
import torch

from demucs import separate
from demucs.errors import ConfigError
from demucs.options import Options, OutputOptions, SeparationOptions, count, option, spec_of

RECORDS: list[type[Options]] = [SeparationOptions, OutputOptions]


def parse(*argv: str) -> argparse.Namespace:
    return separate.get_parser().parse_args(["track.wav", *argv])


@pytest.mark.parametrize("record", RECORDS)
def test_every_flag_comes_from_its_field(record: type[Options]) -> None:
    actions = {action.dest: action for action in separate.get_parser()._actions}
    for item in dataclasses.fields(record):
        flags = spec_of(item).flags
        if not flags:
            continue
        action = actions[item.name]
        assert action.option_strings == list(flags), item.name
        assert action.default == item.default, item.name


def test_fields_without_a_flag_are_the_api_only_ones() -> None:
    for record in RECORDS:
        no_flag = [item.name for item in dataclasses.fields(record) if not spec_of(item).flags]
        assert no_flag == (["progress", "callback", "callback_arg"]
                           if record is SeparationOptions else [])


@pytest.mark.parametrize("record", RECORDS)
def test_command_defaults_are_the_api_defaults(record: type[Options]) -> None:
    assert record.from_args(parse()) == record()


@pytest.mark.parametrize("argv,keywords", [
    (["--shifts", "3", "--overlap", "0.5", "--segment", "2", "-j", "2", "-d", "cpu"],
     {"shifts": 3, "overlap": 0.5, "segment": 2.0, "jobs": 2, "device": torch.device("cpu")}),
    (["--no-split"], {"split": False}),
])
def test_flags_give_the_keywords(argv: list[str], keywords: dict[str, tp.Any]) -> None:
    assert SeparationOptions.from_args(parse(*argv)) == SeparationOptions(**keywords)


@pytest.mark.parametrize("keyword,flag,value,flag_value", [
    ("shifts", "--shifts", -1, "-1"),
    ("overlap", "--overlap", 1.0, "1"),
    ("segment", "--segment", 0, "0"),
    ("jobs", "--jobs", -2, "-2"),
])
def test_errors_name_the_keyword_or_the_flag(keyword: str, flag: str, value: tp.Any,
                                             flag_value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{keyword} must be "):
        SeparationOptions(**{keyword: value})
    with pytest.raises(ConfigError, match=f"^{flag} must be "):
        SeparationOptions.from_args(parse(flag, flag_value))


@pytest.mark.parametrize("keywords,match", [
    ({"shifts": True}, "shifts must be an integer"),
    ({"segment": float("inf")}, "segment must be a positive number"),
    ({"callback": 3}, "callback must be callable"),
    ({"callback_arg": [1]}, "callback_arg must be a dict"),
    ({"device": "gpu"}, "Unknown device 'gpu'"),
])
def test_api_values_are_checked(keywords: dict[str, tp.Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SeparationOptions(**keywords)


def test_checked_values_are_normalised() -> None:
    options = SeparationOptions(device=None, segment=2, overlap=0, callback_arg=None)
    assert isinstance(options.device, torch.device)
    assert options.segment == 2.0 and isinstance(options.segment, float)
    assert options.callback_arg == {}
    assert dataclasses.replace(options, shifts=2).device == options.device


def test_output_choices_and_template_are_checked() -> None:
    with pytest.raises(ConfigError, match="clip_mode must be one of rescale, clamp, none"):
        OutputOptions(clip_mode="soft")
    with pytest.raises(ConfigError, match="same file"):
        OutputOptions(filename="{track}.{ext}")
    with pytest.raises(ConfigError, match="^--mp3-bitrate: mp3 bitrate 500"):
        OutputOptions.from_args(parse("--mp3", "--mp3-bitrate", "500"))
    output = OutputOptions(out=Path("sep"), flac=True, filename="{stem}-{track}.{ext}")
    assert output.path("mdx", Path("a/song.mp3"), "bass") == Path("sep/mdx/bass-song.flac")


def test_a_new_option_is_one_field() -> None:
    """A field added to a record is a flag, a keyword and a check, with nothing else."""
    def at_least_one(name: str, value: tp.Any) -> int:
        if count(name, value) < 1:
            raise ConfigError(f"{name} must be 1 or more, got {value!r}.")
        return value

    @dataclasses.dataclass(frozen=True)
    class Extended(SeparationOptions):
        transition_power: int = option(1, "--transition-power", type=int,
                                       check=at_least_one, help="Power of the cross-fade.")

    parser = argparse.ArgumentParser()
    Extended.add_flags(parser)
    assert Extended.from_args(parser.parse_args(["--transition-power", "2"])).transition_power == 2
    assert Extended(transition_power=3).transition_power == 3
    with pytest.raises(ConfigError, match="^--transition-power must be 1 or more"):
        Extended.from_args(parser.parse_args(["--transition-power", "0"]))
    with pytest.raises(ConfigError, match="^transition_power must be 1 or more"):
        Extended(transition_power=0)
