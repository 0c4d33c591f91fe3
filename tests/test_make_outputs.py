"""tools.make_outputs: the reproducible archive of XP argvs, and its errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import make_outputs

from helpers import main_error

XPS = {"0123abcd": ["model=hdemucs"], "cafe0001": []}


def test_archive_round_trip_is_reproducible(tmp_path: Path) -> None:
    xps = tmp_path / "xps.json"
    xps.write_text(json.dumps(XPS))
    first, second = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    assert make_outputs.main(["--xps", str(xps), "-o", str(first)]) == 0
    assert make_outputs.main(["--xps", str(xps), "-o", str(second)]) == 0
    assert first.read_bytes() == second.read_bytes()
    assert make_outputs.read_archive(first) == XPS


@pytest.mark.parametrize("content, fragment", [
    (None, "No such file"),
    ("[1, 2]", "expected a JSON object"),
    ('{"xyz": []}', "'xyz' is not an 8 hex digits signature"),
    ("{not json", "Expecting property name"),
])
def test_bad_input_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     content: str | None, fragment: str) -> None:
    xps = tmp_path / "xps.json"
    if content is not None:
        xps.write_text(content)
    output = tmp_path / "out.tar.gz"
    line = main_error(make_outputs.main, ["--xps", str(xps), "-o", str(output)], capsys)
    assert line.startswith("tools.make_outputs: error: ") and fragment in line, line
    assert not output.exists()
