"""The one atomic-write helper: exact bytes, whole-or-nothing replacement, errors that say what to do."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import pytest

from midiva.atomic import (
    atomic_output,
    write_bytes_atomic,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)
from midiva.errors import OutputError

SRC = Path(__file__).resolve().parents[1] / "src" / "midiva"


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def test_text_is_written_byte_for_byte_and_replaces_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"  # parents are created
    write_text_atomic(target, "old\n")
    text = "línea 1\nline 2\r\nno final newline"
    assert write_text_atomic(target, text) == target
    assert target.read_bytes() == text.encode("utf-8")  # no newline translation, UTF-8
    assert _leftovers(target.parent) == []


def test_file_mode_follows_the_umask_not_a_private_temp_file(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644


def test_json_and_csv_have_the_callers_format(tmp_path: Path) -> None:
    value = {"b": [1, 2], "a": "é", "path": Path("x")}
    write_json_atomic(tmp_path / "v.json", value, indent=2, default=str)
    assert (tmp_path / "v.json").read_text(encoding="utf-8") == json.dumps(value, indent=2, default=str) + "\n"
    rows = [{"x": 1, "y": "a,b"}, {"x": 2, "y": 'q"uote'}]
    write_csv_atomic(tmp_path / "t.csv", ["x", "y"], rows)
    raw = (tmp_path / "t.csv").read_bytes()
    assert raw == b'x,y\n1,"a,b"\n2,"q""uote"\n'
    assert list(csv.DictReader(io.StringIO(raw.decode()))) == [{"x": "1", "y": "a,b"}, {"x": "2", "y": 'q"uote'}]


def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"complete old version")
    with pytest.raises(RuntimeError, match="writer broke"), atomic_output(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("writer broke")
    assert target.read_bytes() == b"complete old version"
    assert _leftovers(tmp_path) == []


def test_an_os_error_becomes_an_output_error_naming_the_file_and_what_to_do(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match=r"cannot write '.*a-file/x.json': .*; check that the directory exists"):
        write_text_atomic(blocker / "x.json", "{}")
    with pytest.raises(OutputError, match=r"cannot write the model to '.*m.bin': .*; choose a writable --out"):
        write_bytes_atomic(blocker / "m.bin", b"", what="the model", hint="choose a writable --out")
    with pytest.raises(OutputError, match="Is a directory"):
        write_text_atomic(tmp_path, "x")  # the target itself is a directory: the rename fails
    assert _leftovers(tmp_path) == []


def test_every_module_writes_through_the_one_helper() -> None:
    users = sorted(
        p.name for p in SRC.glob("*.py") if re.search(r"os\.(replace|rename)\(", p.read_text(encoding="utf-8"))
    )
    assert users == ["atomic.py"]
