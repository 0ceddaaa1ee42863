"""`midiva merge`: every bad set of shards is refused naming the shard; the streamed, block-wise copy
checks rows like `check_rows` and writes the same bytes whatever the block size."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from midiva import merge as merge_mod
from midiva.annotate import AnnotateOptions, annotate_stream
from midiva.errors import DataError
from midiva.ledger import output_paths
from midiva.lock import acquire_output_lock
from midiva.merge import merge_outputs
from midiva.sources import iter_files, list_midi_files


class Features:
    """A deterministic stand-in regressor (no torch)."""

    backend = "features"

    def __init__(self, sha256: str = "a") -> None:
        self.sha256 = sha256  # the model's identity in the fingerprint

    def make_inputs(self, features: Any = None, latents: Any = None) -> np.ndarray:
        return np.asarray(features, np.float32)

    def predict(self, inputs: Any, *, batch_size: int = 4096, device: Any = "cpu") -> np.ndarray:
        return np.tanh(np.asarray(inputs, np.float32)[:, :2] / 100)


def shard(files: list[Path], out: Path, index: int, num_shards: int = 3, model: str = "a") -> Path:
    options = AnnotateOptions(num_shards=num_shards, shard_index=index)
    annotate_stream(iter_files(files), out, Features(model), options=options)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, gigamidi_sample: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    files = list_midi_files([gigamidi_sample])
    return [shard(files, root / f"s{i}" / "annotations.csv", i) for i in range(3)]


def test_bad_shard_sets_are_refused_naming_the_shard(tmp_path: Path, shards: list[Path], gigamidi_sample: Path) -> None:
    files = list_midi_files([gigamidi_sample])
    out = tmp_path / "m.csv"
    with pytest.raises(DataError, match=f"'{shards[1]}' is given twice"):
        merge_outputs([shards[0], shards[1], shards[1], shards[2]], out)
    again = shard(files, tmp_path / "again" / "annotations.csv", 0)
    with pytest.raises(
        DataError, match=r"given twice \[0\]: shard 0 in .*s0/annotations.csv', .*again/annotations.csv'"
    ):
        merge_outputs([*shards, again], out)
    with pytest.raises(DataError, match=r"missing \[2\] \(given \[0, 1\]\)"):
        merge_outputs(shards[:2], out)
    other_model = shard(files, tmp_path / "other" / "annotations.csv", 2, model="b")
    with pytest.raises(
        DataError, match=f"'{other_model}' was annotated with other settings .*model_sha256: 'a' vs 'b'"
    ):
        merge_outputs([*shards[:2], other_model], out)
    other_count = shard(files, tmp_path / "four" / "annotations.csv", 2, num_shards=4)
    with pytest.raises(DataError, match="num_shards: 3 vs 4"):
        merge_outputs([*shards[:2], other_count], out)
    same_dir = shard(files, shards[0].parent / "shard1.csv", 1)
    try:
        with pytest.raises(DataError, match=f"shards 0 .*and 1 \\('{same_dir}'\\) share the directory"):
            merge_outputs([shards[0], same_dir, shards[2]], out)
    finally:
        for path in (*output_paths(same_dir).tables, output_paths(same_dir).ledger, output_paths(same_dir).summary):
            path.unlink()
    with acquire_output_lock(shards[2]), pytest.raises(DataError, match=f"'{shards[2]}' is being written by PID"):
        merge_outputs(shards, out)
    assert not out.exists()
    report = merge_outputs(shards, out)
    assert report.files + report.failed == len(files) and report.complete


def test_block_copy_is_independent_of_the_block_size(
    tmp_path: Path, shards: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tmp_path / "whole.csv"
    merge_outputs(shards, whole)
    monkeypatch.setattr(merge_mod, "MERGE_BLOCK_BYTES", 700)  # a few files per block, some alone

    def slow_path(*args: object) -> None:
        raise AssertionError("the vectorised row check rejected good rows")

    monkeypatch.setattr(merge_mod, "check_rows", slow_path)
    small = tmp_path / "small.csv"
    merge_outputs(shards, small)
    for a, b in zip(
        (*output_paths(whole).tables, output_paths(whole).ledger),
        (*output_paths(small).tables, output_paths(small).ledger),
        strict=True,
    ):
        assert a.read_bytes() == b.read_bytes(), b.name


def _damaged(line: bytes, damage: str) -> bytes:
    """`line` damaged one way, keeping its byte length (the ledger offsets still match)."""
    md5, bar, valence, arousal = line.rstrip(b"\n").split(b",")
    if damage == "bar_number":
        bar = bar[:-1] + str((int(bar[-1:]) + 1) % 10).encode()
    elif damage == "md5":
        md5 = md5[:-1] + (b"1" if md5[-1:] == b"0" else b"0")
    elif damage == "extra_field":
        arousal = arousal[:-2] + b",0"
    elif damage == "leading_zero":
        bar, arousal = b"0" + bar, arousal[:-1]
    elif damage == "missing_field":
        return b",".join([md5, bar, valence]) + b"x" + arousal + b"\n"
    elif damage == "torn_line":
        return line[:-1] + b"x"
    return b",".join([md5, bar, valence, arousal]) + b"\n"


@pytest.mark.parametrize("damage", ["bar_number", "md5", "extra_field", "missing_field", "leading_zero", "torn_line"])
def test_damaged_rows_are_found_in_any_block(
    tmp_path: Path, shards: list[Path], damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "s" / "annotations.csv"
    copy.parent.mkdir()
    for src, dst in zip(
        (*output_paths(shards[0]).tables, output_paths(shards[0]).ledger),
        (*output_paths(copy).tables, output_paths(copy).ledger),
        strict=True,
    ):
        shutil.copyfile(src, dst)
    lines = copy.read_bytes().splitlines(keepends=True)
    for block_bytes in (700, merge_mod.MERGE_BLOCK_BYTES):
        monkeypatch.setattr(merge_mod, "MERGE_BLOCK_BYTES", block_bytes)
        for target in (1, len(lines) // 2, len(lines) - 1):  # first row, a middle one, the last
            damaged = list(lines)
            damaged[target] = _damaged(lines[target], damage)
            assert len(damaged[target]) == len(lines[target]) and damaged[target] != lines[target]
            copy.write_bytes(b"".join(damaged))
            with pytest.raises(DataError, match=r"md5 [0-9a-f]{32}"):
                merge_outputs([copy, *shards[1:]], tmp_path / "m.csv")
            assert not (tmp_path / "m.csv").exists()
