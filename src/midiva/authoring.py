"""Authoring rewrites: the same music written down another way (Score in, Score out).

Input: a symusic `ScoreTick` (a file's own ticks, as `midiva.midi.load_midi` returns it).
Output: a new `ScoreTick` whose notes say the same music under another authoring convention —
flat or compressed velocities, a quantized grid, another symbolic tempo map with the same timing
in seconds, the notes spread over melody/bass/accompaniment tracks (with octave doublings), an
added drum track, a band backing of the music's own harmony, no sustain pedal, notated instead of
sounding note lengths, a transposition.
Nothing here changes which notes sound when (in seconds) except quantization and transposition,
which change them by at most a 16th note or a few semitones, and notated lengths, which end a
note where its voice's next note begins.

Two users: the authoring-robustness suite (`midiva.robustness`, `benchmarks/authoring.py`)
rewrites EMOPIA clips and asks whether a model's predictions move; training
(`preprocess-emopia --augment N`) adds rewritten copies of the training clips with unchanged
labels, so the model learns that these conventions carry no emotion.

Units: ticks of the score being rewritten; velocities 1..127; pitches 0..127 (pitched notes are
kept inside 21..108 by the track rewrites, which only ever add doublings there).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from symusic.core import ScoreTick, TempoTick, TrackTick

from midiva.errors import DataError

SUSTAIN_PEDAL_CC = 64
PIANO_RANGE = (21, 108)  # pitches MuseTok keeps; doublings are never written outside it
MELODY_PROGRAM, BASS_PROGRAM, ACCOMPANIMENT_PROGRAM = 73, 33, 48  # flute, finger bass, string ensemble
MELODY_DOUBLING_PROGRAM, BASS_DOUBLING_PROGRAM = 40, 43  # violin an octave up, contrabass an octave down
BACKING_GUITAR_PROGRAM, BACKING_PAD_PROGRAM = 29, 89  # overdriven guitar, warm pad
BACKING_GUITAR_ROOTS = 40  # E2: the guitar's root lies in E2..D#3
BACKING_PAD_LOW = 55  # G3: the pad voices every pitch class in G3..F#4
BACKING_PROBABILITY = 0.35  # of training rewrites, with preprocess-emopia --augment-backing
SEQUENCED_PROBABILITY = 0.3  # of training rewrites, with preprocess-emopia --augment-sequenced
DRUM_PATTERN_BEATS = 8  # patterns are two 4/4 bars
MIN_PATTERN_NOTES = 8
MEDLEY_BEAT_RESOLUTION = 480  # clips are resampled to one resolution before they are joined

Rewrite = Callable[[ScoreTick, np.random.Generator], ScoreTick]


@dataclass(frozen=True)
class DrumPattern:
    """A drum loop taken from a real file: onsets in beats from the loop's start.

    Attributes:
        source: the file it came from.
        onset_beats, duration_beats: float arrays (n,); pitch, velocity: int arrays (n,).
        length_beats: the loop's length (it repeats after this many quarter notes).
    """

    source: str
    onset_beats: npt.NDArray[np.float64]
    duration_beats: npt.NDArray[np.float64]
    pitch: npt.NDArray[np.int64]
    velocity: npt.NDArray[np.int64]
    length_beats: float = DRUM_PATTERN_BEATS


def _notes(track: Any) -> dict[str, npt.NDArray[np.int64]]:
    return {k: v.astype(np.int64) for k, v in track.notes.numpy().items()}


def _set_notes(track: Any, time: Any, duration: Any, pitch: Any, velocity: Any) -> None:
    order = np.lexsort((np.asarray(pitch), np.asarray(time)))
    cols = [np.ascontiguousarray(np.asarray(a)[order], dtype=np.int32) for a in (time, duration, pitch, velocity)]
    track.notes = type(track.notes).from_numpy(*cols)


def _pitched(score: ScoreTick) -> list[Any]:
    return [t for t in score.tracks if not t.is_drum and t.note_num()]


@dataclass(frozen=True)
class LabelledClip:
    """An EMOPIA clip: its name, song, quadrant ('Q1'..'Q4') and MIDI bytes."""

    name: str
    song: str
    quadrant: str
    data: bytes


def constant_velocity(level: int) -> Rewrite:
    """Every note at one velocity (a sequencer's default), drums included."""
    if not 1 <= level <= 127:
        raise DataError(f"velocity level must be in 1..127, got {level}")

    def rewrite(score: ScoreTick, rng: np.random.Generator) -> ScoreTick:
        out = score.copy()
        for track in out.tracks:
            if track.note_num():
                n = _notes(track)
                _set_notes(track, n["time"], n["duration"], n["pitch"], np.full_like(n["velocity"], level))
        return out

    return rewrite


def compressed_velocity(low: int = 72, high: int = 88) -> Rewrite:
    """Velocities mapped linearly from the file's own range into [low, high] (a compressor's view)."""
    if not 1 <= low <= high <= 127:
        raise DataError(f"need 1 <= low <= high <= 127, got {low}, {high}")

    def rewrite(score: ScoreTick, rng: np.random.Generator) -> ScoreTick:
        out = score.copy()
        tracks = [t for t in out.tracks if t.note_num()]
        if not tracks:
            return out
        all_v = np.concatenate([_notes(t)["velocity"] for t in tracks])
        v_min, v_max = int(all_v.min()), int(all_v.max())
        for track in tracks:
            n = _notes(track)
            if v_max > v_min:
                v = low + (n["velocity"] - v_min) * (high - low) / (v_max - v_min)
            else:
                v = np.full(n["velocity"].shape, (low + high) / 2)
            _set_notes(track, n["time"], n["duration"], n["pitch"], np.rint(v).astype(np.int64))
        return out

    return rewrite


def quantized(divisions_per_quarter: int = 4) -> Rewrite:
    """Onsets and durations snapped to a grid (4: 16th notes); no note becomes shorter than one step."""
    if divisions_per_quarter < 1:
        raise DataError(f"divisions_per_quarter must be >= 1, got {divisions_per_quarter}")

    def rewrite(score: ScoreTick, rng: np.random.Generator) -> ScoreTick:
        out = score.copy()
        step = max(1, int(out.ticks_per_quarter) // divisions_per_quarter)
        for track in out.tracks:
            if track.note_num():
                n = _notes(track)
                time = np.rint(n["time"] / step).astype(np.int64) * step
                duration = np.maximum(np.rint(n["duration"] / step).astype(np.int64), 1) * step
                _set_notes(track, time, duration, n["pitch"], n["velocity"])
        return out

    return rewrite


def retimed(tempo_bpm: float, ticks_per_quarter: int) -> Rewrite:
    """The file rewritten at one tempo and another resolution; every event keeps its time in seconds.

    The symbolic grid (beats, bars) changes, what sounds when does not: this is how the same
    performance reads when a sequencer's tempo differs from the transcription's 120 bpm.
    """
    if not 10 <= tempo_bpm <= 400 or not 24 <= ticks_per_quarter <= 9600:
        raise DataError(f"need 10..400 bpm and 24..9600 ticks per quarter, got {tempo_bpm}, {ticks_per_quarter}")

    def rewrite(score: ScoreTick, rng: np.random.Generator) -> ScoreTick:
        end = max(int(score.end()), 1)
        anchors = np.unique(np.concatenate([[0], score.tempos.numpy()["time"].astype(np.int64), [end]]))
        anchors = anchors[(anchors >= 0) & (anchors <= end)]
        from midiva.features import seconds_at

        seconds = seconds_at(score, anchors.astype(np.float64))
        old_tpq = int(score.ticks_per_quarter)
        new_at_old_tpq = np.rint(seconds * tempo_bpm / 60.0 * old_tpq).astype(np.int64)
        out = score.adjust_time(anchors.tolist(), new_at_old_tpq.tolist())
        out.tempos = type(out.tempos)([TempoTick(0, float(tempo_bpm))])
        return out.resample(int(ticks_per_quarter), min_dur=1)

    return rewrite


def _voices(time: npt.NDArray[np.int64], pitch: npt.NDArray[np.int64], tolerance: int) -> npt.NDArray[np.int64]:
    """0 melody (highest of its onset group, at or above C4), 1 bass (lowest, below G3), 2 accompaniment."""
    order = np.lexsort((pitch, time))
    t, p = time[order], pitch[order]
    group = np.concatenate([[0], np.cumsum(np.diff(t) > tolerance)])
    last = np.append(np.flatnonzero(np.diff(group)), len(group) - 1)
    first = np.concatenate([[0], last[:-1] + 1])
    voice_sorted = np.full(len(t), 2, np.int64)
    top, bottom = last[p[last] >= 60], first[p[first] < 55]
    voice_sorted[bottom] = 1
    voice_sorted[top] = 0
    voice = np.empty_like(voice_sorted)
    voice[order] = voice_sorted
    return voice


def _pitched_voices(
    score: ScoreTick,
) -> tuple[list[Any], list[dict[str, npt.NDArray[np.int64]]], dict[str, npt.NDArray[np.int64]], npt.NDArray[np.int64]]:
    """The pitched tracks with notes, their notes, all of them concatenated in that order, and each one's voice."""
    pitched = _pitched(score)
    parts = [_notes(t) for t in pitched]
    if not parts:
        return pitched, parts, {}, np.zeros(0, np.int64)
    n = {k: np.concatenate([p[k] for p in parts]) for k in ("time", "duration", "pitch", "velocity")}
    return pitched, parts, n, _voices(n["time"], n["pitch"], max(1, int(score.ticks_per_quarter) // 12))


def spread_tracks(doublings: bool = False) -> Rewrite:
    """The pitched notes split over melody, bass and accompaniment tracks (as an arrangement would).

    With `doublings`, the melody is doubled an octave up (violin) and the bass an octave down
    (contrabass) on two more tracks, wherever the doubling stays inside 21..108. The sustain pedal
    stays with the accompaniment; drum tracks are kept as they are.
    """

    def rewrite(score: ScoreTick, rng: np.random.Generator) -> ScoreTick:
        out = score.copy()
        pitched, _, n, voice = _pitched_voices(out)
        if not pitched:
            return out
        controls = [c for t in pitched for c in t.controls]
        kept = [t for t in out.tracks if not (not t.is_drum and t.note_num())]
        new_tracks = []
        specs = [
            (0, "melody", MELODY_PROGRAM, 0),
            (1, "bass", BASS_PROGRAM, 0),
            (2, "accompaniment", ACCOMPANIMENT_PROGRAM, 0),
        ]
        if doublings:
            specs += [(0, "melody octave", MELODY_DOUBLING_PROGRAM, 12), (1, "bass octave", BASS_DOUBLING_PROGRAM, -12)]
        for v, name, program, shift in specs:
            sel = voice == v
            pitch = n["pitch"][sel] + shift
            sel_ok = (pitch >= PIANO_RANGE[0]) & (pitch <= PIANO_RANGE[1]) if shift else np.ones(pitch.shape, bool)
            if not sel_ok.any():
                continue
            track = TrackTick(name, program, False)
            _set_notes(
                track, n["time"][sel][sel_ok], n["duration"][sel][sel_ok], pitch[sel_ok], n["velocity"][sel][sel_ok]
            )
            if v == 2 and not shift:
                track.controls = type(track.controls)(controls)
            new_tracks.append(track)
        out.tracks = type(out.tracks)([*new_tracks, *kept])
        return out

    return rewrite


def notated_durations() -> Rewrite:
    """Each pitched note ends no later than the next onset of its own voice (melody, bass or accompaniment).

    Transcribed performances such as EMOPIA's write the sounding length of a note, which overlaps the
    notes after it; sequenced and engraved MIDI writes the notated length, legato at most. The
    onsets, pitches and velocities stay; a note at its voice's last onset keeps its length.
    """

    def rewrite(score: ScoreTick, rng: np.random.Generator) -> ScoreTick:
        out = score.copy()
        pitched, parts, n, voice = _pitched_voices(out)
        if not pitched:
            return out
        time = n["time"]
        limit = np.full(time.shape, np.iinfo(np.int64).max, np.int64)
        for v in range(3):
            sel = np.flatnonzero(voice == v)
            onsets = np.unique(time[sel])
            nxt = np.searchsorted(onsets, time[sel], side="right")
            has_next = nxt < onsets.size
            limit[sel[has_next]] = onsets[nxt[has_next]] - time[sel[has_next]]
        start = 0
        for track, part in zip(pitched, parts, strict=True):
            end = start + part["time"].size
            duration = np.maximum(np.minimum(part["duration"], limit[start:end]), 1)
            _set_notes(track, part["time"], duration, part["pitch"], part["velocity"])
            start = end
        return out

    return rewrite


def _beat_harmony(
    score: ScoreTick,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64], npt.NDArray[np.bool_], int] | None:
    """Per quarter-note beat of the file: which pitch classes sound (a pitched note starts in the beat or
    sounds at its start), the lowest such pitch (-1: none), whether a pitched note starts on the beat
    (within a 12th of a beat: MuseTok's grid), and the median velocity of the pitched notes.
    None when the file has no pitched notes."""
    parts = [_notes(t) for t in _pitched(score)]
    if not parts:
        return None
    tpq = max(1, int(score.ticks_per_quarter))
    time = np.concatenate([p["time"] for p in parts])
    end = time + np.maximum(np.concatenate([p["duration"] for p in parts]), 1)
    pitch = np.concatenate([p["pitch"] for p in parts])
    first = time // tpq
    last = np.maximum((end - 1) // tpq, first)  # the beat holding the note's last tick
    # a note counts in its onset beat and in every later beat whose start it still sounds at
    span = last - first + 1
    beat = np.repeat(first, span) + (np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span))
    note = np.repeat(np.arange(pitch.size), span)
    n_beats = int(last.max()) + 1
    present = np.zeros((n_beats, 12), bool)
    present[beat, pitch[note] % 12] = True
    lowest = np.full(n_beats, 128, np.int64)
    np.minimum.at(lowest, beat, pitch[note])
    lowest[lowest == 128] = -1
    on_beat = np.zeros(n_beats, bool)
    near = (time + tpq // 24) // tpq  # the beat whose start the onset is nearest to, when within tpq / 24
    on_beat[near[np.abs(time - near * tpq) <= tpq // 24]] = True
    velocity = np.concatenate([p["velocity"] for p in parts])
    return present, lowest, on_beat, int(np.median(velocity))


def band_backing() -> Rewrite:
    """A band's backing added to the music: a pad and a rhythm guitar that play its own harmony.

    Per quarter-note beat, the pad holds every pitch class that sounds in the beat (voiced in
    G3..F#4, one note per pitch class held while it keeps sounding) and, on every beat where the music
    itself has an onset, the guitar strikes the beat's lowest pitch class as a power chord in E2..D#4:
    root and octave, with the fifth only where the fifth already sounds. Every added note has a pitch
    class that sounds in its beat already and no onset falls where the music has none, so the harmony,
    its changes and the rhythm stay the same; what changes is what band arrangements change: more
    parts, block chords on the beat, more onsets of the same few pitch classes. Added notes take the
    median velocity of the file's pitched notes; the original tracks are kept as they are.
    """

    def rewrite(score: ScoreTick, rng: np.random.Generator) -> ScoreTick:
        out = score.copy()
        harmony = _beat_harmony(out)
        if harmony is None:
            return out
        present, lowest, on_beat, velocity = harmony
        tpq = max(1, int(out.ticks_per_quarter))
        # pad: a run of consecutive beats in which a pitch class sounds is one held note
        padded = np.zeros((present.shape[0] + 2, 12), bool)
        padded[1:-1] = present
        edges = np.diff(padded.astype(np.int8), axis=0).T  # (12, beats + 1): +1 a run starts, -1 it has ended
        classes, starts = np.nonzero(edges == 1)  # by pitch class, then beat: the runs pair up in order
        stops = np.nonzero(edges == -1)[1]
        pad = TrackTick("backing pad", BACKING_PAD_PROGRAM, False)
        pad_pitch = BACKING_PAD_LOW + (classes - BACKING_PAD_LOW) % 12
        _set_notes(pad, starts * tpq, (stops - starts) * tpq, pad_pitch, np.full(classes.size, velocity))
        # guitar: a power chord on the lowest pitch class of every beat on which the music has an onset
        beats = np.flatnonzero((lowest >= 0) & on_beat)
        root = BACKING_GUITAR_ROOTS + (lowest[beats] - BACKING_GUITAR_ROOTS) % 12
        has_fifth = present[beats, (lowest[beats] + 7) % 12]
        time = np.concatenate([beats, beats, beats[has_fifth]]) * tpq
        pitch = np.concatenate([root, root + 12, root[has_fifth] + 7])
        guitar = TrackTick("backing guitar", BACKING_GUITAR_PROGRAM, False)
        _set_notes(guitar, time, np.full(time.size, max(1, tpq // 2)), pitch, np.full(time.size, velocity))
        out.tracks.append(pad)
        out.tracks.append(guitar)
        return out

    return rewrite


def without_pedal() -> Rewrite:
    """Sustain-pedal (CC64) events removed: sequenced MIDI rarely has them."""

    def rewrite(score: ScoreTick, rng: np.random.Generator) -> ScoreTick:
        out = score.copy()
        for track in out.tracks:
            if len(track.controls):
                track.controls = type(track.controls)([c for c in track.controls if c.number != SUSTAIN_PEDAL_CC])
        return out

    return rewrite


def transposed(semitones: int) -> Rewrite:
    """Pitched notes moved by `semitones` (drums untouched); notes pushed outside 0..127 are dropped."""

    def rewrite(score: ScoreTick, rng: np.random.Generator) -> ScoreTick:
        out = score.copy()
        for track in out.tracks:
            if track.is_drum or not track.note_num():
                continue
            n = _notes(track)
            pitch = n["pitch"] + semitones
            ok = (pitch >= 0) & (pitch <= 127)
            _set_notes(track, n["time"][ok], n["duration"][ok], pitch[ok], n["velocity"][ok])
        return out

    return rewrite


def without_drums() -> Rewrite:
    """Drum tracks removed."""

    def rewrite(score: ScoreTick, rng: np.random.Generator) -> ScoreTick:
        out = score.copy()
        out.tracks = type(out.tracks)([t for t in out.tracks if not t.is_drum])
        return out

    return rewrite


def with_drums(patterns: Sequence[DrumPattern]) -> Rewrite:
    """A drum track looping one of `patterns` (chosen by the rng) from tick 0 to the last note."""
    if not patterns:
        raise DataError("with_drums needs at least one drum pattern; see load_drum_patterns")

    def rewrite(score: ScoreTick, rng: np.random.Generator) -> ScoreTick:
        out = score.copy()
        pattern = patterns[int(rng.integers(len(patterns)))]
        tpq = int(out.ticks_per_quarter)
        end = int(out.end())
        loop_ticks = max(1, round(pattern.length_beats * tpq))
        repeats = max(1, -(-end // loop_ticks))
        offsets = np.repeat(np.arange(repeats, dtype=np.int64) * loop_ticks, len(pattern.pitch))
        time = np.tile(np.rint(pattern.onset_beats * tpq).astype(np.int64), repeats) + offsets
        duration = np.maximum(np.tile(np.rint(pattern.duration_beats * tpq).astype(np.int64), repeats), 1)
        keep = time < end
        track = TrackTick("drums", 0, True)
        _set_notes(
            track,
            time[keep],
            duration[keep],
            np.tile(pattern.pitch, repeats)[keep],
            np.tile(pattern.velocity, repeats)[keep],
        )
        out.tracks.append(track)
        return out

    return rewrite


def compose(*rewrites: Rewrite) -> Rewrite:
    """Apply rewrites left to right, sharing one rng."""

    def rewrite(score: ScoreTick, rng: np.random.Generator) -> ScoreTick:
        for r in rewrites:
            score = r(score, rng)
        return score

    return rewrite


def load_drum_patterns(paths: Iterable[Path | str], *, per_file: int = 2) -> list[DrumPattern]:
    """Two-bar drum loops from the drum tracks of real MIDI files (e.g. the GigaMIDI sample).

    From each file with drums, up to `per_file` loops are cut at the first bars holding at least
    `MIN_PATTERN_NOTES` drum onsets (beats counted at the file's own resolution).
    """
    from midiva.midi import load_midi

    patterns: list[DrumPattern] = []
    for path in sorted(Path(p) for p in paths):
        try:
            score = load_midi(path).score
        except Exception:  # an unreadable file simply offers no pattern
            continue
        drums = [_notes(t) for t in score.tracks if t.is_drum and t.note_num()]
        if not drums:
            continue
        n = {k: np.concatenate([d[k] for d in drums]) for k in ("time", "duration", "pitch", "velocity")}
        tpq = float(score.ticks_per_quarter)
        beats = n["time"] / tpq
        loop = np.floor(beats / DRUM_PATTERN_BEATS).astype(np.int64)
        counts = np.bincount(loop)
        for index in np.flatnonzero(counts >= MIN_PATTERN_NOTES)[:per_file]:
            sel = loop == index
            patterns.append(
                DrumPattern(
                    source=path.name,
                    onset_beats=beats[sel] - index * DRUM_PATTERN_BEATS,
                    duration_beats=np.minimum(n["duration"][sel] / tpq, 1.0),
                    pitch=n["pitch"][sel],
                    velocity=np.clip(n["velocity"][sel], 1, 127),
                )
            )
    return patterns


def evaluation_variants(drum_patterns: Sequence[DrumPattern] = ()) -> dict[str, Rewrite]:
    """The robustness suite's variants, by name (with drums only when patterns are given)."""
    variants: dict[str, Rewrite] = {
        **{f"velocity_{v}": constant_velocity(v) for v in (40, 64, 100, 127)},
        "velocity_compressed": compressed_velocity(72, 88),
        "quantized_16th": quantized(4),
        "retimed_90bpm_96tpq": retimed(90.0, 96),
        "retimed_150bpm_960tpq": retimed(150.0, 960),
        "tracks_split": spread_tracks(doublings=False),
        "tracks_octave_doublings": spread_tracks(doublings=True),
        "no_pedal": without_pedal(),
        "notated_durations": notated_durations(),
        "transposed_+2": transposed(2),
        "transposed_-3": transposed(-3),
        "backing_added": band_backing(),
    }
    if drum_patterns:
        variants["drums_added"] = with_drums(drum_patterns)
        variants["band_backing"] = compose(band_backing(), with_drums(drum_patterns))
        variants["sequenced_band"] = compose(
            quantized(4),
            notated_durations(),
            constant_velocity(100),
            without_pedal(),
            spread_tracks(doublings=True),
            with_drums(drum_patterns),
        )
    return variants


def _flat_velocity(rng: np.random.Generator) -> tuple[str, Rewrite]:
    """Every velocity at one drawn level in 45..120."""
    level = int(rng.integers(45, 121))
    return f"vel{level}", constant_velocity(level)


def _velocity_band(rng: np.random.Generator) -> tuple[str, Rewrite]:
    """Velocities compressed into a drawn band 4..20 wide, centred in 60..100."""
    centre, width = int(rng.integers(60, 101)), int(rng.integers(4, 21))
    return f"velband{centre}", compressed_velocity(centre - width // 2, centre + width // 2)


def _velocity_step(rng: np.random.Generator) -> tuple[str, Rewrite] | None:
    """Flat velocities (45%), a compressed band (20%) or none."""
    choice = rng.random()
    if choice < 0.45:
        return _flat_velocity(rng)
    if choice < 0.65:
        return _velocity_band(rng)
    return None


def _track_step(rng: np.random.Generator) -> tuple[str, Rewrite] | None:
    """The notes over melody/bass/accompaniment tracks (30%), with octave doublings (30%) or none."""
    choice = rng.random()
    if choice < 0.3:
        return "split", spread_tracks(doublings=False)
    if choice < 0.6:
        return "doubled", spread_tracks(doublings=True)
    return None


def _sequenced_steps(
    rng: np.random.Generator, drum_patterns: Sequence[DrumPattern], kept: Sequence[tuple[str, Rewrite]]
) -> list[tuple[str, Rewrite]]:
    """A sequenced file's authoring, all at once (the suite's `sequenced_band`, parameters drawn).

    Quantized (2, 4 or 8 steps per quarter), notated lengths, flat velocities in 45..120 (75%) or a
    compressed band, no pedal, the notes spread over tracks with or without octave doublings, drums
    when patterns are given; `kept` (steps drawn before: a transposition, a band backing) go with it.
    """
    divisions = int(rng.choice([2, 4, 8]))
    steps: list[tuple[str, Rewrite]] = [
        (f"quant{divisions}", quantized(divisions)),
        ("notated", notated_durations()),
    ]
    steps.append(_flat_velocity(rng) if rng.random() < 0.75 else _velocity_band(rng))
    steps.append(("nopedal", without_pedal()))
    if rng.random() < 0.5:
        steps.append(("split", spread_tracks(doublings=False)))
    else:
        steps.append(("doubled", spread_tracks(doublings=True)))
    steps.extend(step for step in kept if step[0].startswith("tr"))
    if drum_patterns:
        steps.append(("drums", with_drums(drum_patterns)))
    steps.extend(step for step in kept if step[0] == "backing")
    return steps


def random_augmentation(
    rng: np.random.Generator,
    drum_patterns: Sequence[DrumPattern] = (),
    *,
    backing: bool = False,
    sequenced: bool = False,
) -> tuple[str, Rewrite]:
    """One random authoring rewrite for training (parameters drawn apart from the suite's), and its name.

    The draws come in a fixed order; a new rewrite is drawn after all others, so that the rewrites
    drawn before it stay those of earlier versions for the same generator. With `backing`, a band
    backing (`band_backing`) is added last, to BACKING_PROBABILITY of the rewrites. With `sequenced`,
    SEQUENCED_PROBABILITY of the rewrites are instead a sequenced file's whole authoring at once
    (`_sequenced_steps`, named 'seq+...'), keeping the transposition and band backing drawn before.
    """
    steps: list[tuple[str, Rewrite] | None] = [_velocity_step(rng)]
    if rng.random() < 0.35:
        steps.append(("quant", quantized(int(rng.choice([2, 4, 8])))))
    if rng.random() < 0.35:
        bpm, tpq = float(rng.integers(70, 171)), int(rng.choice([120, 192, 384, 480]))
        steps.append((f"tempo{bpm:g}", retimed(bpm, tpq)))
    steps.append(_track_step(rng))
    if rng.random() < 0.4:
        steps.append(("nopedal", without_pedal()))
    if rng.random() < 0.5:
        shift = int(rng.choice([-4, -2, -1, 1, 3, 5]))
        steps.append((f"tr{shift:+d}", transposed(shift)))
    if drum_patterns and rng.random() < 0.3:
        steps.append(("drums", with_drums(drum_patterns)))
    if rng.random() < 0.4:
        steps.append(("notated", notated_durations()))
    if backing and rng.random() < BACKING_PROBABILITY:
        steps.append(("backing", band_backing()))
    chosen = [step for step in steps if step is not None]
    if sequenced and rng.random() < SEQUENCED_PROBABILITY:
        combo = _sequenced_steps(rng, drum_patterns, chosen)
        return "+".join(["seq", *(name for name, _ in combo)]), compose(*(rewrite for _, rewrite in combo))
    return "+".join(name for name, _ in chosen) or "identity", compose(*(rewrite for _, rewrite in chosen))


def seeded_rng(*parts: object) -> np.random.Generator:
    """A generator seeded from a stable hash of `parts` (the same on every machine and run)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def rewrite_bytes(data: bytes, rewrite: Rewrite, rng: np.random.Generator) -> bytes:
    """Parse MIDI bytes, rewrite them, and write the result back as MIDI bytes.

    Raises:
        MidiReadError: `data` is not readable MIDI. DataError: the rewrite left no notes.
    """
    from midiva.midi import load_midi

    score = rewrite(load_midi(data).score, rng)
    if not score.note_num():
        raise DataError("the rewrite left no notes")
    return bytes(score.dumps_midi())


@dataclass(frozen=True)
class Medley:
    """Clips joined at bar lines: MIDI bytes and the quadrant ('Q1'..'Q4') of every MuseTok bar."""

    name: str
    data: bytes
    bar_quadrants: tuple[str, ...]
    boundaries: tuple[int, ...]  # first bar of every segment after the first
    clips: tuple[str, ...] = ()  # names of the joined clips, in order


def build_medleys(
    clips: Sequence[LabelledClip], n_medleys: int, *, seed: int = 0, segments: tuple[int, int] = (2, 4)
) -> list[Medley]:
    """Seeded medleys: 2..4 clips of different songs, each of another quadrant than the one before.

    Each clip keeps its own MuseTok bars (from the bar of its first note to its last), resampled to
    480 ticks per quarter and cut at its last bar line, so segment k starts on a bar line of the medley.

    Raises:
        DataError: fewer than two quadrants among the clips.
    """
    from midiva.events import score_to_bars
    from midiva.midi import load_midi

    by_quadrant: dict[str, list[LabelledClip]] = {}
    for clip in clips:
        by_quadrant.setdefault(clip.quadrant, []).append(clip)
    if len(by_quadrant) < 2:
        raise DataError("medleys need clips of at least two quadrants")
    parsed: dict[str, tuple[Any, int, int]] = {}

    def segment(clip: LabelledClip) -> tuple[Any, int, int]:
        if clip.name not in parsed:
            midi = load_midi(clip.data)
            bars = score_to_bars(midi)
            score = midi.score.resample(MEDLEY_BEAT_RESOLUTION, min_dur=1)
            parsed[clip.name] = (score, int(bars.leading_bars_dropped), int(bars.n_bars))
        return parsed[clip.name]

    rng = np.random.default_rng(seed)
    quadrants = sorted(by_quadrant)
    medleys = []
    for index in range(n_medleys):
        count = int(rng.integers(segments[0], segments[1] + 1))
        chosen: list[LabelledClip] = []
        for _ in range(count):
            options = [q for q in quadrants if not chosen or q != chosen[-1].quadrant]
            quadrant = options[int(rng.integers(len(options)))]
            pool = [c for c in by_quadrant[quadrant] if c.song not in {x.song for x in chosen}]
            if not pool:
                break
            chosen.append(pool[int(rng.integers(len(pool)))])
        if len(chosen) < 2:
            continue
        medleys.append(_join(f"medley_{index:04d}", chosen, segment))
    return medleys


def _join(name: str, chosen: Sequence[LabelledClip], segment: Callable[[LabelledClip], tuple[Any, int, int]]) -> Medley:
    from symusic.core import ScoreTick, TempoTick, TimeSignatureTick

    bar_ticks = 4 * MEDLEY_BEAT_RESOLUTION
    out = ScoreTick(MEDLEY_BEAT_RESOLUTION)
    out.tempos = type(out.tempos)([TempoTick(0, 120.0)])
    out.time_signatures = type(out.time_signatures)([TimeSignatureTick(0, 4, 4)])
    labels: list[str] = []
    boundaries: list[int] = []
    for k, clip in enumerate(chosen):
        score, leading, n_bars = segment(clip)
        start = leading * bar_ticks
        part = score.clip(start, start + n_bars * bar_ticks, clip_end=True)
        part = part.shift_time(len(labels) * bar_ticks - start)
        if k:
            boundaries.append(len(labels))
        for track in part.tracks:
            out.tracks.append(track)
        labels.extend([clip.quadrant] * n_bars)
    data = bytes(out.dumps_midi())
    from midiva.events import score_to_bars
    from midiva.midi import load_midi

    # Cutting notes at a clip's last bar line can leave the medley's last bar empty: it then has no MuseTok bar.
    n_bars = score_to_bars(load_midi(data)).n_bars
    return Medley(
        name, data, tuple(labels[:n_bars]), tuple(b for b in boundaries if b < n_bars), tuple(c.name for c in chosen)
    )
