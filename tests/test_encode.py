"""File-level MuseTok pipeline: iter_encoded_files, encode_files (outputs, ledger, resume, summary), `midiva encode`.

encode runs on annotate's batch runner: failures have annotate's columns, resume is the ledger's, and
--no-resume starts over."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from midiva.cli import main
from midiva.encode import EncodeSummary, encode_files, iter_encoded_files
from midiva.errors import ConfigError, OutputError
from midiva.events import midi_to_bars
from midiva.latents import MuseTokEncoder, load_bar_tensors, load_encoder

ATOL = RTOL = 1e-5  # tiny_random/README.md: measured reimplementation error <= 2.4e-6


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint: Path) -> MuseTokEncoder:
    return load_encoder(tiny_checkpoint)  # config.json beside it gives the 4 heads


@pytest.fixture(scope="module")
def expected(tiny_checkpoint: Path) -> Any:
    return np.load(tiny_checkpoint.parent / "expected.npz")


@pytest.fixture(scope="module")
def golden_files(tiny_checkpoint: Path, shared_dir: Path) -> list[Path]:
    listing = json.loads((tiny_checkpoint.parent / "files.json").read_text())
    return [shared_dir / "data" / rel for rel in listing["paths"]]


def test_iter_encoded_files_records_failures_in_order(
    encoder: MuseTokEncoder, golden_files: list[Path], expected: Any
) -> None:
    sources: list[Any] = [golden_files[0], ("garbage.mid", b"MThd garbage"), golden_files[1], golden_files[2]]
    items = list(iter_encoded_files(encoder, sources, batch_size=5))
    assert [Path(i.name).name for i in items] == [
        golden_files[0].name,
        "garbage.mid",
        golden_files[1].name,
        golden_files[2].name,
    ]
    assert items[1].encoded is None and items[1].error_type == "MidiReadError"
    for item, i in ((items[0], 0), (items[2], 1), (items[3], 2)):
        assert item.encoded is not None
        assert_array_equal(item.encoded.indices, expected[f"f{i}_indices"])
    parallel = list(iter_encoded_files(encoder, sources, num_workers=2))  # events parsed in worker processes
    assert [i.md5 for i in parallel] == [i.md5 for i in items]
    assert_array_equal(parallel[3].encoded.indices, expected["f2_indices"])  # type: ignore[union-attr]


def test_cli_encode_writes_resumes_and_records(
    tiny_checkpoint: Path,
    golden_files: list[Path],
    gigamidi_sample: Path,
    expected: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = [str(golden_files[20]), str(golden_files[0]), str(gigamidi_sample / "empty.mid")]
    out = tmp_path / "out"
    argv = [
        "encode",
        *files,
        "--backend",
        "musetok",
        "--checkpoint",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "-q",
        "--json",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["written"], summary["failed"], summary["failures_by_type"]) == (2, 1, {"EmptyScoreError": 1})
    for i in (20, 0):
        md5 = midi_to_bars(golden_files[i]).md5
        tensors, meta = load_bar_tensors(out / f"{md5}.safetensors")
        assert_allclose(tensors["latents"], expected[f"f{i}_latents"], atol=ATOL, rtol=RTOL)
        assert_array_equal(tensors["indices"], expected[f"f{i}_indices"])
        assert_allclose(tensors["pre_quant"], expected[f"f{i}_pre_quant"], atol=ATOL, rtol=RTOL)
        assert meta["md5"] == md5 and meta["n_bars"] == str(expected[f"f{i}_latents"].shape[0])
        assert meta["backend"] == "musetok" and meta["source_file"] == str(golden_files[i])
        assert meta["checkpoint_sha256"] == "f5915a9652595dcaf47bd2f9991395e0cc3fbe4bf86f71cba49159f3f0f54dbb"
        assert meta["midiva_version"]
    ledger = (out / "failures.csv").read_text().splitlines()
    assert ledger[0] == "md5,name,stage,error_type,message" and len(ledger) == 2 and "EmptyScoreError" in ledger[1]
    index = (out / "index.csv").read_text().splitlines()
    assert index[0] == "md5,name,n_bars,file" and len(index) == 3
    assert json.loads((out / "run.json").read_text())["command"] == "encode"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["resumed"], again["written"], again["failed"]) == (3, 0, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == before


def test_encode_files_writes_records_resumes_and_summarises(
    encoder: MuseTokEncoder, golden_files: list[Path], expected: Any, tmp_path: Path
) -> None:
    garbage = b"MThd garbage"
    raw = golden_files[1].read_bytes()
    sources: list[Any] = [("garbage.mid", garbage), golden_files[0], raw, tmp_path / "missing.mid"]
    out = tmp_path / "out"
    summary = encode_files(sources, out, encoder, checkpoint_sha256="abc", batch_size=7)
    n_bars = expected["f0_latents"].shape[0] + expected["f1_latents"].shape[0]
    assert summary == EncodeSummary(
        out=str(out),
        files=4,
        written=2,
        resumed=0,
        failed=2,
        failures_by_type={"MidiReadError": 2},
        bars=n_bars,
        seconds=summary.seconds,
    )
    assert list(summary.to_dict()) == [
        "out",
        "files",
        "written",
        "resumed",
        "failed",
        "failures_by_type",
        "bars",
        "seconds",
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.written = 0  # type: ignore[misc]
    md5s = [hashlib.md5(golden_files[0].read_bytes()).hexdigest(), hashlib.md5(raw).hexdigest()]
    for i, md5 in enumerate(md5s):
        tensors, meta = load_bar_tensors(out / f"{md5}.safetensors")
        assert_array_equal(tensors["indices"], expected[f"f{i}_indices"])
        assert_allclose(tensors["latents"], expected[f"f{i}_latents"], atol=ATOL, rtol=RTOL)
        assert (meta["md5"], meta["checkpoint_sha256"], meta["autocast"], meta["backend"]) == (
            md5,
            "abc",
            "none",
            "musetok",
        )
        assert json.loads(meta["encoder_config"]) == encoder.config.to_dict()
    assert load_bar_tensors(out / f"{md5s[0]}.safetensors")[1]["source_file"] == str(golden_files[0])  # a path as given
    assert load_bar_tensors(out / f"{md5s[1]}.safetensors")[1]["source_file"] == md5s[1]  # nameless bytes
    with open(out / "failures.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = hashlib.md5(os.fsencode(tmp_path / "missing.mid")).hexdigest()  # no bytes: keyed by its path
    assert [(r["md5"], r["name"], r["stage"], r["error_type"]) for r in rows] == [
        (hashlib.md5(garbage).hexdigest(), "garbage.mid", "read", "MidiReadError"),
        (missing, str(tmp_path / "missing.mid"), "source", "MidiReadError"),
    ]
    assert "missing.mid" in rows[1]["message"]

    # MuseTok's latents change in the last bits with the batch they were encoded in: part of the fingerprint
    with pytest.raises(ConfigError, match="batch_size: 7 then, 4096 now"):
        encode_files(sources, out, encoder, checkpoint_sha256="abc")
    again = encode_files(sources, out, encoder, checkpoint_sha256="abc", batch_size=7)  # committed files are skipped
    assert (again.files, again.resumed, again.written, again.failed, again.bars) == (4, 4, 0, 0, 0)
    fresh = encode_files(sources, out, encoder, resume=False)  # starts over: the tables are rewritten
    assert (fresh.resumed, fresh.written, fresh.failed) == (0, 2, 2)
    assert len((out / "failures.csv").read_text().splitlines()) == 1 + 2
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot write to"):
        encode_files(sources, tmp_path / "file" / "out", encoder)
