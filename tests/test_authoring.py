"""Authoring rewrites change how the music is written down, never what it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from symusic.core import ScoreTick

from midiva import authoring as A
from midiva.errors import DataError
from midiva.midi import load_midi

CLIP = "Q1_0vLPYiPN7qY_0.mid"


@pytest.fixture(scope="module")
def clip(emopia_dir: Path) -> ScoreTick:
    return load_midi(emopia_dir / "midis" / CLIP).score


@pytest.fixture(scope="module")
def patterns(gigamidi_sample: Path) -> list[A.DrumPattern]:
    return A.load_drum_patterns(sorted(gigamidi_sample.glob("*.mid")))


def _pitched(score: ScoreTick) -> dict[str, np.ndarray]:
    arrays = [t.notes.numpy() for t in score.tracks if not t.is_drum and t.note_num()]
    return {
        k: np.concatenate([a[k] for a in arrays]).astype(np.int64) for k in ("time", "duration", "pitch", "velocity")
    }


def _seconds(score: ScoreTick) -> np.ndarray:
    seconds = score.to("second")
    return np.sort(np.concatenate([t.notes.numpy()["time"] for t in seconds.tracks if t.note_num()]).astype(np.float64))


def _rng() -> np.random.Generator:
    return A.seeded_rng("test")


def test_constant_velocity_sets_every_note(clip: ScoreTick) -> None:
    out = A.constant_velocity(100)(clip, _rng())
    assert set(_pitched(out)["velocity"].tolist()) == {100}
    assert len(_pitched(out)["pitch"]) == len(_pitched(clip)["pitch"])


def test_compressed_velocity_keeps_order_inside_band(clip: ScoreTick) -> None:
    def by_note(n: dict[str, np.ndarray]) -> np.ndarray:
        return n["velocity"][np.lexsort((n["pitch"], n["time"]))]

    before, after = by_note(_pitched(clip)), by_note(_pitched(A.compressed_velocity(72, 88)(clip, _rng())))
    assert after.min() >= 72 and after.max() <= 88
    assert np.corrcoef(before, after)[0, 1] > 0.99  # a linear map, up to rounding


def test_quantized_onsets_lie_on_the_grid(clip: ScoreTick) -> None:
    out = A.quantized(4)(clip, _rng())
    step = int(clip.ticks_per_quarter) // 4
    notes = _pitched(out)
    assert (notes["time"] % step == 0).all() and (notes["duration"] % step == 0).all() and (notes["duration"] > 0).all()


def test_retimed_keeps_seconds_and_changes_the_grid(clip: ScoreTick) -> None:
    out = A.retimed(90.0, 96)(clip, _rng())
    assert int(out.ticks_per_quarter) == 96
    assert [round(t.qpm) for t in out.tempos] == [90]
    # one tick at 96 tpq and 90 bpm is ~7 ms: onsets in seconds agree within two ticks
    np.testing.assert_allclose(_seconds(out), _seconds(clip), atol=2 * 60 / 90 / 96)


def test_spread_tracks_keeps_every_note(clip: ScoreTick) -> None:
    out = A.spread_tracks(doublings=False)(clip, _rng())
    names = [t.name for t in out.tracks]
    assert names == ["melody", "bass", "accompaniment"]
    key = lambda n: sorted(zip(n["time"].tolist(), n["pitch"].tolist(), strict=True))  # noqa: E731
    assert key(_pitched(out)) == key(_pitched(clip))


def test_octave_doublings_only_add_octaves_of_existing_notes(clip: ScoreTick) -> None:
    out = A.spread_tracks(doublings=True)(clip, _rng())
    original = set(zip(_pitched(clip)["time"].tolist(), _pitched(clip)["pitch"].tolist(), strict=True))
    doubled = [t for t in out.tracks if "octave" in t.name]
    assert doubled
    for track in doubled:
        notes = track.notes.numpy()
        for time, pitch in zip(notes["time"].tolist(), notes["pitch"].tolist(), strict=True):
            assert (time, pitch - 12) in original or (time, pitch + 12) in original
            assert A.PIANO_RANGE[0] <= pitch <= A.PIANO_RANGE[1]


def test_notated_durations_end_each_voice_at_its_next_onset(clip: ScoreTick) -> None:
    before = _pitched(clip)
    out = A.notated_durations()(clip, _rng())
    after = _pitched(out)
    key = lambda n: np.lexsort((n["pitch"], n["time"]))  # noqa: E731
    b = {k: v[key(before)] for k, v in before.items()}
    a = {k: v[key(after)] for k, v in after.items()}
    for col in ("time", "pitch", "velocity"):  # only lengths change
        np.testing.assert_array_equal(a[col], b[col])
    assert (a["duration"] <= b["duration"]).all() and (a["duration"] >= 1).all()
    assert (a["duration"] < b["duration"]).mean() > 0.3  # EMOPIA's sounding lengths overlap the next notes
    voice = A._voices(a["time"], a["pitch"], max(1, int(clip.ticks_per_quarter) // 12))
    for v in range(3):
        t, d = a["time"][voice == v], a["duration"][voice == v]
        onsets = np.unique(t)
        nxt = np.searchsorted(onsets, t, side="right")
        has = nxt < onsets.size
        assert (t[has] + d[has] <= onsets[nxt[has]]).all()  # no note of a voice overlaps its next onset
    assert list(out.tracks[0].controls) == list(clip.tracks[0].controls)  # the pedal is another rewrite's


def test_notated_durations_leave_drums_and_empty_scores_alone(clip: ScoreTick, patterns: list[A.DrumPattern]) -> None:
    drummed = A.with_drums(patterns)(clip, _rng())
    out = A.notated_durations()(drummed, _rng())
    drums = lambda s: [t.notes.numpy()["duration"].tolist() for t in s.tracks if t.is_drum]  # noqa: E731
    assert drums(out) == drums(drummed) and drums(out)
    empty = ScoreTick(480)
    assert A.notated_durations()(empty, _rng()).note_num() == 0


def test_without_pedal_removes_only_cc64(clip: ScoreTick) -> None:
    assert any(c.number == A.SUSTAIN_PEDAL_CC for t in clip.tracks for c in t.controls)
    out = A.without_pedal()(clip, _rng())
    assert not any(c.number == A.SUSTAIN_PEDAL_CC for t in out.tracks for c in t.controls)
    assert out.note_num() == clip.note_num()


def test_transposed_moves_pitches(clip: ScoreTick) -> None:
    np.testing.assert_array_equal(
        np.sort(_pitched(A.transposed(-3)(clip, _rng()))["pitch"]), np.sort(_pitched(clip)["pitch"]) - 3
    )


def test_with_drums_loops_a_real_pattern(clip: ScoreTick, patterns: list[A.DrumPattern]) -> None:
    assert len(patterns) >= 5, "the GigaMIDI sample's drum tracks give the patterns"
    out = A.with_drums(patterns)(clip, _rng())
    drums = [t for t in out.tracks if t.is_drum]
    assert len(drums) == 1 and drums[0].note_num() >= A.MIN_PATTERN_NOTES
    assert int(drums[0].notes.numpy()["time"].max()) < int(clip.end())
    assert A.without_drums()(out, _rng()).note_num() == clip.note_num()


def _sounding_classes(score: ScoreTick) -> np.ndarray:
    """(beats, 12): pitch classes that start in each beat or sound at its start (the backing's reading)."""
    n = _pitched(score)
    tpq = int(score.ticks_per_quarter)
    present = np.zeros((int(score.end()) // tpq + 2, 12), bool)
    for t, d, p in zip(n["time"], n["duration"], n["pitch"], strict=True):
        present[t // tpq : max(t + max(d, 1) - 1, t) // tpq + 1, p % 12] = True
    return present


def test_band_backing_adds_parts_of_the_music_own_harmony(clip: ScoreTick) -> None:
    out = A.band_backing()(clip, _rng())
    added = out.tracks[len(clip.tracks) :]
    assert [t.name for t in added] == ["backing pad", "backing guitar"]
    assert [t.program for t in added] == [A.BACKING_PAD_PROGRAM, A.BACKING_GUITAR_PROGRAM]
    for before, after in zip(clip.tracks, out.tracks, strict=False):  # the original tracks as they were
        assert before.notes.numpy()["time"].tolist() == after.notes.numpy()["time"].tolist()
    present = _sounding_classes(clip)
    tpq = int(clip.ticks_per_quarter)
    velocity = int(np.median(_pitched(clip)["velocity"]))
    for track in added:
        n = track.notes.numpy()
        assert n["time"].size > 0 and set(n["velocity"].tolist()) == {velocity}
        # every added note has a pitch class that already sounds in its onset beat
        assert present[n["time"] // tpq, n["pitch"] % 12].all()
    pad = added[0].notes.numpy()
    assert pad["pitch"].min() >= A.BACKING_PAD_LOW and pad["pitch"].max() < A.BACKING_PAD_LOW + 12
    guitar = added[1].notes.numpy()
    assert (guitar["time"] % tpq == 0).all() and guitar["time"].size >= 2 * np.unique(guitar["time"]).size
    onsets = set(_pitched(clip)["time"].tolist())
    assert all(any(abs(t - o) <= tpq // 24 for o in onsets) for t in np.unique(guitar["time"]).tolist()), (
        "the guitar strikes only where the music has an onset"
    )


def test_band_backing_leaves_a_score_without_pitched_notes_alone(patterns: list[A.DrumPattern]) -> None:
    drums_only = A.with_drums(patterns)(ScoreTick(480), _rng())
    assert A.band_backing()(drums_only, _rng()).note_num() == drums_only.note_num()


def test_backing_augmentation_only_adds_a_last_draw(emopia_dir: Path) -> None:
    data = (emopia_dir / "midis" / CLIP).read_bytes()
    with_backing = 0
    for k in range(40):
        plain_name, plain = A.random_augmentation(A.seeded_rng("aug", k))
        name, rewrite = A.random_augmentation(A.seeded_rng("aug", k), backing=True)
        assert name.removesuffix("+backing").removesuffix("backing") in (plain_name, "identity"), (name, plain_name)
        if name.endswith("backing"):
            with_backing += 1
        else:  # no backing drawn: the very rewrite of earlier versions
            assert A.rewrite_bytes(data, rewrite, A.seeded_rng("rw", k)) == A.rewrite_bytes(
                data, plain, A.seeded_rng("rw", k)
            )
    assert 0.15 * 40 <= with_backing <= 0.6 * 40


def test_sequenced_augmentation_only_adds_a_last_draw(emopia_dir: Path, patterns: list[A.DrumPattern]) -> None:
    data = (emopia_dir / "midis" / CLIP).read_bytes()
    sequenced = 0
    for k in range(40):
        plain_name, plain = A.random_augmentation(A.seeded_rng("aug", k), backing=True)
        assert A.random_augmentation(A.seeded_rng("aug", k), backing=True, sequenced=False)[0] == plain_name
        name, rewrite = A.random_augmentation(A.seeded_rng("aug", k), backing=True, sequenced=True)
        if name.startswith("seq+"):
            sequenced += 1
            parts = name.split("+")
            assert {"notated", "nopedal"} <= set(parts) and {"split", "doubled"} & set(parts), name
            assert any(p.startswith(("quant", "vel")) for p in parts)
            assert ("backing" in parts) == plain_name.endswith("backing"), (name, plain_name)
        else:  # no sequenced combination drawn: the very rewrite drawn without the flag
            assert name == plain_name
            if k < 8:
                assert A.rewrite_bytes(data, rewrite, A.seeded_rng("rw", k)) == A.rewrite_bytes(
                    data, plain, A.seeded_rng("rw", k)
                )
    assert 0.1 * 40 <= sequenced <= 0.6 * 40
    drummed = [A.random_augmentation(A.seeded_rng("aug", k), patterns, sequenced=True) for k in range(40)]
    combos = [(name, rewrite) for name, rewrite in drummed if name.startswith("seq+")]
    assert combos and all("drums" in name.split("+") for name, _ in combos)
    out = combos[0][1](load_midi(data).score, _rng())
    assert any(t.is_drum for t in out.tracks) and len(out.tracks) >= 3
    assert not any(c.number == A.SUSTAIN_PEDAL_CC for t in out.tracks for c in t.controls)


def test_random_augmentation_is_reproducible(emopia_dir: Path) -> None:
    data = (emopia_dir / "midis" / CLIP).read_bytes()
    made = []
    for _ in range(2):
        name, rewrite = A.random_augmentation(A.seeded_rng("aug", 7))
        made.append((name, A.rewrite_bytes(data, rewrite, A.seeded_rng("rw", 7))))
    assert made[0] == made[1]
    names = {A.random_augmentation(A.seeded_rng("aug", k))[0] for k in range(20)}
    assert len(names) > 10, "the augmentation draws different rewrites"


def test_rewrite_that_leaves_no_notes_is_an_error(emopia_dir: Path) -> None:
    data = (emopia_dir / "midis" / CLIP).read_bytes()
    with pytest.raises(DataError, match="no notes"):
        A.rewrite_bytes(data, A.transposed(200), _rng())


def test_bad_parameters_are_refused() -> None:
    for make in (
        lambda: A.constant_velocity(0),
        lambda: A.compressed_velocity(90, 80),
        lambda: A.quantized(0),
        lambda: A.retimed(5.0, 480),
        lambda: A.with_drums([]),
    ):
        with pytest.raises(DataError):
            make()
