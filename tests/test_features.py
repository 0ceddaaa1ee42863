"""Bar features: known values on hand-built scores, alignment with MuseTok bars, real-data sanity."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import symusic

from midiva.cli import main
from midiva.errors import DataError, EmptyScoreError, MidiReadError
from midiva.events import BarEvents, score_to_bars
from midiva.features import (
    BASE_FEATURE_NAMES,
    FEATURE_DOCS,
    FEATURE_NAMES,
    BarFeatures,
    bar_features,
    midi_to_features,
)
from midiva.midi import load_midi

Note = tuple[int, int, int, int]  # (time, duration, pitch, velocity) in the score's ticks


def make_midi(
    notes: Sequence[Note] = (),
    *,
    tpq: int = 480,
    tempos: Sequence[tuple[int, float]] = (),
    time_signature: tuple[int, int] | None = None,
    drums: Sequence[Note] = (),
    pedal: Sequence[tuple[int, int]] = (),
) -> bytes:
    """A Standard MIDI File, built in code: one piano track, optionally a drum track and pedal."""
    score = symusic.Score(tpq)
    for time, qpm in tempos:
        score.tempos.append(symusic.Tempo(time, qpm))
    if time_signature is not None:
        score.time_signatures.append(symusic.TimeSignature(0, *time_signature))
    piano = symusic.Track("piano", 0, False)
    for note in notes:
        piano.notes.append(symusic.Note(*note))
    for down, up in pedal:
        piano.controls.append(symusic.ControlChange(down, 64, 127))
        piano.controls.append(symusic.ControlChange(up, 64, 0))
    if notes:
        score.tracks.append(piano)
    if drums:
        kit = symusic.Track("drums", 0, True)
        for note in drums:
            kit.notes.append(symusic.Note(*note))
        score.tracks.append(kit)
    return bytes(score.dumps_midi())


def features_of(data: bytes) -> tuple[int, dict[str, np.ndarray]]:
    bars, feats = midi_to_features(data)
    assert feats.n_bars == bars.n_bars
    return bars.n_bars, {name: feats.column(name) for name in feats.names}


# ---------------------------------------------------------------- schema


def test_triad_fits_equal_the_plain_formula_bit_for_bit() -> None:
    from midiva.features import _TRIADS_T, _triad_fits

    rng = np.random.default_rng(7)
    for k in (1, 5, 300, 2000):
        chroma = rng.random((k, 12)) * (rng.random((k, 12)) < 0.5)
        chroma /= np.maximum(chroma.sum(1, keepdims=True), 1e-12)
        plain = (chroma @ _TRIADS_T).reshape(-1, 3, 12).max(2)
        assert np.array_equal(_triad_fits(chroma), plain)


def test_key_feature_helpers_equal_the_plain_formulas_bit_for_bit() -> None:
    from midiva.features import _PROFILES_T, _best_of_roots, _entropy_bits

    rng = np.random.default_rng(11)
    for k in (1, 7, 500):
        product = rng.standard_normal((k, 24))
        assert np.array_equal(_best_of_roots(product, 2), product.reshape(-1, 2, 12).max(2))
        p = rng.random((k, 12)) * (rng.random((k, 12)) < 0.5)
        p /= np.where(p.sum(1, keepdims=True) > 0, p.sum(1, keepdims=True), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            plain = -np.where(p > 0, p * np.log2(p), 0.0).sum(1) + 0.0
        assert _entropy_bits(p).tobytes() == plain.tobytes()
        corr = p @ _PROFILES_T
        major, minor = _best_of_roots(corr, 2).T
        assert np.array_equal(np.maximum(major, minor), corr.max(1))


def test_overlap_by_group_matches_a_bar_by_bar_count() -> None:
    from midiva.features import _overlap_by_group

    rng = np.random.default_rng(5)
    n, resol, n_groups = 9, 7, 4
    start = rng.integers(0, n * resol, 300)
    end = np.minimum(start + rng.integers(1, 3 * resol, 300), n * resol)
    group = rng.integers(0, n_groups, 300)
    expected = np.zeros((n_groups, n))
    for g, s, e in zip(group, start, end, strict=True):
        for b in range(n):
            expected[g, b] += max(0, min(e, (b + 1) * resol) - max(s, b * resol))
    overlap = _overlap_by_group(group, start, end, n_groups, n, resol)
    assert np.ascontiguousarray(overlap).tobytes() == expected.tobytes()


def test_names_are_unique_documented_and_carry_units() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert set(FEATURE_DOCS) == set(FEATURE_NAMES)
    assert all(FEATURE_DOCS[name].strip() and "\n" not in FEATURE_DOCS[name] for name in FEATURE_NAMES)
    for name in ("tempo_bpm", "onset_density_per_beat", "onset_density_per_second", "duration_beats"):
        assert name in BASE_FEATURE_NAMES
    assert FEATURE_NAMES[: len(BASE_FEATURE_NAMES)] == BASE_FEATURE_NAMES
    assert len(FEATURE_NAMES) == 3 * len(BASE_FEATURE_NAMES)  # bar, ±2-bar window, song


def test_to_dicts_round_trips_values() -> None:
    _, feats = midi_to_features(make_midi([(0, 480, 60, 90), (1920, 480, 62, 70)]))
    rows = feats.to_dicts()
    assert len(rows) == feats.n_bars == 2
    assert list(rows[1]) == list(FEATURE_NAMES)
    assert rows[1]["velocity_mean"] == pytest.approx(70.0)
    assert isinstance(feats, BarFeatures) and feats.values.dtype == np.float32


# ---------------------------------------------------------------- known values


def test_four_quarter_notes_at_120_bpm() -> None:
    notes = [(i * 480, 480, 60, v) for i, v in enumerate((60, 80, 100, 120))]
    n, f = features_of(make_midi(notes, tempos=[(0, 120.0)]))
    assert n == 1
    expected = {
        "tempo_bpm": 120.0,
        "note_count": 4.0,
        "note_density_per_beat": 1.0,
        "onset_density_per_beat": 1.0,
        "note_density_per_second": 2.0,
        "onset_density_per_second": 2.0,
        "velocity_mean": 90.0,
        "velocity_std": math.sqrt(500.0),
        "pitch_mean": 60.0,
        "pitch_std": 0.0,
        "pitch_range": 0.0,
        "bass_pitch": 60.0,
        "top_pitch": 60.0,
        "polyphony": 1.0,
        "sounding_fraction": 1.0,
        "duration_beats": 1.0,
        "duration_seconds": 0.5,
        "articulation": 1.0,
        "sustain_pedal_fraction": 0.0,
    }
    for name, value in expected.items():
        assert f[name][0] == pytest.approx(value, abs=1e-4), name


def test_tempo_map_sets_tempo_and_seconds_but_not_beats() -> None:
    notes = [(i * 480, 240, 60, 100) for i in range(8)]
    _, f = features_of(make_midi(notes, tempos=[(0, 90.0)]))
    assert f["tempo_bpm"] == pytest.approx([90.0, 90.0], rel=1e-4)
    assert f["onset_density_per_beat"] == pytest.approx([1.0, 1.0])
    assert f["onset_density_per_second"] == pytest.approx([1.5, 1.5], rel=1e-4)
    assert f["duration_seconds"] == pytest.approx([0.5 * 60 / 90, 0.5 * 60 / 90], rel=1e-4)
    assert f["articulation"] == pytest.approx([0.5, 0.5])


def test_tempo_change_inside_a_bar_is_time_weighted() -> None:
    # 2 beats at 60 bpm (2 s) + 2 beats at 120 bpm (1 s): 4 beats in 3 s = 80 bpm.
    _, f = features_of(make_midi([(0, 1920, 60, 100)], tempos=[(0, 60.0), (960, 120.0)]))
    assert f["tempo_bpm"][0] == pytest.approx(80.0, rel=1e-4)
    assert f["duration_seconds"][0] == pytest.approx(3.0, rel=1e-4)


def test_file_without_tempo_events_is_120_bpm() -> None:
    data = make_midi([(0, 480, 60, 100)])
    assert len(load_midi(data).score.tempos) == 0
    _, f = features_of(data)
    assert f["tempo_bpm"][0] == pytest.approx(120.0)


def test_tick_resolution_does_not_change_features() -> None:
    def at(tpq: int) -> np.ndarray:
        scale = tpq / 480
        notes = [
            (int(t * scale), int(d * scale), p, 90)
            for t, d, p in [(0, 480, 60), (480, 240, 64), (960, 960, 67), (1920, 1920, 72)]
        ]
        return midi_to_features(make_midi(notes, tpq=tpq))[1].values

    np.testing.assert_allclose(at(384), at(480), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(at(960), at(480), rtol=1e-5, atol=1e-5)


def test_major_triad_is_major_and_minor_triad_is_minor() -> None:
    _, major = features_of(make_midi([(0, 1920, p, 100) for p in (60, 64, 67)]))
    _, minor = features_of(make_midi([(0, 1920, p, 100) for p in (57, 60, 64)]))
    assert major["mode"][0] > 0.05
    assert minor["mode"][0] < -0.2
    assert major["key_strength"][0] > 0.8 and minor["key_strength"][0] > 0.8
    # C-E-G: interval classes 4, 5, 3 -> Huron 0.386, 1.240, 0.594
    assert major["consonance"][0] == pytest.approx((0.386 + 1.240 + 0.594) / 3, abs=1e-5)
    assert major["chroma_entropy_bits"][0] == pytest.approx(math.log2(3), abs=1e-5)
    assert major["polyphony"][0] == pytest.approx(3.0)
    assert major["pitch_range"][0] == 7 and major["bass_pitch"][0] == 60 and major["top_pitch"][0] == 67
    # onsets of a chord share one slot
    assert major["note_density_per_beat"][0] == pytest.approx(0.75)
    assert major["onset_density_per_beat"][0] == pytest.approx(0.25)


def test_scale_in_c_major_beats_scale_in_c_minor() -> None:
    def mode_of(steps: Sequence[int]) -> float:
        notes = [(i * 240, 240, 60 + s, 90) for i, s in enumerate([*steps, 12])]
        return float(features_of(make_midi(notes))[1]["mode_song"][0])

    assert mode_of([0, 2, 4, 5, 7, 9, 11]) > mode_of([0, 2, 3, 5, 7, 8, 10])


def test_triad_templates_name_the_chord_quality() -> None:
    _, major = features_of(make_midi([(0, 1920, p, 100) for p in (60, 64, 67)]))  # C-E-G
    _, minor = features_of(make_midi([(0, 1920, p, 100) for p in (57, 60, 64)]))  # A-C-E
    _, dim = features_of(make_midi([(0, 1920, p, 100) for p in (59, 62, 65)]))  # B-D-F
    # Each triad fills its own template; the best other triads share two of its three notes.
    assert (major["triad_major"][0], major["triad_minor"][0], major["triad_diminished"][0]) == pytest.approx(
        (1, 2 / 3, 2 / 3)
    )
    assert (minor["triad_major"][0], minor["triad_minor"][0], minor["triad_diminished"][0]) == pytest.approx(
        (2 / 3, 1, 2 / 3)
    )
    assert (dim["triad_major"][0], dim["triad_minor"][0], dim["triad_diminished"][0]) == pytest.approx(
        (2 / 3, 2 / 3, 1)
    )
    # Weighted by sounding time: C for 3 beats, then E and G for 1 beat each -> chroma C 3/5, E 1/5, G 1/5.
    _, mixed = features_of(make_midi([(0, 1440, 60, 90), (1440, 480, 64, 90), (1440, 480, 67, 90)]))
    assert mixed["triad_major"][0] == pytest.approx(1.0)
    assert mixed["triad_minor"][0] == pytest.approx(4 / 5)  # A minor (C, E) or C minor (C, G)


def test_beat_chords_count_major_and_minor_beats() -> None:
    c_major = [(0, 960, p, 90) for p in (60, 64, 67)]  # beats 1-2 of bar 0
    a_minor = [(960, 960, p, 90) for p in (57, 60, 64)]  # beats 3-4
    g_major = [(1920, 1920, p, 90) for p in (55, 59, 62)]  # all of bar 1
    n, f = features_of(make_midi([*c_major, *a_minor, *g_major]))
    assert n == 2
    assert f["chord_major_fraction"].tolist() == pytest.approx([0.5, 1.0])
    assert f["chord_minor_fraction"].tolist() == pytest.approx([0.5, 0.0])
    # pooled over both bars by sounding beats: 6 major, 2 minor of 8
    assert f["chord_major_fraction_song"][0] == pytest.approx(6 / 8)
    assert f["chord_minor_fraction_win5"][0] == pytest.approx(2 / 8)
    # A single note or a dyad that two triads share (C-E: C major, A minor) is neither; silence is not counted.
    _, ambiguous = features_of(
        make_midi([(0, 480, 60, 90), (480, 480, 60, 90), (480, 480, 64, 90), (1440, 480, 67, 90)])
    )
    assert ambiguous["chord_major_fraction"][0] == 0 and ambiguous["chord_minor_fraction"][0] == 0
    # C major on beat 1, silent beats 2-3, C minor on beat 4: one of each among 2 sounding beats
    _, sparse = features_of(
        make_midi([*[(0, 480, p, 90) for p in (60, 64, 67)], *[(1440, 480, p, 90) for p in (60, 63, 67)]])
    )
    assert (sparse["chord_major_fraction"][0], sparse["chord_minor_fraction"][0]) == pytest.approx((0.5, 0.5))
    # In 3/4 a bar has three beats: D minor on beats 1-2, then bar 1's first beat belongs to bar 1.
    d_minor = [(0, 960, p, 90) for p in (62, 65, 69)]
    n, waltz = features_of(make_midi([*d_minor, *[(1440, 480, p, 90) for p in (62, 66, 69)]], time_signature=(3, 4)))
    assert n == 2
    assert waltz["chord_minor_fraction"].tolist() == pytest.approx([1.0, 0.0])
    assert waltz["chord_major_fraction"].tolist() == pytest.approx([0.0, 1.0])


def test_diatonicity_is_one_for_a_scale_and_seven_twelfths_for_all_pitch_classes() -> None:
    scale = [(i * 240, 240, 60 + s, 90) for i, s in enumerate((0, 2, 4, 5, 7, 9, 11, 12))]
    chromatic = [(i * 160, 160, 60 + i, 90) for i in range(12)]
    assert features_of(make_midi(scale))[1]["diatonicity"][0] == pytest.approx(1.0)
    assert features_of(make_midi(chromatic))[1]["diatonicity"][0] == pytest.approx(7 / 12)
    silent_bar = features_of(make_midi([(0, 480, 60, 90), (3840, 480, 62, 90)]))[1]
    assert silent_bar["diatonicity"][1] == 0 and silent_bar["triad_major"][1] == 0


def test_dissonant_cluster_is_less_consonant_than_fifths() -> None:
    _, cluster = features_of(make_midi([(0, 1920, p, 100) for p in (60, 61, 62)]))
    _, fifths = features_of(make_midi([(0, 1920, p, 100) for p in (48, 55, 62)]))
    assert cluster["consonance"][0] < 0 < fifths["consonance"][0]


def test_time_weighted_features_match_a_tick_by_tick_count() -> None:
    rng = np.random.default_rng(7)
    notes = [
        (int(rng.integers(0, 8 * 1920)), int(rng.integers(0, 3 * 1920)), int(rng.integers(36, 96)), 80)
        for _ in range(80)
    ]
    bars, feats = midi_to_features(make_midi(notes))
    resol, origin = bars.bar_resol, bars.leading_bars_dropped * bars.bar_resol
    span = bars.n_bars * resol
    sounding = np.zeros(span, np.int64)
    pitch_sum = np.zeros(span)
    lowest = np.full(span, 999)
    highest = np.full(span, -1)
    for time, duration, pitch, _ in notes:
        s, e = time - origin, max(time + duration, time + 1) - origin  # zero-length notes: one tick
        s, e = max(s, 0), min(e, span)
        sounding[s:e] += 1
        pitch_sum[s:e] += pitch
        lowest[s:e] = np.minimum(lowest[s:e], pitch)
        highest[s:e] = np.maximum(highest[s:e], pitch)
    per_bar = [slice(b * resol, (b + 1) * resol) for b in range(bars.n_bars)]
    on = [sounding[b] > 0 for b in per_bar]
    expected = {
        "sounding_fraction": [o.mean() for o in on],
        "polyphony": [sounding[b].sum() / max(o.sum(), 1) for b, o in zip(per_bar, on, strict=True)],
        "pitch_mean": [pitch_sum[b].sum() / max(sounding[b].sum(), 1) for b in per_bar],
        "bass_pitch": [lowest[b].min() if o.any() else 0 for b, o in zip(per_bar, on, strict=True)],
        "top_pitch": [highest[b].max() if o.any() else 0 for b, o in zip(per_bar, on, strict=True)],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(feats.column(name), values, rtol=1e-5, atol=1e-4, err_msg=name)


def test_sustained_pedal_fraction() -> None:
    _, f = features_of(make_midi([(0, 480, 60, 90), (1920, 480, 60, 90)], pedal=[(960, 2880)]))
    assert f["sustain_pedal_fraction"] == pytest.approx([0.5, 0.5])


# ---------------------------------------------------------------- empty bars, drums, edge cases


def test_empty_and_sustained_bars_have_defined_values() -> None:
    # bar 0: whole note held through bar 1; bar 2: nothing sounds; bar 3: one note
    notes = [(0, 3840, 67, 100), (3 * 1920, 480, 60, 50)]
    n, f = features_of(make_midi(notes))
    assert n == 4
    assert f["note_count"].tolist() == [1, 0, 0, 1]
    assert f["pitch_mean"].tolist() == [67, 67, 0, 60]  # held notes count where they sound
    assert f["sounding_fraction"].tolist() == [1, 1, 0, 0.25]
    assert f["velocity_mean"].tolist() == [100, 0, 0, 50]  # onsets only
    for name in (
        "velocity_std",
        "duration_beats",
        "articulation",
        "mode",
        "key_strength",
        "consonance",
        "chroma_entropy_bits",
        "polyphony",
        "bass_pitch",
        "onset_density_per_second",
    ):
        assert f[name][2] == 0.0, name
    assert f["duration_beats"][0] == pytest.approx(8.0)
    assert f["articulation"].tolist() == pytest.approx([2 / 3, 0, 0, 0])  # the last note has no next onset


def test_articulation_is_capped_for_notes_held_over_later_onsets() -> None:
    notes = [(0, 3840, 48, 100), *((i * 240, 120, 72, 80) for i in range(16))]
    _, f = features_of(make_midi(notes))
    # bar 0: the held note counts 4 (3840/240 capped), the 8 staccato notes 0.5 each
    assert f["articulation"][0] == pytest.approx((4.0 + 8 * 0.5) / 9)


def test_silent_bar_does_not_pull_context_pitch_to_zero() -> None:
    notes = [(0, 1920, 60, 100), (2 * 1920, 1920, 64, 100)]
    _, f = features_of(make_midi(notes))
    assert f["pitch_mean"][1] == 0.0
    assert f["pitch_mean_win5"][1] == pytest.approx(62.0)
    assert f["note_count_win5"][1] == pytest.approx(2 / 3)


def test_window_and_song_columns_pool_neighbouring_bars() -> None:
    notes = [(b * 1920 + i * 480, 480, 60, 100) for b in range(6) for i in range(b + 1 if b < 4 else 1)]
    n, f = features_of(make_midi(notes))
    counts = f["note_count"]
    assert n == 6 and counts.tolist() == [1, 2, 3, 4, 1, 1]
    for b in range(n):
        window = counts[max(0, b - 2) : b + 3]
        assert f["note_count_win5"][b] == pytest.approx(window.mean(), rel=1e-6)
    assert f["note_count_song"] == pytest.approx(np.full(n, counts.mean()), rel=1e-6)


def test_drums_count_in_density_but_not_in_pitch() -> None:
    piano = [(0, 1920, 60, 80)]
    drums = [(i * 240, 60, 36 + 6 * (i % 2), 120) for i in range(8)]
    _, with_drums = features_of(make_midi(piano, drums=drums))
    _, without = features_of(make_midi(piano))
    assert with_drums["note_count"][0] == 9 and without["note_count"][0] == 1
    assert with_drums["onset_density_per_beat"][0] == pytest.approx(2.0)
    for name in ("pitch_mean", "bass_pitch", "velocity_mean", "polyphony", "mode", "sounding_fraction"):
        assert with_drums[name][0] == pytest.approx(without[name][0]), name


def test_drums_only_file() -> None:
    drums = [(i * 480, 60, 36, 100) for i in range(4)]
    n, f = features_of(make_midi(drums=drums))
    assert n == 1
    assert f["note_count"][0] == 4 and f["onset_density_per_beat"][0] == pytest.approx(1.0)
    for name in ("pitch_mean", "velocity_mean", "sounding_fraction", "mode", "key_strength", "chroma_entropy_bits"):
        assert f[name][0] == 0.0, name


def test_zero_length_notes_are_counted_and_finite() -> None:
    notes = [(0, 0, 60, 90), (0, 0, 64, 90), (480, 480, 67, 90)]
    _, f = features_of(make_midi(notes))
    assert f["note_count"][0] == 3
    assert f["bass_pitch"][0] == 60 and f["top_pitch"][0] == 67


def test_onset_just_before_a_bar_line_belongs_to_the_next_bar_as_in_musetok() -> None:
    notes = [(0, 480, 60, 90), (1920 - 50, 480, 62, 90), (1920 - 70, 60, 64, 90), (3 * 1920, 480, 65, 90)]
    midi = load_midi(make_midi(notes))
    bars = score_to_bars(midi)
    feats = bar_features(midi, bars)
    musetok_notes = [sum(e.startswith("Note_Pitch") for e in bars.bar_events(b)) for b in range(bars.n_bars)]
    assert feats.column("note_count").tolist() == musetok_notes == [2, 1, 0, 1]


def test_leading_empty_bars_are_dropped_like_musetok() -> None:
    notes = [(2 * 1920 + 480, 480, 60, 90), (3 * 1920, 480, 64, 90)]
    midi = load_midi(make_midi(notes, tempos=[(0, 60.0), (2 * 1920, 120.0)]))
    bars = score_to_bars(midi)
    feats = bar_features(midi, bars)
    assert bars.leading_bars_dropped == 2 and feats.n_bars == bars.n_bars == 2
    assert feats.column("note_count").tolist() == [1, 1]
    assert feats.column("tempo_bpm") == pytest.approx([120.0, 120.0])  # the 60-bpm bars were dropped


def test_three_four_bars() -> None:
    notes = [(i * 480, 480, 60, 90) for i in range(6)]
    n, f = features_of(make_midi(notes, time_signature=(3, 4)))
    assert n == 2
    assert f["note_count"].tolist() == [3, 3]
    assert f["note_density_per_beat"] == pytest.approx([1.0, 1.0])


def test_features_of_another_files_bars_are_refused() -> None:
    a = load_midi(make_midi([(0, 480, 60, 90)]))
    b = load_midi(make_midi([(0, 480, 62, 90)]))
    with pytest.raises(DataError, match="do not belong"):
        bar_features(a, score_to_bars(b))


def test_unreadable_and_empty_inputs_raise_typed_errors() -> None:
    with pytest.raises(MidiReadError):
        midi_to_features(b"")
    with pytest.raises(MidiReadError):
        midi_to_features(make_midi([(0, 480, 60, 90)])[:20])
    with pytest.raises(EmptyScoreError):
        midi_to_features(make_midi([]))


# ---------------------------------------------------------------- real files


def _real_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.mid"))


def _musetok_notes_per_bar(bars: BarEvents) -> list[int]:
    return [sum(e.startswith("Note_Pitch") for e in bars.bar_events(b)) for b in range(bars.n_bars)]


def test_aligned_and_finite_on_gigamidi_sample(gigamidi_sample: Path) -> None:
    checked = 0
    for path in _real_files(gigamidi_sample):
        try:
            bars, feats = midi_to_features(path)
        except (MidiReadError, EmptyScoreError):
            assert path.name == "empty.mid"
            continue
        assert feats.values.shape == (bars.n_bars, len(FEATURE_NAMES)), path.name
        assert np.isfinite(feats.values).all(), path.name
        f = {name: feats.column(name) for name in ("tempo_bpm", "sounding_fraction", "pitch_mean", "note_count")}
        assert (f["tempo_bpm"] > 0).all(), path.name
        assert ((f["sounding_fraction"] >= 0) & (f["sounding_fraction"] <= 1 + 1e-6)).all(), path.name
        assert ((f["pitch_mean"] == 0) | ((f["pitch_mean"] >= 0) & (f["pitch_mean"] <= 127))).all(), path.name
        assert f["note_count"].sum() > 0, path.name
        if bars.report.dropped_out_of_range_pitches == 0:  # otherwise features count notes MuseTok lost
            assert f["note_count"].tolist() == _musetok_notes_per_bar(bars), path.name
        checked += 1
    assert checked >= 28


def _emopia_clips(emopia_dir: Path, emopia_split: Path, per_quadrant: int) -> dict[str, list[Path]]:
    with (emopia_split / "train.csv").open() as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["fname"])
    clips: dict[str, list[Path]] = {q: [] for q in ("Q1", "Q2", "Q3", "Q4")}
    for row in rows:
        if len(clips[row["label"]]) < per_quadrant:
            clips[row["label"]].append(emopia_dir / "midis" / f"{row['fname']}.mid")
    return clips


def test_every_note_is_in_musetoks_bar_on_emopia(emopia_dir: Path, emopia_split: Path) -> None:
    # performance timing puts many onsets near bar lines, where MuseTok's triplet rule decides the bar
    n_bars = 0
    for paths in _emopia_clips(emopia_dir, emopia_split, per_quadrant=10).values():
        for path in paths:
            bars, feats = midi_to_features(path)
            assert feats.n_bars == bars.n_bars and np.isfinite(feats.values).all()
            assert feats.column("note_count").tolist() == _musetok_notes_per_bar(bars), path.name
            n_bars += bars.n_bars
    assert n_bars > 500


def test_drums_left_out_of_events_still_count_and_bars_align() -> None:
    piano = [(0, 480, 60, 80), (2 * 1920, 480, 62, 80)]
    drums = [(i * 480, 60, 36, 100) for i in range(14)]
    data = make_midi(piano, drums=drums)
    bars, feats = midi_to_features(data, include_drums=False)
    assert bars.report.dropped_drum_notes == 14
    assert feats.n_bars == bars.n_bars == 3
    assert feats.column("note_count").tolist() == [5, 4, 5]
    assert _musetok_notes_per_bar(bars) == [1, 0, 1]


def test_emopia_quadrants_differ_as_expected(emopia_dir: Path, emopia_split: Path) -> None:
    """Arousal: Q1+Q2 denser and louder than Q3+Q4. Valence: Q1+Q4 more major than Q2+Q3."""
    names = ("onset_density_per_second", "note_density_per_beat", "velocity_mean", "tempo_bpm", "mode", "mode_song")
    clip_means: dict[str, list[list[float]]] = {q: [] for q in ("Q1", "Q2", "Q3", "Q4")}
    for quadrant, paths in _emopia_clips(emopia_dir, emopia_split, per_quadrant=25).items():
        for path in paths:
            _, feats = midi_to_features(path)
            clip_means[quadrant].append([float(feats.column(name).mean()) for name in names])

    def mean_of(*quadrants: str) -> dict[str, float]:
        rows = np.array([row for q in quadrants for row in clip_means[q]])
        return dict(zip(names, rows.mean(0).tolist(), strict=True))

    high, low = mean_of("Q1", "Q2"), mean_of("Q3", "Q4")
    assert high["onset_density_per_second"] > low["onset_density_per_second"]
    assert high["note_density_per_beat"] > low["note_density_per_beat"]
    assert high["velocity_mean"] > low["velocity_mean"]
    # EMOPIA's transcriptions carry no tempo map: every clip is at the 120-bpm default
    assert high["tempo_bpm"] == pytest.approx(120.0) and low["tempo_bpm"] == pytest.approx(120.0)
    positive, negative = mean_of("Q1", "Q4"), mean_of("Q2", "Q3")
    assert positive["mode"] > negative["mode"]
    assert positive["mode_song"] > 0 > negative["mode_song"]


# ---------------------------------------------------------------- CLI


def test_cli_writes_csv_and_skips_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.mid"
    good.write_bytes(make_midi([(0, 480, 60, 90), (2 * 1920, 480, 64, 90)]))
    lead = tmp_path / "lead.mid"
    lead.write_bytes(make_midi([(1920, 480, 60, 90)]))
    broken = tmp_path / "broken.mid"
    broken.write_bytes(b"MThd\x00\x00")
    out = tmp_path / "f.csv"
    assert main(["features", str(good), str(broken), str(lead), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 files done, 1 failed" in err and "MidiReadError (1)" in err
    with out.open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["file", "md5", "bar_number", *FEATURE_NAMES]
    body = rows[1:]
    assert [(Path(r[0]).name, r[2]) for r in body] == [
        ("good.mid", "0"),
        ("good.mid", "1"),
        ("good.mid", "2"),
        ("lead.mid", "0"),
    ]
    assert all(len(r) == 3 + len(FEATURE_NAMES) for r in body)
    assert float(body[2][3 + FEATURE_NAMES.index("top_pitch")]) == 64


def test_cli_writes_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.mid"
    path.write_bytes(make_midi([(i * 480, 480, 60, 90) for i in range(4)]))
    assert main(["features", str(path), "-q"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert len(rows) == 1 and float(rows[0]["onset_density_per_beat"]) == 1.0
    assert captured.err == ""


def test_cli_no_drums_bars_follow_the_pitched_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "intro.mid"
    path.write_bytes(make_midi([(2 * 1920, 480, 60, 90)], drums=[(i * 480, 60, 36, 100) for i in range(10)]))
    counts = {}
    for flag in ("--drums", "--no-drums"):
        assert main(["features", str(path), flag, "-q"]) == 0
        rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
        counts[flag] = [float(r["note_count"]) for r in rows]
    assert counts["--drums"] == [4, 4, 3]  # drum intro: MuseTok's bar 0 is the first drum hit
    assert counts["--no-drums"] == [3]  # bar 0 is the piano's bar; drums still count there


def test_cli_unwritable_output_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "a.mid"
    path.write_bytes(make_midi([(0, 480, 60, 90)]))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["features", str(path), "--out", str(blocker / "dir" / "f.csv")]) == 1
    assert main(["features", str(path), "--out", str(tmp_path / "new" / "dir" / "f.csv")]) == 0  # parents are created


def test_cli_strict_stops_at_first_failure(tmp_path: Path) -> None:
    broken = tmp_path / "broken.mid"
    broken.write_bytes(b"")
    assert main(["features", str(broken), "--strict", "--out", str(tmp_path / "f.csv")]) == 1


# ---------------------------------------------------------------- harmony from onsets


def test_onset_harmony_counts_each_note_once_where_it_starts() -> None:
    # bar 0: C-E-G struck together, the G held for 4 bars; bar 1: an A minor triad struck briefly;
    # bar 2: nothing starts (the held G alone sounds)
    held_g = (0, 4 * 1920, 55, 90)
    notes = [held_g, (0, 240, 60, 90), (0, 240, 64, 90), (1920, 240, 57, 90), (1920, 240, 60, 90), (1920, 240, 64, 90)]
    notes.append((3 * 1920, 240, 67, 90))  # bar 3, so that bar 2 exists
    _, f = features_of(make_midi(notes))
    assert f["onsets_triad_major"][0] == pytest.approx(1.0)  # C, E, G once each
    assert f["onsets_triad_minor"][1] == pytest.approx(1.0)  # only what starts in bar 1: A, C, E
    # by sounding time the held G outweighs bar 1's short notes, so the minor triad does not fill the bar
    assert f["triad_minor"][1] < 0.99
    # a bar without onsets takes what still sounds: the G
    assert f["onsets_chroma_entropy_bits"][2] == 0.0 and f["onsets_key_strength"][2] != 0.0


def test_onset_harmony_ignores_written_note_lengths(emopia_dir: Path) -> None:
    """A transcription's sounding lengths and notated lengths (each note ends at its voice's next onset) give
    the same onset harmony in every bar where something starts; the sounding-time harmony does not."""
    from midiva.authoring import notated_durations, rewrite_bytes, seeded_rng

    data = (emopia_dir / "midis" / "Q1_0vLPYiPN7qY_0.mid").read_bytes()
    _, before = features_of(data)
    _, after = features_of(rewrite_bytes(data, notated_durations(), seeded_rng("test")))
    struck = before["pitched_onset_density_per_second"] > 0
    assert struck.sum() >= 5
    for name in ("mode", "triad_major", "consonance", "diatonicity"):
        np.testing.assert_array_equal(after[f"onsets_{name}"][struck], before[f"onsets_{name}"][struck])
    assert not np.array_equal(after["mode"], before["mode"])
