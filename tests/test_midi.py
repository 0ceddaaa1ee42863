"""midiva.midi: reading MIDI bytes into a symusic Score, and the typed errors for bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

import midiva.midi
from midiva.errors import MidiReadError
from midiva.midi import LoadedMidi, load_midi, read_midi_bytes

# One format-0 track at 96 TPQ: middle C for a quarter note, then end of track.
TINY_FORMAT0 = (
    b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x00\x60MTrk\x00\x00\x00\x0c\x00\x90\x3c\x40\x60\x80\x3c\x00\x00\xff\x2f\x00"
)


def _with_division(division: bytes) -> bytes:
    return TINY_FORMAT0[:12] + division + TINY_FORMAT0[14:]


def test_tiny_file_reads_in_its_own_ticks() -> None:
    midi = load_midi(TINY_FORMAT0)
    assert isinstance(midi, LoadedMidi)
    assert midi.midi_format == 0 and midi.n_bytes == len(TINY_FORMAT0)
    assert midi.score.ticks_per_quarter == 96  # not resampled: events.py rescales like MuseTok
    notes = midi.score.tracks[0].notes.numpy()
    assert notes["time"].tolist() == [0] and notes["duration"].tolist() == [96] and notes["pitch"].tolist() == [60]


def test_note_arrays_are_each_tracks_notes_converted_once_and_read_only(gigamidi_sample: Path) -> None:
    midi = load_midi(gigamidi_sample / "Funkytown.mid")
    arrays = midi.note_arrays
    assert midi.note_arrays is arrays  # converted once, shared by the events and features stages
    assert len(arrays) == len(midi.score.tracks)
    for track, notes in zip(midi.score.tracks, arrays, strict=True):
        expected = track.notes.numpy()
        assert notes.keys() == expected.keys()
        for key, values in notes.items():
            assert values.dtype == expected[key].dtype and values.tolist() == expected[key].tolist()
            assert not values.flags.writeable


def test_bytes_are_named_by_md5_unless_a_name_is_given() -> None:
    md5 = hashlib.md5(TINY_FORMAT0).hexdigest()
    assert load_midi(TINY_FORMAT0).name == md5 == load_midi(TINY_FORMAT0).md5
    assert load_midi(TINY_FORMAT0, name="song.mid").name == "song.mid"
    assert load_midi(bytearray(TINY_FORMAT0)).md5 == md5


def test_path_md5_matches_musetok_records(gigamidi_sample: Path, musetok_ref: Path) -> None:
    with gzip.open(musetok_ref / "events_gigamidi_sample.jsonl.gz", "rt") as f:
        records = {r["file"]: r for r in map(json.loads, f)}
    for path in sorted(gigamidi_sample.glob("*.mid"))[:5]:
        if path.stat().st_size == 0:
            continue
        midi = load_midi(path)
        assert midi.md5 == records[path.name]["md5"] and midi.name == path.name
        assert load_midi(str(path)).md5 == midi.md5


def test_read_midi_bytes_passes_bytes_through(tmp_path: Path) -> None:
    assert read_midi_bytes(TINY_FORMAT0) == (TINY_FORMAT0, hashlib.md5(TINY_FORMAT0).hexdigest())
    path = tmp_path / "t.mid"
    path.write_bytes(TINY_FORMAT0)
    assert read_midi_bytes(path) == (TINY_FORMAT0, "t.mid")


def test_missing_path_raises_midi_read_error(tmp_path: Path) -> None:
    with pytest.raises(MidiReadError, match="cannot read"):
        load_midi(tmp_path / "nope.mid")


def test_directory_path_raises_midi_read_error(tmp_path: Path) -> None:
    with pytest.raises(MidiReadError, match="cannot read"):
        load_midi(tmp_path)


def test_zero_length_raises_midi_read_error() -> None:
    with pytest.raises(MidiReadError, match="zero-length"):
        load_midi(b"")


def test_non_midi_bytes_raise_midi_read_error() -> None:
    with pytest.raises(MidiReadError, match="MThd"):
        load_midi(b"ID3\x03\x00 an mp3, not a MIDI file")


def test_truncated_header_raises_midi_read_error() -> None:
    with pytest.raises(MidiReadError):
        load_midi(TINY_FORMAT0[:10])


def test_truncated_track_raises_midi_read_error() -> None:
    with pytest.raises(MidiReadError, match="could not be parsed"):
        load_midi(TINY_FORMAT0[:-6])


def test_tpq_0_and_smpte_raise_midi_read_error() -> None:
    with pytest.raises(MidiReadError, match="0 ticks per quarter"):
        load_midi(_with_division(b"\x00\x00"))
    with pytest.raises(MidiReadError, match="SMPTE"):
        load_midi(_with_division(b"\xe2\x50"))


@pytest.mark.parametrize("tpq", [1, 24, 32767])
def test_extreme_tpq_is_read(tpq: int) -> None:
    assert load_midi(_with_division(tpq.to_bytes(2, "big"))).score.ticks_per_quarter == tpq


def test_oversized_input_is_refused_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(midiva.midi, "MAX_MIDI_BYTES", len(TINY_FORMAT0) - 1)
    path = tmp_path / "big.mid"
    path.write_bytes(TINY_FORMAT0)
    for src in (path, TINY_FORMAT0):
        with pytest.raises(MidiReadError, match="MiB"):
            load_midi(src)


@pytest.mark.parametrize("division", [0x8000, 0xE250, 0xFFFF])
def test_division_above_max_ticks_per_quarter_names_the_file_its_value_and_the_limit(division: int) -> None:
    from midiva.midi import MAX_TICKS_PER_QUARTER

    message = rf"'crafted.mid' has a time division of {division} \(0x{division:04x}\), above the {MAX_TICKS_PER_QUARTER} .*SMPTE"
    with pytest.raises(MidiReadError, match=message):
        load_midi(_with_division(division.to_bytes(2, "big")), name="crafted.mid")
    assert (
        load_midi(_with_division(MAX_TICKS_PER_QUARTER.to_bytes(2, "big"))).score.ticks_per_quarter
        == MAX_TICKS_PER_QUARTER
    )
