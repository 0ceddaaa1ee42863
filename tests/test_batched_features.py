"""midiva.features.bar_features_many: the same bytes as one `bar_features` call per file, any batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import symusic

import midiva.features
from midiva.errors import DataError, MidivaError
from midiva.events import BarEvents, score_to_bars
from midiva.features import FEATURE_NAMES, BarFeatures, bar_features, bar_features_many
from midiva.midi import LoadedMidi, load_midi


def _pairs(paths: list[Path], include_drums: bool = True) -> list[tuple[LoadedMidi, BarEvents]]:
    pairs = []
    for path in paths:
        try:
            midi = load_midi(path)
            pairs.append((midi, score_to_bars(midi, include_drums=include_drums)))
        except MidivaError:
            continue
    return pairs


def _assert_same_as_one_by_one(
    pairs: list[tuple[LoadedMidi, BarEvents]], batched: list[BarFeatures | DataError]
) -> None:
    assert len(batched) == len(pairs)
    for (midi, bars), got in zip(pairs, batched, strict=True):
        try:
            want = bar_features(midi, bars)
        except DataError as err:
            assert isinstance(got, DataError) and str(got) == str(err), midi.name
            continue
        assert isinstance(got, BarFeatures), midi.name
        assert got.names == want.names
        assert got.values.dtype == want.values.dtype and got.values.shape == want.values.shape
        assert got.values.tobytes() == want.values.tobytes(), midi.name  # bit for bit, signed zeros too


@pytest.mark.parametrize("include_drums", [True, False], ids=lambda d: f"drums={d}")
def test_gigamidi_sample_and_hard_cases_batched_equal_one_by_one(
    gigamidi_sample: Path, shared_dir: Path, include_drums: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mixed lengths, tempo maps (one tempo and many), time signatures, pedals, drums and TPQs.
    monkeypatch.setattr(midiva.features, "BATCH_MAX_NOTES", 10**9)  # batch the big files too
    paths = sorted(gigamidi_sample.glob("*.mid")) + sorted((shared_dir / "data" / "hard_cases").glob("*.mid"))
    pairs = _pairs(paths, include_drums)
    assert len({bars.bar_resol for _, bars in pairs}) > 1
    _assert_same_as_one_by_one(pairs, bar_features_many(pairs))


def test_emopia_batched_equal_one_by_one(emopia_dir: Path) -> None:
    # Every 4th clip: hundreds of small files, several chunks of BATCH_BARS.
    pairs = _pairs(sorted((emopia_dir / "midis").glob("*.mid"))[::4])
    assert sum(bars.n_bars for _, bars in pairs) > 2 * midiva.features.BATCH_BARS
    _assert_same_as_one_by_one(pairs, bar_features_many(pairs))


def test_tiny_chunks_and_reversed_order_change_nothing(gigamidi_sample: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = _pairs(sorted(gigamidi_sample.glob("*.mid")))[::-1]
    monkeypatch.setattr(midiva.features, "BATCH_BARS", 64)  # most files alone, the short ones together
    monkeypatch.setattr(midiva.features, "BATCH_MAX_NOTES", 10**9)
    _assert_same_as_one_by_one(pairs, bar_features_many(pairs))


def _midi(notes: list[tuple[int, int, int]], time_signature: tuple[int, int] = (4, 4), tpq: int = 480) -> LoadedMidi:
    score = symusic.Score(tpq)
    score.time_signatures.append(symusic.TimeSignature(0, *time_signature))
    track = symusic.Track("piano", 0, False)
    for start, duration, pitch in notes:
        track.notes.append(symusic.Note(start, duration, pitch, 80))
    score.tracks.append(track)
    return load_midi(bytes(score.dumps_midi()))


def test_errors_stay_in_place_and_do_not_spoil_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    a = _midi([(0, 480, 60), (480, 960, 64)])
    b = _midi([(0, 240, 62)] * 3 + [(1920 * 5, 480, 67)], (3, 4))
    long = _midi([(1920 * k, 480, 60) for k in range(12)])
    monkeypatch.setattr(midiva.features, "MAX_FEATURE_BARS", 10)
    pairs = [(a, score_to_bars(a)), (b, score_to_bars(a)), (long, score_to_bars(long)), (b, score_to_bars(b))]
    got = bar_features_many(pairs)
    assert isinstance(got[1], DataError) and "do not belong" in str(got[1])
    assert isinstance(got[2], DataError) and "above the limit" in str(got[2])
    _assert_same_as_one_by_one(pairs, got)
    assert [g.n_bars for g in got if isinstance(g, BarFeatures)] == [pairs[0][1].n_bars, pairs[3][1].n_bars]


def test_files_interleaved_with_other_bar_lengths_and_tpqs() -> None:
    # Adjacent files touch on the batch's bar grid: a note held to a file's last tick, a 3/8 bar
    # shorter than a beat's multiple, another TPQ: none of it may leak into the next file's bars.
    held = _midi([(0, 1920 * 3, 48), (1920 * 2, 1920, 72)])
    waltz = _midi([(0, 720, 60), (720, 1440, 64), (2160, 10, 67)], (3, 8))
    coarse = _midi([(0, 96, 55), (96, 1, 59), (384, 384, 62)], tpq=96)
    pairs = [(m, score_to_bars(m)) for m in (held, waltz, held, coarse, waltz, held)]
    got = bar_features_many(pairs)
    _assert_same_as_one_by_one(pairs, got)
    assert all(isinstance(g, BarFeatures) and g.names == FEATURE_NAMES for g in got)


def test_empty_batch() -> None:
    assert bar_features_many([]) == []


def test_batched_rows_are_their_own_arrays() -> None:
    a, b = _midi([(0, 480, 60)]), _midi([(0, 480, 64)])
    got = bar_features_many([(a, score_to_bars(a)), (b, score_to_bars(b))])
    assert all(isinstance(g, BarFeatures) and g.values.base is None for g in got)
    assert np.isfinite(np.concatenate([g.values for g in got if isinstance(g, BarFeatures)])).all()
