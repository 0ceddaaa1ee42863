"""midiva.predict / predict_files: per-bar values with bar starts, the same numbers annotate writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from symusic import Note, Score, Tempo, Track

import midiva
from midiva.cli import main
from midiva.errors import EmptyScoreError, MidiReadError
from midiva.events import midi_to_bars
from midiva.model import default_model_path

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "midiva" / "assets" / "examples"


def _song(*, ticks_per_quarter: int = 96, lead_in_bars: int = 0) -> bytes:
    """A 4/4 melody, one note per half bar, at 60 bpm for the first sounding bar and 120 bpm after."""
    score = Score(ticks_per_quarter)
    track = Track()
    bar = 4 * ticks_per_quarter
    start = lead_in_bars * bar
    for i in range(8):
        track.notes.append(Note(start + i * bar // 2, ticks_per_quarter, 60 + i, 90))
    score.tracks.append(track)
    score.tempos.append(Tempo(0, 60.0))
    score.tempos.append(Tempo(start + bar, 120.0))
    return score.dumps_midi()


def test_bar_starts_in_ticks_and_seconds_follow_the_tempo_map() -> None:
    result = midiva.predict(_song())
    assert result.ok and len(result) == 4 and result.bar_number.tolist() == [0, 1, 2, 3]
    assert result.start_tick.tolist() == [0, 384, 768, 1152]
    np.testing.assert_allclose(result.start_seconds, [0.0, 4.0, 6.0, 8.0])  # one bar at 60 bpm, then 120
    assert (
        result.valence.dtype == np.float32
        and np.all(np.abs(result.valence) <= 1)
        and np.all(np.abs(result.arousal) <= 1)
    )
    assert result.name == result.md5 and result.title == ""  # nameless bytes go by their md5


def test_leading_empty_bars_shift_the_starts_not_the_numbers() -> None:
    result = midiva.predict(_song(ticks_per_quarter=480, lead_in_bars=2))
    assert result.bar_number.tolist() == [0, 1, 2, 3]  # MuseTok's bar 0 is the bar of the first note
    assert result.start_tick.tolist() == [3840, 5760, 7680, 9600]
    np.testing.assert_allclose(result.start_seconds, [8.0, 12.0, 14.0, 16.0])  # two silent bars at 60 bpm first


def test_tables_for_pandas_and_polars() -> None:
    result = midiva.predict(EXAMPLES / "calm_major.mid")
    frame = result.to_pandas()
    assert list(frame.columns) == ["bar_number", "start_tick", "start_seconds", "valence", "arousal"]
    assert len(frame) == midi_to_bars(EXAMPLES / "calm_major.mid").n_bars and str(frame["valence"].dtype) == "float32"
    table = result.to_polars()
    assert table.columns == list(frame.columns) and table["arousal"].to_list() == frame["arousal"].tolist()
    assert result.title == "calm_major" and result.name.endswith("calm_major.mid")
    record = json.loads(json.dumps(result.to_json()))
    assert record["n_bars"] == len(frame) and record["bar_number"] == list(range(len(frame)))


def test_values_are_the_ones_annotate_writes(tmp_path: Path) -> None:
    out = tmp_path / "a.csv"
    assert main(["-q", "annotate", str(EXAMPLES), "--out", str(out)]) == 0
    with out.open(newline="") as handle:
        written = [
            (r["md5"], int(r["bar_number"]), float(r["valence"]), float(r["arousal"])) for r in csv.DictReader(handle)
        ]
    files = sorted(EXAMPLES.glob("*.mid"))
    # One batch of all files and a batch per file: a file's values do not depend on its neighbours.
    together = list(midiva.predict_files(files, batch_size=64))
    alone = [midiva.predict(f, batch_size=64) for f in files]
    predicted = [
        (r.md5, b, float(v), float(a))
        for r in together
        for b, v, a in zip(r.bar_number, r.valence, r.arousal, strict=True)
    ]
    assert [(m, b) for m, b, _, _ in predicted] == [(m, b) for m, b, _, _ in written]
    assert max(abs(round(p[k], 4) - w[k]) for p, w in zip(predicted, written, strict=True) for k in (2, 3)) < 1e-9
    for x, y in zip(together, alone, strict=True):
        np.testing.assert_array_equal(x.valence, y.valence)


def test_a_stream_of_files_keeps_order_and_records_failures(gigamidi_sample: Path) -> None:
    sources = [
        EXAMPLES / "slow_minor.mid",
        b"not midi",
        ("named.mid", (EXAMPLES / "calm_major.mid").read_bytes()),
        gigamidi_sample / "empty.mid",
        gigamidi_sample / "no-such.mid",
    ]
    results = list(midiva.predict_files(sources, num_workers=2))
    assert [r.ok for r in results] == [True, False, True, False, False]
    assert [r.error_type for r in results] == ["", "MidiReadError", "", "EmptyScoreError", "MidiReadError"]
    assert results[2].name == "named.mid" and results[2].title == "named" and results[2].n_bars == 8
    assert results[1].n_bars == 0 and results[1].to_pandas().empty and "error" in results[1].to_json()


def test_single_file_errors_are_typed(gigamidi_sample: Path, tmp_path: Path) -> None:
    with pytest.raises(MidiReadError, match=r"no-such\.mid"):
        midiva.predict(tmp_path / "no-such.mid")
    with pytest.raises(MidiReadError, match="not a Standard MIDI File"):
        midiva.predict(b"not midi")
    with pytest.raises(EmptyScoreError):
        midiva.predict(gigamidi_sample / "empty.mid")


def test_the_model_can_be_named_or_passed() -> None:
    song = EXAMPLES / "tense_fast_minor.mid"
    default = midiva.predict(song)
    by_path = midiva.predict(song, model=default_model_path())
    by_object = midiva.predict(song, model=midiva.load_regressor())
    np.testing.assert_array_equal(default.valence, by_path.valence)
    np.testing.assert_array_equal(default.arousal, by_object.arousal)


def test_cli_predict_prints_a_table_writes_csv_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    song = EXAMPLES / "calm_major.mid"
    assert main(["predict", str(song), "--plot", str(tmp_path / "plots" / "c.png")]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith(f"{song}: calm_major; md5 ") and lines[1].split() == [
        "bar_number",
        "start_tick",
        "start_seconds",
        "valence",
        "arousal",
    ]
    expected = midiva.predict(song)
    assert [float(x.split()[3]) for x in lines[2:]] == [round(float(v), 4) for v in expected.valence]
    assert (tmp_path / "plots" / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert "predict: 1 file done, 0 failed; 8 bars" in captured.err
    assert main(["-q", "predict", str(EXAMPLES), "--out", str(tmp_path / "p.csv"), "--json"]) == 0
    records = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(records) == 5 and all(r["n_bars"] == len(r["valence"]) for r in records)
    with (tmp_path / "p.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(r["n_bars"] for r in records) and rows[0]["start_tick"] == "0"
