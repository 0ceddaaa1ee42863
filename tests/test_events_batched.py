"""midiva.events.score_to_bars_many: the same BarEvents (or error) as one `score_to_bars` call per file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import midiva.events
from midiva.errors import EmptyScoreError, MidivaError, VocabularyError
from midiva.events import BarEvents, score_to_bars, score_to_bars_many, to_musetok_ticks, to_musetok_ticks_by_run
from midiva.midi import LoadedMidi, load_midi
from test_events import STRICT, _time_signature, smf, song

OPTIONS = [{}, {"include_drums": False}, STRICT]


def _load(paths: list[Path]) -> list[LoadedMidi]:
    midis = []
    for path in paths:
        try:
            midis.append(load_midi(path))
        except MidivaError:
            continue
    return midis


def _assert_same_as_one_by_one(midis: list[LoadedMidi], **options: Any) -> list[BarEvents | MidivaError]:
    batched = score_to_bars_many(midis, **options)
    assert len(batched) == len(midis)
    for midi, got in zip(midis, batched, strict=True):
        try:
            want = score_to_bars(midi, **options)
        except MidivaError as err:
            assert type(got) is type(err) and str(got) == str(err), midi.name
            continue
        assert isinstance(got, BarEvents), midi.name
        assert got.tokens.dtype == want.tokens.dtype and np.array_equal(got.tokens, want.tokens), midi.name
        assert got.bar_starts == want.bar_starts and got.report == want.report, midi.name
        assert (got.name, got.md5, got.ticks_per_quarter, got.time_signature, got.bar_resol) == (
            want.name,
            want.md5,
            want.ticks_per_quarter,
            want.time_signature,
            want.bar_resol,
        )
    return batched


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_gigamidi_sample_and_hard_cases(
    gigamidi_sample: Path, shared_dir: Path, options: dict[str, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(midiva.events, "BATCH_MAX_NOTES", 10**9)  # batch the big files too
    paths = sorted(gigamidi_sample.glob("*.mid")) + sorted((shared_dir / "data" / "hard_cases").glob("*.mid"))
    _assert_same_as_one_by_one(_load(paths), **options)


def test_emopia(emopia_dir: Path) -> None:
    midis = _load(sorted((emopia_dir / "midis").glob("*.mid"))[::3])
    _assert_same_as_one_by_one(midis)
    _assert_same_as_one_by_one(midis[::-1], include_drums=False)


def test_tiny_chunks(gigamidi_sample: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(midiva.events, "BATCH_BARS", 8)
    monkeypatch.setattr(midiva.events, "BATCH_MAX_NOTES", 10**9)
    _assert_same_as_one_by_one(_load(sorted(gigamidi_sample.glob("*.mid"))))


def _midi(data: bytes) -> LoadedMidi:
    return load_midi(data)


def test_neighbours_do_not_leak_into_each_other() -> None:
    # Triplets up to a bar line, notes held past the last bar, overlaps to trim at a file's last
    # onset, leading empty bars, other TPQs and 3/8 bars: each file next to copies of the others.
    triplets = song([(k * 160, 160, 60 + k % 5) for k in range(12)] + [(1760, 480, 67)])
    held = song([(0, 1920 * 3, 48), (480, 240, 72), (1900, 2000, 74)])
    trims = song([(0, 960, 60), (0, 1920, 64), (480, 480, 67), (960, 100, 60)])
    late = song([(1920 * 7 + 5, 30, 61), (1920 * 9, 1, 62)], tpq=96)
    waltz = song([(0, 720, 60), (700, 40, 64), (1440, 2000, 67)], ts=(3, 8))
    # A note rounded up to the next downbeat would make a triplet with the next file's first notes.
    rounds_up, after_it = song([(0, 480, 60), (1915, 160, 62)]), song([(80, 80, 64), (160, 80, 65)])
    midis = [_midi(d) for d in (triplets, held, trims, late, waltz, held, triplets, waltz, trims, rounds_up, after_it)]
    _assert_same_as_one_by_one(midis)
    _assert_same_as_one_by_one(midis[::-1])


def test_files_converted_alone_keep_their_errors_and_replacements(monkeypatch: pytest.MonkeyPatch) -> None:
    scale = [(0, 480, 60), (480, 480, 62)]
    empty = smf([_time_signature(0, 4, 4)])
    low = song([(0, 480, 10)])  # only an out-of-range pitch: empty after dropping, VocabularyError strictly
    mixed = song([*scale, (240, 480, 10)])  # one dropped (counted) in the batch, VocabularyError strictly
    odd_bar = song(scale, ts=(5, 4))  # a signature outside the vocabulary
    odd_slot = song([*scale, (3000, 40, 64)], ts=(9, 4))  # Beat_75 is not in the vocabulary
    midis = [_midi(d) for d in (empty, low, song(scale), mixed, odd_bar, odd_slot, song(scale))]
    alone: list[str] = []
    one_file = midiva.events.score_to_bars
    monkeypatch.setattr(
        midiva.events, "score_to_bars", lambda midi, **o: alone.append(midi.name) or one_file(midi, **o)
    )
    for options in OPTIONS:
        alone.clear()
        got = _assert_same_as_one_by_one(midis, **options)
        assert isinstance(got[0], EmptyScoreError)
        assert isinstance(got[1], VocabularyError if options == STRICT else EmptyScoreError)
        assert isinstance(got[5], VocabularyError if options == STRICT else BarEvents)
        assert sorted(alone) == sorted(midis[i].name for i in [0, 1, 4, 5] + ([3] if options == STRICT else []))


def test_empty_batch() -> None:
    assert score_to_bars_many([]) == []


def test_to_musetok_ticks_by_run_equals_each_run_alone() -> None:
    rng = np.random.default_rng(3)
    tpqs, counts = [480, 96, 384, 480, 1, 32767], [5, 0, 7, 3, 4, 6]
    ticks = rng.integers(0, 2**31 - 1, sum(counts)).astype(np.int32)
    got = to_musetok_ticks_by_run(ticks, tpqs, counts)
    runs = np.split(ticks, np.cumsum(counts)[:-1])
    want = np.concatenate([to_musetok_ticks(run, tpq) for run, tpq in zip(runs, tpqs, strict=True)])
    assert got.dtype == np.int64 and np.array_equal(got, want)
    assert np.array_equal(to_musetok_ticks_by_run(ticks[:5], [96], [5]), to_musetok_ticks(ticks[:5], 96))
