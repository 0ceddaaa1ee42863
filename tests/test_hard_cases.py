"""Regressions of the hardening campaign (issue 11): each test is named after what the input broke.

MIDI inputs come from ../shared/data/hard_cases/ or are built here; the worker-pool faults
(parent killed, worker segfault, disk full under every long command) are in test_workers.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import midiva.midi as midi_mod
from midiva.annotate import AnnotateOptions, annotate_stream, load_annotation_model
from midiva.cli import main
from midiva.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MidiReadError,
    OutputError,
    SourceError,
)
from midiva.features import FEATURE_NAMES
from midiva.ledger import LEDGER_MAGICS, output_paths
from midiva.merge import merge_outputs
from midiva.midi import load_midi, read_midi_bytes
from midiva.model import InputRecipe, Regressor, VARegressor, load_regressor, save_regressor
from midiva.prepare import PrepareOptions, prepare_file
from midiva.sources import iter_files, iter_parquet, list_midi_files


def hard_case(shared_dir: Path, name: str) -> Path:
    path = shared_dir / "data" / "hard_cases" / name
    assert path.is_file(), f"missing hard case {path}"
    return path


def read_dicts(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def small_midi(n_notes: int = 8, pitch: int = 60, division: int = 480) -> bytes:
    events = b"".join(bytes([0, 0x90, pitch + i % 12, 80, 0x83, 0x60, 0x80, pitch + i % 12, 0]) for i in range(n_notes))
    track = events + b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, division) + b"MTrk" + struct.pack(">I", len(track)) + track


def write_files(directory: Path, files: dict[str, bytes]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return list_midi_files([directory])


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    recipe = InputRecipe("features", tuple(FEATURE_NAMES[:6]), 0, ("mean",))
    return save_regressor(
        tmp_path_factory.mktemp("m") / "good.safetensors", Regressor(VARegressor(recipe.input_dim, 8), recipe)
    )


def rewrite_model(source: Path, target: Path, *, tensors: Any = None, meta: Any = None) -> Path:
    """Copy a regressor file, changing its tensors (a function of the dict) and/or its metadata JSON."""
    with safe_open(str(source), framework="pt") as handle:
        header = json.loads(handle.metadata()["midiva"])
        stored = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    if tensors is not None:
        stored = tensors(stored)
    text = json.dumps(meta(header) if meta is not None else header)
    save_file(stored, str(target), metadata={"midiva": text})
    return target


# ---------------------------------------------------------------- 3: non-UTF-8 file names


def test_non_utf8_file_name_is_annotated_and_written_escaped(
    tmp_path: Path, shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "names"
    corpus.mkdir()
    name = os.fsdecode(b"caf\xe9_\xff.mid")  # not valid UTF-8: a surrogate-escaped str
    (corpus / name).write_bytes(hard_case(shared_dir, "loop16.mid").read_bytes())
    out = tmp_path / "out" / "a.csv"
    assert main(["-q", "annotate", str(corpus), "--out", str(out)]) == 0
    meta = read_dicts(output_paths(out).meta)
    assert [r["status"] for r in meta] == ["ok"] and meta[0]["name"].endswith("caf\\xe9_\\xff.mid")
    assert main(["-q", "features", str(corpus / name), "--out", str(tmp_path / "f.csv")]) == 0
    rows = read_dicts(tmp_path / "f.csv")
    assert len(rows) == 16 and rows[0]["file"].endswith("caf\\xe9_\\xff.mid")


# ---------------------------------------------------------------- 4: symusic reads past the buffer


def test_overread_24B_gives_one_failure_message_in_every_process(tmp_path: Path, shared_dir: Path) -> None:
    path = hard_case(shared_dir, "overread_24B.mid")
    code = (
        "import sys\nfrom midiva.midi import load_midi\ntry:\n    load_midi(sys.argv[1])\n"
        "except Exception as err:\n    print(type(err).__name__, err)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    messages = set()
    for i in range(4):  # fresh heaps: whatever follows the 24 bytes differs between processes
        padding = "x" * (i * 4099)
        done = subprocess.run(
            [sys.executable, "-c", f"_ = {padding!r}\n" + code, str(path)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=60,
        )
        messages.add(done.stdout.strip())
    data = path.read_bytes()
    for copy in (data, bytes(bytearray(data)), bytes.fromhex(data.hex()), bytes(memoryview(data + bytes(999))[:24])):
        with pytest.raises(MidiReadError) as caught:  # the same bytes elsewhere in memory (once: 6364 bytes "beyond")
            load_midi(copy, name=path.name)
        messages.add(f"MidiReadError {caught.value}")
    assert len(messages) == 1, messages
    (message,) = messages
    assert message.startswith("MidiReadError") and "ends inside this event" in message and "Cursor" not in message


def test_overread_24B_resumed_run_equals_clean_run(tmp_path: Path, shared_dir: Path) -> None:
    files = write_files(
        tmp_path / "in",
        {"overread.mid": hard_case(shared_dir, "overread_24B.mid").read_bytes(), "fine.mid": small_midi()},
    )
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run / "a.csv"
        annotate_stream(
            iter_files(files),
            out,
            load_annotation_model().regressor,
            options=AnnotateOptions(num_workers=2 if run == "b" else 0),
        )
        outs.append(output_paths(out).failures.read_bytes())
    assert outs[0] == outs[1] and b"ends inside this event" in outs[0]


# ---------------------------------------------------------------- 5: time signatures 1/64 and 1/128


@pytest.mark.parametrize("name", ["ts_1_64_indexerror.mid", "ts_1_128_indexerror.mid"])
def test_bar_shorter_than_an_onset_slot_gives_finite_features(
    shared_dir: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = hard_case(shared_dir, name)
    row = next(iter_files([path]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the divide-by-zero RuntimeWarning was the first symptom
        result = prepare_file(row, PrepareOptions(), strict=True)
    assert result.ok and result.features is not None and result.n_bars > 0
    assert np.isfinite(result.features).all()
    assert main(["-q", "features", str(path), "--strict", "--out", os.devnull]) == 0
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- 6: the ledger's record checksums


def _corrupt_md5_digit(ledger: Path, record: int) -> None:
    lines = ledger.read_bytes().split(b"\n")
    line = lines[1 + record]
    flipped = b"0" if line[:1] != b"0" else b"1"
    lines[1 + record] = flipped + line[1:]
    ledger.write_bytes(b"\n".join(lines))


def test_a_changed_md5_digit_in_the_ledger_is_refused_not_annotated_twice(
    tmp_path: Path, gigamidi_sample: Path
) -> None:
    files = list_midi_files([gigamidi_sample])[:4]
    regressor = load_annotation_model().regressor
    clean = tmp_path / "clean.csv"
    annotate_stream(iter_files(files), clean, regressor)
    out = tmp_path / "a.csv"
    annotate_stream(iter_files(files), out, regressor)
    _corrupt_md5_digit(output_paths(out).ledger, 1)  # a middle record
    before = out.read_bytes()
    with pytest.raises(OutputError, match=r"ledger .* is damaged .*--no-resume"):
        annotate_stream(iter_files(files), out, regressor)
    assert out.read_bytes() == before  # nothing appended twice
    # The last record damaged looks like a torn write: its file is redone, once.
    out2 = tmp_path / "b.csv"
    annotate_stream(iter_files(files), out2, regressor)
    ledger = output_paths(out2).ledger
    ledger.write_bytes(ledger.read_bytes().removesuffix(b"#complete\n"))
    _corrupt_md5_digit(ledger, 3)
    annotate_stream(iter_files(files), out2, regressor)
    assert out2.read_bytes() == clean.read_bytes()
    assert output_paths(out2).meta.read_bytes() == output_paths(clean).meta.read_bytes()


def test_a_format_1_ledger_still_resumes_byte_identically(tmp_path: Path, gigamidi_sample: Path) -> None:
    files = list_midi_files([gigamidi_sample])[:6]
    regressor = load_annotation_model().regressor
    clean = tmp_path / "clean.csv"
    annotate_stream(iter_files(files), clean, regressor)
    out = tmp_path / "a.csv"
    annotate_stream(iter_files(files[:3]), out, regressor, options=AnnotateOptions(limit=3))
    ledger = output_paths(out).ledger
    head, *records = ledger.read_bytes().split(b"\n")
    old = [LEDGER_MAGICS[0] + head[len(LEDGER_MAGICS[1]) :]]
    old += [b",".join(r.split(b",")[:6]) for r in records if r]  # format 1: no checksums
    ledger.write_bytes(b"\n".join(old) + b"\n")
    annotate_stream(iter_files(files), out, regressor)
    assert out.read_bytes() == clean.read_bytes()
    assert (
        ledger.read_bytes().startswith(LEDGER_MAGICS[0]) and len(ledger.read_bytes().split(b"\n")[-3].split(b",")) == 6
    )


def test_resume_refuses_a_hand_edit_that_shifted_the_committed_rows(tmp_path: Path, gigamidi_sample: Path) -> None:
    files = list_midi_files([gigamidi_sample])[:3]
    out = tmp_path / "a.csv"
    regressor = load_annotation_model().regressor
    annotate_stream(iter_files(files), out, regressor)
    lines = out.read_bytes().split(b"\n")
    lines[2] = lines[2] + b"0"  # one more digit: every later byte moves
    out.write_bytes(b"\n".join(lines))
    edited = out.read_bytes()
    with pytest.raises(OutputError, match="differ from their ledger checksum"):
        annotate_stream(iter_files(files), out, regressor)
    assert out.read_bytes() == edited  # refused before anything was truncated


def test_merge_detects_a_hand_edited_committed_value(tmp_path: Path, gigamidi_sample: Path) -> None:
    files = list_midi_files([gigamidi_sample])[:3]
    out = tmp_path / "a.csv"
    annotate_stream(iter_files(files), out, load_annotation_model().regressor)
    lines = out.read_bytes().split(b"\n")
    md5, bar, valence, arousal = lines[2].split(b",")
    digit = b"1" if valence[-1:] != b"1" else b"2"
    lines[2] = b",".join([md5, bar, valence[:-1] + digit, arousal])  # same length: only the checksum can tell
    out.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match="differ from what was committed"):
        merge_outputs([out], tmp_path / "merged.csv")


# ---------------------------------------------------------------- 7-9: regressor files


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda t: {**t, "hidden.weight": torch.full_like(t["hidden.weight"], float("nan"))}, id="nan_weights"
        ),
        pytest.param(lambda t: {**t, "input_std": torch.zeros_like(t["input_std"])}, id="input_std_zero"),
        pytest.param(lambda t: {k: v.to(torch.int64) for k, v in t.items()}, id="int64_tensors"),
    ],
)
def test_weights_that_would_predict_nan_are_refused_at_load(tmp_path: Path, good_model: Path, damage: Any) -> None:
    bad = rewrite_model(good_model, tmp_path / "bad.safetensors", tensors=damage)
    with pytest.raises(CheckpointError, match=r"tensor '.*' (holds|is torch.int64)"):
        load_regressor(bad)
    write_files(tmp_path / "in", {"fine.mid": small_midi()})
    assert (
        main(["-q", "annotate", str(tmp_path / "in"), "--model", str(bad), "--out", str(tmp_path / "o" / "a.csv")]) == 1
    )


def _set(path: tuple[str, ...], value: Any) -> Any:
    def change(header: dict[str, Any]) -> Any:
        if not path:
            return value
        node = header
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return header

    return change


@pytest.mark.parametrize(
    ("change", "match"),
    [
        pytest.param(_set(("architecture", "dropout"), float("nan")), "dropout", id="dropout_nan"),
        pytest.param(_set(("architecture", "hidden_dim"), -8), "hidden_dim", id="hidden_dim_negative"),
        pytest.param(_set(("architecture", "hidden_dim"), 10**12), "hidden_dim", id="hidden_dim_1e12"),
        pytest.param(_set(("architecture", "hidden_dim"), 2_000_000), "hidden_dim", id="hidden_dim_2e6"),
        pytest.param(_set(("architecture", "hidden_dim"), 16), "do not match", id="hidden_dim_wrong"),
        pytest.param(_set((), [1, 2, 3]), "JSON list", id="metadata_a_list"),
        pytest.param(_set(("architecture",), "mlp"), "architecture", id="architecture_a_string"),
    ],
)
def test_bad_model_metadata_is_refused_before_allocating(
    tmp_path: Path, good_model: Path, monkeypatch: pytest.MonkeyPatch, change: Any, match: str
) -> None:
    bad = rewrite_model(good_model, tmp_path / "bad.safetensors", meta=change)

    def no_allocation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the MLP was allocated before its metadata was checked")

    monkeypatch.setattr(VARegressor, "__init__", no_allocation)
    with pytest.raises(CheckpointError, match=match):
        load_regressor(bad)


def test_model_naming_unknown_feature_columns_is_refused_at_load(
    tmp_path: Path, good_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    renamed = ["no_such_feature", *FEATURE_NAMES[1:6]]
    bad = rewrite_model(good_model, tmp_path / "bad.safetensors", meta=_set(("recipe", "feature_names"), renamed))
    with pytest.raises(CheckpointError, match="no_such_feature"):
        load_annotation_model(bad)
    write_files(tmp_path / "in", {"fine.mid": small_midi()})
    assert (
        main(["-q", "annotate", str(tmp_path / "in"), "--model", str(bad), "--out", str(tmp_path / "o" / "a.csv")]) == 1
    )
    assert "no_such_feature" in capsys.readouterr().err
    assert not (tmp_path / "o" / "a.csv").exists()


# ---------------------------------------------------------------- 10: encoder config and checkpoint


@pytest.mark.parametrize("heads", [0, "four", -8, True])
def test_encoder_config_with_a_bad_head_count_is_refused(tmp_path: Path, tiny_checkpoint: Path, heads: Any) -> None:
    from midiva.latents import load_encoder

    config = json.loads((tiny_checkpoint.parent / "config.json").read_text())
    config["enc_n_head"] = heads
    with pytest.raises(ConfigError, match="enc_n_head must be a positive integer"):
        load_encoder(tiny_checkpoint, config=config)


def test_a_random_safetensors_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    from midiva.latents import load_encoder

    rng = np.random.default_rng(0)
    damaged = tmp_path / "random.safetensors"
    damaged.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    header = json.dumps({"x": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 1 << 32]}}).encode()
    claims_4gib = tmp_path / "claims.safetensors"
    claims_4gib.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    for path in (damaged, claims_4gib):
        with pytest.raises(CheckpointError, match=r"cannot read .* as a PyTorch checkpoint"):
            load_encoder(path)


# ---------------------------------------------------------------- 11: constant valence/arousal


def test_stats_and_report_of_a_constant_loop(tmp_path: Path, shared_dir: Path) -> None:
    write_files(tmp_path / "in", {"loop16.mid": hard_case(shared_dir, "loop16.mid").read_bytes()})
    out = tmp_path / "a.csv"
    assert main(["-q", "annotate", str(tmp_path / "in"), "--out", str(out)]) == 0
    values = {tuple(r[k] for k in ("valence", "arousal")) for r in read_dicts(out)}
    assert len(values) == 1  # the premise: every bar has the same prediction
    assert main(["-q", "stats", str(out), "--out", str(tmp_path / "stats")]) == 0
    summary = json.loads((tmp_path / "stats" / "summary.json").read_text())
    assert any("autocorrelation undefined" in note for note in summary["observations"])
    assert main(["-q", "report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "undefined" in (tmp_path / "report" / "report.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------- 12: local parquet


def _parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema), path)
    return path


SCHEMA = pa.schema([("md5", pa.string()), ("music", pa.binary()), ("title", pa.string())])


def test_parquet_with_zero_rows_is_nothing_to_annotate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _parquet(tmp_path / "pq" / "train.parquet", [], SCHEMA)
    assert list(iter_parquet(tmp_path / "pq")) == []
    out = tmp_path / "o" / "a.csv"
    # exit 1: nothing usable was given (the CLI's one exit-code rule), said plainly, and nothing written
    assert main(["-q", "annotate", "--dataset", str(tmp_path / "pq"), "--out", str(out)]) == 1
    assert "holds no rows" in capsys.readouterr().err
    assert not out.parent.exists()


def test_parquet_without_a_music_column_is_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema = pa.schema([("md5", pa.string()), ("midi", pa.binary())])
    _parquet(tmp_path / "pq" / "train.parquet", [{"md5": "0" * 32, "midi": small_midi()}], schema)
    with pytest.raises(SourceError, match="no 'music' column"):
        list(iter_parquet(tmp_path / "pq"))
    out = tmp_path / "o" / "a.csv"
    assert main(["-q", "annotate", "--dataset", str(tmp_path / "pq"), "--out", str(out)]) == 1
    assert "no 'music' column" in capsys.readouterr().err


def test_parquet_rows_claiming_another_rows_md5_are_failed_under_their_own(tmp_path: Path) -> None:
    honest = small_midi(8, 60)
    impostors = [small_midi(8, 62), small_midi(8, 64)]
    claimed = hashlib.md5(honest).hexdigest()
    rows = [{"md5": claimed, "music": honest, "title": "honest"}]
    rows += [{"md5": claimed, "music": data, "title": f"impostor {i}"} for i, data in enumerate(impostors)]
    _parquet(tmp_path / "pq" / "train.parquet", rows, SCHEMA)
    out = tmp_path / "o" / "a.csv"
    assert main(["-q", "annotate", "--dataset", str(tmp_path / "pq"), "--out", str(out)]) == 0
    failures = read_dicts(output_paths(out).failures)
    assert sorted(f["md5"] for f in failures) == sorted(hashlib.md5(d).hexdigest() for d in impostors)
    assert all(f["error_type"] == "DataError" and claimed in f["message"] for f in failures)
    meta = read_dicts(output_paths(out).meta)
    assert [(m["md5"], m["status"]) for m in meta if m["status"] == "ok"] == [(claimed, "ok")]
    summary = json.loads(output_paths(out).summary.read_text())
    assert summary["files_skipped_duplicate"] == 0 and summary["files_failed"] == 2


# ---------------------------------------------------------------- 13: per-file limits


def test_a_file_above_the_note_cap_is_a_typed_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(midi_mod, "MAX_NOTES", 100)
    assert load_midi(small_midi(100)).score.note_num() == 100
    with pytest.raises(MidiReadError, match="101 notes, above the limit of 100"):
        load_midi(small_midi(101))
    result = prepare_file(
        next(iter_files(write_files(tmp_path / "in", {"many.mid": small_midi(101)}))), PrepareOptions()
    )
    assert (result.stage, result.error_type) == ("read", "MidiReadError")


def test_the_default_limits_are_the_documented_ones(repo_dir: Path) -> None:
    readme = (repo_dir / "README.md").read_text(encoding="utf-8")
    assert f"{midi_mod.MAX_NOTES:,} notes" in readme and f"{midi_mod.MAX_MIDI_BYTES // 2**20} MiB" in readme


# ---------------------------------------------------------------- 14: only regular files


@pytest.mark.timeout(60)
def test_a_fifo_and_dev_zero_are_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.mid"
    os.mkfifo(fifo)  # nothing ever writes to it: opening it to read would block forever
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(MidiReadError, match="not a regular file"):
            read_midi_bytes(path)
        with pytest.raises(MidiReadError, match="not a regular file"):
            load_midi(path)
    out = tmp_path / "o" / "a.csv"
    assert (
        main(["-q", "annotate", str(fifo), "/dev/zero", "--out", str(out)]) == 1
    )  # every input failed: nothing usable
    failures = read_dicts(output_paths(out).failures)
    assert [(f["name"], f["error_type"]) for f in failures] == [
        (str(fifo), "MidiReadError"),
        ("/dev/zero", "MidiReadError"),
    ]
    assert all("not a regular file" in f["message"] for f in failures)
    assert main(["-q", "events", str(fifo)]) == 1  # refused (nothing usable), not blocked on
