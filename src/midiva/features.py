"""Stage 3: handcrafted musical features, one float32 row per MuseTok bar.

Input: a `LoadedMidi` and the `BarEvents` made from it. The bar grid is MuseTok's: ticks are
rescaled to 480 per quarter with `to_musetok_ticks`, bar b covers
[(b + leading_bars_dropped)·bar_resol, (b + leading_bars_dropped + 1)·bar_resol), so row b of the
output is MuseTok bar b and there are exactly `bars.n_bars` rows.
Output: `BarFeatures` — values (n_bars, len(FEATURE_NAMES)) float32, never NaN or inf.
Units: a beat is a quarter note; pitches are MIDI numbers; velocities 0..127; seconds come from
the file's tempo map (120 bpm where it has none). Each column is documented in `FEATURE_DOCS`.

Notes are assigned to a bar by their onset (counted features: the bar where MuseTok emits the
note, so `note_count` equals the bar's Note_Pitch events when nothing was dropped) or by the time
they sound in it (time-weighted features, raw rescaled ticks). Drum-track notes count in note and onset counts and densities only;
every pitch, velocity, duration, harmony and sounding-time feature uses pitched notes alone.
Bars without pitched sound get 0 for those features (see `FEATURE_DOCS`).

`bar_features_many` computes many files at once (their bars laid end to end on one grid) with the
very values of one `bar_features` call per file, bit for bit; small files cost far less that way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from midiva.errors import DataError
from midiva.events import (
    BATCH_MAX_NOTES,
    BEAT_RESOLUTION,
    PITCH_RANGE,
    BarEvents,
    batch_runs,
    by_file_then_key,
    score_to_bars,
    to_musetok_ticks_by_run,
)
from midiva.midi import LoadedMidi, load_midi
from midiva.representations import Representation

log = logging.getLogger(__name__)

DEFAULT_MSPQ = 500_000  # microseconds per quarter of 120 bpm, the SMF default tempo
CONTEXT_HALF_WIDTH = 2  # `_win5` columns pool bars b-2..b+2
SLOT_TICKS = 40  # MuseTok's Beat step: 1/12 quarter at 480 TPQ
# About 4.4 kB of temporaries per bar: with midiva.midi.MAX_NOTES this bounds a worker's memory
# (README, "Memory"; benchmarks/bench_memory.py). 20,000 bars of 4/4 at 120 bpm last 11 hours.
MAX_FEATURE_BARS = 20_000
# Bars per `bar_features_many` chunk: a quarter of the events stage's chunk, as the feature arrays of
# 512 bars stay in a core's cache (EMOPIA: 1.2x faster than 2048). The values do not depend on it.
BATCH_BARS = 512
MAX_ARTICULATION = 4.0  # a note held over several later onsets (pedal, drones) says no more than this
MIN_VELOCITY_SPREAD = 8.0  # velocity steps: below this a piece's dynamics are a rendering detail, not music

# Krumhansl & Kessler (1982) probe-tone profiles, index 0 = tonic.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
# Huron (1994) consonance of interval classes 1..6 (index 0, the unison, is never used).
HURON_CONSONANCE = np.array([0.0, -1.428, -0.582, 0.594, 0.386, 1.240, -0.453])

# name -> (one-line doc, pooling used for the `_win5` and `_song` columns):
#   bar: plain mean over bars; sound: weighted by pitched sounding note-time; union: weighted by
#   sounding time; onset: weighted by pitched onsets; artic: weighted by notes with a next onset;
#   chroma: recomputed from the pooled duration-weighted pitch-class histogram; chord: weighted by
#   sounding beats; onset_chroma: recomputed from the pooled onset chroma.
_BASE: dict[str, tuple[str, str]] = {
    "tempo_bpm": ("quarter notes per minute over the bar (time-weighted tempo map; no tempo events: 120)", "bar"),
    "note_count": ("notes starting in the bar, drums included", "bar"),
    "note_density_per_beat": ("notes starting in the bar per quarter note, drums included", "bar"),
    "onset_density_per_beat": ("distinct onset times (MuseTok's onset grid) per quarter note, drums included", "bar"),
    "note_density_per_second": ("notes starting in the bar per second, drums included", "bar"),
    "onset_density_per_second": ("distinct onset times (MuseTok's onset grid) per second, drums included", "bar"),
    "velocity_mean": ("mean velocity of pitched notes starting in the bar (none: 0)", "onset"),
    "velocity_std": ("standard deviation of those velocities (fewer than 2 notes: 0)", "onset"),
    "pitch_mean": (
        "mean MIDI pitch of pitched notes sounding in the bar, weighted by sounding time (silent: 0)",
        "sound",
    ),
    "pitch_std": ("standard deviation of that pitch distribution, in semitones (silent: 0)", "sound"),
    "pitch_range": ("highest minus lowest pitch sounding in the bar, in semitones (silent: 0)", "sound"),
    "bass_pitch": ("lowest pitch sounding in the bar (silent: 0)", "sound"),
    "top_pitch": ("highest pitch sounding in the bar (silent: 0)", "sound"),
    "polyphony": ("mean number of pitched notes sounding while any sounds (silent: 0)", "union"),
    "sounding_fraction": ("fraction of the bar's time in which some pitched note sounds", "bar"),
    "sustain_pedal_fraction": ("fraction of the bar's time with the sustain pedal (CC64 >= 64) down", "bar"),
    "duration_beats": ("mean duration of pitched notes starting in the bar, in quarter notes (none: 0)", "onset"),
    "duration_seconds": ("mean duration of pitched notes starting in the bar, in seconds (none: 0)", "onset"),
    "articulation": (
        f"mean duration / time to the next pitched onset, capped at {MAX_ARTICULATION:g}; ~1 legato, <1 detached (none: 0)",
        "artic",
    ),
    "mode": (
        "Krumhansl-Kessler: best major-key minus best minor-key correlation of the chroma (+ major, - minor; silent: 0)",
        "chroma",
    ),
    "key_strength": (
        "correlation of the best of the 24 Krumhansl-Kessler key profiles with the chroma (silent: 0)",
        "chroma",
    ),
    "chroma_entropy_bits": (
        "entropy of the duration-weighted pitch-class distribution, 0..log2(12) bits (silent: 0)",
        "chroma",
    ),
    "consonance": (
        "Huron interval-class consonance averaged over pitch-class pairs, -1.43..1.24 (fewer than 2 classes: 0)",
        "chroma",
    ),
    "triad_major": ("largest share of the chroma on one major triad's pitch classes, 0..1 (silent: 0)", "chroma"),
    "triad_minor": ("largest share of the chroma on one minor triad's pitch classes, 0..1 (silent: 0)", "chroma"),
    "triad_diminished": (
        "largest share of the chroma on one diminished triad's pitch classes, 0..1 (silent: 0)",
        "chroma",
    ),
    "diatonicity": (
        "largest share of the chroma on one major scale's (= natural minor's) 7 pitch classes, 0..1 (silent: 0)",
        "chroma",
    ),
    "chord_major_fraction": (
        "fraction of the bar's sounding beats whose chroma fits one major triad better than any minor or diminished one",
        "chord",
    ),
    "chord_minor_fraction": (
        "fraction of the bar's sounding beats whose chroma fits one minor triad better than any major or diminished one",
        "chord",
    ),
    # Authoring-robust columns: the same music sequenced, doubled or played flat reads the same.
    "pitched_onset_density_per_second": (
        "distinct onset times (MuseTok's onset grid) of pitched notes per second; drums excluded",
        "bar",
    ),
    "chroma_onset_density_per_second": (
        "distinct (onset time, pitch class) pairs of pitched notes per second: unison and octave doublings add nothing",
        "bar",
    ),
    "pitch_class_polyphony": (
        "mean number of pitch classes sounding while any pitched note sounds; doublings add nothing (silent: 0)",
        "union",
    ),
    "velocity_relative": (
        f"mean velocity of the bar's pitched onsets minus the piece's, over max(piece std, {MIN_VELOCITY_SPREAD:g}); "
        "0 in a file without dynamics (none: 0)",
        "onset",
    ),
    # The harmony columns again, from onsets: each pitched note counts once, in the bar of its onset,
    # however long it is written. A transcription's sounding lengths (overlapping the next notes) and a
    # sequencer's notated ones give the same onset chroma; a bar without onsets falls back to the
    # pitch classes still sounding, by sounding time (normalised to one note).
    "onsets_mode": ("mode from the onset chroma (+ major, - minor; silent: 0)", "onset_chroma"),
    "onsets_key_strength": ("key_strength from the onset chroma (silent: 0)", "onset_chroma"),
    "onsets_chroma_entropy_bits": (
        "chroma_entropy_bits of the onset chroma, 0..log2(12) bits (silent: 0)",
        "onset_chroma",
    ),
    "onsets_consonance": ("consonance of the onset chroma, -1.43..1.24 (fewer than 2 classes: 0)", "onset_chroma"),
    "onsets_triad_major": ("triad_major of the onset chroma, 0..1 (silent: 0)", "onset_chroma"),
    "onsets_triad_minor": ("triad_minor of the onset chroma, 0..1 (silent: 0)", "onset_chroma"),
    "onsets_triad_diminished": ("triad_diminished of the onset chroma, 0..1 (silent: 0)", "onset_chroma"),
    "onsets_diatonicity": ("diatonicity of the onset chroma, 0..1 (silent: 0)", "onset_chroma"),
}
BASE_FEATURE_NAMES: tuple[str, ...] = tuple(_BASE)
_WINDOW = 2 * CONTEXT_HALF_WIDTH + 1
FEATURE_NAMES: tuple[str, ...] = (
    *BASE_FEATURE_NAMES,
    *(f"{name}_win{_WINDOW}" for name in BASE_FEATURE_NAMES),
    *(f"{name}_song" for name in BASE_FEATURE_NAMES),
)
FEATURE_DOCS: dict[str, str] = {
    **{name: doc for name, (doc, _) in _BASE.items()},
    **{
        f"{name}_win{_WINDOW}": f"{name} over bars b-{CONTEXT_HALF_WIDTH}..b+{CONTEXT_HALF_WIDTH} (clipped at the ends; {pool}-pooled)"
        for name, (_, pool) in _BASE.items()
    },
    **{f"{name}_song": f"{name} over the whole piece ({pool}-pooled)" for name, (_, pool) in _BASE.items()},
}
_COL = {name: i for i, name in enumerate(BASE_FEATURE_NAMES)}


@dataclass(frozen=True, eq=False)
class BarFeatures:
    """Feature rows aligned with MuseTok's bars.

    Attributes:
        names: column names (`FEATURE_NAMES`).
        values: float32 array (n_bars, len(names)); row b is MuseTok bar b.
    """

    names: tuple[str, ...]
    values: npt.NDArray[np.float32]

    @property
    def n_bars(self) -> int:
        """Number of rows (bars)."""
        return int(self.values.shape[0])

    def column(self, name: str) -> npt.NDArray[np.float32]:
        """One feature over all bars, shape (n_bars,)."""
        return self.values[:, self.names.index(name)]

    def to_dicts(self) -> list[dict[str, float]]:
        """One `{name: value}` dict per bar."""
        return [dict(zip(self.names, map(float, row), strict=True)) for row in self.values]


@dataclass(frozen=True)
class _Notes:
    """All notes of a batch of scores on the bar grid: ticks at 480 TPQ relative to each file's MuseTok bar 0.

    Notes are grouped by file, in file order, each file's in its tracks' order.
    """

    start: npt.NDArray[np.int64]
    end: npt.NDArray[np.int64]
    start_file: npt.NDArray[np.int64]  # the file's own ticks, for the tempo map
    end_file: npt.NDArray[np.int64]
    pitch: npt.NDArray[np.int64]
    velocity: npt.NDArray[np.int64]
    drum: npt.NDArray[np.bool_]
    file: npt.NDArray[np.int64]  # index of the note's file in the batch


def _score(midi: LoadedMidi) -> Any:
    """The symusic score, typed Any: symusic's `Score` is a factory object that mypy cannot see through."""
    return midi.score


@dataclass(frozen=True)
class _PedalTracks:
    """The sustain-pedal arrays of a batch's pitched tracks, as symusic gives them, with their file and TPQ."""

    arrays: list[dict[str, npt.NDArray[Any]]]
    files: list[int]
    tpqs: list[int]


def _collect_notes(midis: Sequence[LoadedMidi], origins: npt.NDArray[np.int64]) -> tuple[_Notes, _PedalTracks]:
    """The notes of all files on the bar grid, and their pitched tracks' pedals: one walk over the tracks."""
    arrays, counts, drums, files, tpqs = [], [], [], [], []
    pedals = _PedalTracks([], [], [])
    for i, midi in enumerate(midis):
        score = _score(midi)
        tpq = int(score.ticks_per_quarter)
        for track, notes in zip(score.tracks, midi.note_arrays, strict=True):
            if track.note_num():
                arrays.append(notes)
                counts.append(len(arrays[-1]["time"]))
                drums.append(bool(track.is_drum))
                files.append(i)
                tpqs.append(tpq)
            if not track.is_drum and len(track.pedals):
                pedals.arrays.append(track.pedals.numpy())
                pedals.files.append(i)
                pedals.tpqs.append(tpq)
    if not arrays:
        empty = np.zeros(0, np.int64)
        return _Notes(empty, empty, empty, empty, empty, empty, np.zeros(0, bool), empty), pedals
    time, duration, pitch, velocity = (
        np.concatenate([a[key] for a in arrays], dtype=np.int64) for key in ("time", "duration", "pitch", "velocity")
    )
    file = np.repeat(np.array(files, np.int64), counts)
    # MuseTok rescales the onset and the duration separately; the end is never rescaled itself.
    start = to_musetok_ticks_by_run(time, tpqs, counts) - origins[file]
    end = start + to_musetok_ticks_by_run(duration, tpqs, counts)
    drum = np.repeat(np.array(drums), counts)
    return _Notes(start, end, time, time + duration, pitch & 0x7F, velocity & 0x7F, drum, file), pedals


def _seconds(midi: LoadedMidi, ticks: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Seconds at file ticks from the tempo map (120 bpm before the first tempo; zero tempos ignored)."""
    return seconds_at(_score(midi), ticks)


def seconds_at(score: Any, ticks: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Seconds at ticks of a symusic score from its tempo map (120 bpm before the first tempo; zero tempos ignored)."""
    tempos = score.tempos.numpy()
    times = tempos["time"].astype(np.float64)
    mspq = tempos["mspq"].astype(np.float64)
    valid = mspq > 0  # a zero tempo gives no time to anything; keep the tempo before it
    times, mspq = times[valid], mspq[valid]
    if times.size > 1 and (np.diff(times) < 0).any():
        order = np.argsort(times, kind="stable")
        times, mspq = times[order], mspq[order]
    if times.size == 0 or times[0] > 0:
        times, mspq = np.concatenate([[0.0], times]), np.concatenate([[float(DEFAULT_MSPQ)], mspq])
    sec_per_tick = mspq / (1e6 * float(score.ticks_per_quarter))
    if times.size == 1:
        return ticks * sec_per_tick[0]
    offsets = np.concatenate([[0.0], np.cumsum(np.diff(times) * sec_per_tick[:-1])])
    k = np.maximum(np.searchsorted(times, ticks, side="right") - 1, 0)
    return np.asarray(offsets[k] + (ticks - times[k]) * sec_per_tick[k])


@functools.lru_cache(maxsize=64)
def _first_pass_slot(resol: int) -> npt.NDArray[np.int64]:
    """Position in a bar (ticks) -> slot of MuseTok's first-pass onset grid (multiples of 80 and
    120, and the next downbeat as slot resol/40; ties to the earlier point)."""
    grid = np.array(sorted({*range(0, resol, 80), *range(0, resol, 120), resol}), np.int64)
    r = np.arange(resol, dtype=np.int64)
    i = np.searchsorted(grid, r)
    lo, hi = grid[np.maximum(i - 1, 0)], grid[i]
    return np.asarray(np.where(hi - r < r - lo, hi, lo) // SLOT_TICKS)


def _slots_per_bar(resol: int) -> int:
    """Onset slots in a bar of `resol` ticks; at least one, as a 1/64 or 1/128 bar is shorter than a slot."""
    return max(resol // SLOT_TICKS, 1)


def _musetok_onsets(batch: _Batch) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(bar, slot) of each note's onset, the bar counted in its own file: the bar is where MuseTok emits the note.

    MuseTok's triplet rule can keep a note that starts just before a bar line in the earlier bar,
    and it depends on all notes at once; but its onsets never decrease in its list order, so the
    notes it kept, sorted by start, fill its bars in order (counts from `bars.bar_starts`). Notes
    it dropped (drums when excluded, pitches outside 21..108) use its first-pass grid, as does the
    slot of every note (MuseTok's final slot differs only for rejected triplets).
    """
    notes, resol = batch.notes, batch.resol
    bar_origin = notes.start // resol * resol
    slot = _first_pass_slot(resol)[notes.start - bar_origin]
    steps = _slots_per_bar(resol)
    bar = bar_origin // resol + slot // steps  # slot == steps: the next downbeat
    slot = slot % steps
    kept = (notes.pitch >= PITCH_RANGE[0]) & (notes.pitch <= PITCH_RANGE[1])
    drums_dropped = np.array([bool(b.report.dropped_drum_notes) for b in batch.bars])
    if drums_dropped.any():
        kept &= ~(notes.drum & drums_dropped[notes.file])
    starts = np.concatenate([np.asarray(b.bar_starts, np.int64) for b in batch.bars])
    following = np.append(starts[1:], 0)
    following[batch.bar0[1:] - 1] = [b.n_tokens - 1 for b in batch.bars]  # each file's EOS_None
    tokens_per_bar = following - starts
    per_bar = (tokens_per_bar - 2) // 3  # Bar_None, (Beat, Pitch, Duration) per note, Time_Signature
    n_files = len(batch.bars)
    n_kept = np.bincount(notes.file[kept], minlength=n_files)
    matches = (np.bincount(batch.bar_file, per_bar, minlength=n_files) == n_kept) & ~(
        np.bincount(batch.bar_file, (tokens_per_bar - 2) % 3, minlength=n_files) > 0
    )
    for i in np.flatnonzero(~matches):
        log.debug("%s: events do not match the notes; bars of onsets from the grid instead", batch.bars[i].name)
    kept &= matches[notes.file]
    kept_index = np.flatnonzero(kept)
    kept_index = kept_index[by_file_then_key(notes.file[kept_index], notes.start[kept_index])]
    bar_matches = matches[batch.bar_file]
    musetok_bar = np.repeat(batch.local_bar[bar_matches], per_bar[bar_matches])
    moved = bar[kept_index] != musetok_bar  # a kept triplet: the onset stays at the bar's last slots
    slot[kept_index[moved]] = np.where(musetok_bar[moved] < bar[kept_index[moved]], steps - 1, 0)
    bar[kept_index] = musetok_bar
    return bar, slot


def _overlap_by_group(
    group: npt.NDArray[np.int64],
    start: npt.NDArray[np.int64],
    end: npt.NDArray[np.int64],
    n_groups: int,
    n: int,
    resol: int,
) -> npt.NDArray[np.float64]:
    """Summed overlap (ticks) of intervals [start, end) with each bar, per group: (n_groups, n).

    Linear in notes + bars·groups however long the notes are. An interval from offset `lo` in bar
    f to offset `hi` in bar a overlaps bar f by resol - lo, the bars between by resol and bar a by
    hi (hi - lo when f = a); as a difference array over bars that is four steps, resol - lo at f,
    lo at f + 1, hi - resol at a and -hi at a + 1, and one running sum gives every overlap. Every
    step and every partial sum is a whole number of ticks, so the float sums are exact in any order.
    Intervals must be non-empty and lie within [0, n·resol].
    """
    first, after = start // resol, end // resol
    lo, hi = start - first * resol, end - after * resol
    width = n + 2  # an end at n·resol steps in column n, and back in column n + 1
    m = start.size
    # The four steps of every interval, written into one index and one weight array (no concatenation).
    cell = np.empty((4, m), np.int64)
    np.multiply(group, width, out=cell[0])
    np.add(cell[0], after, out=cell[2])
    cell[0] += first
    np.add(cell[0], 1, out=cell[1])
    np.add(cell[2], 1, out=cell[3])
    step = np.empty((4, m))
    step[1] = lo
    np.subtract(resol, step[1], out=step[0])
    step[3] = hi
    np.subtract(step[3], resol, out=step[2])
    np.negative(step[3], out=step[3])
    total = np.bincount(cell.ravel(), step.ravel(), minlength=n_groups * width)
    # Each interval's steps cancel within its group's row, so one flat running sum is per row.
    np.cumsum(total, out=total)
    return np.asarray(total.reshape(n_groups, width)[:, :n], dtype=np.float64)


def _union(
    start: npt.NDArray[np.int64], end: npt.NDArray[np.int64], order: npt.NDArray[np.intp] | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Merge intervals into disjoint ones (sorted); `order` sorts `start`, if the caller has it."""
    if start.size == 0:
        return start, end
    if order is None:
        order = np.argsort(start, kind="stable")
    s, e = start[order], np.maximum.accumulate(end[order])
    new = np.empty(s.size, bool)
    new[0] = True
    np.greater(s[1:], e[:-1], out=new[1:])
    last = np.append(np.flatnonzero(new)[1:] - 1, s.size - 1)
    return s[new], e[last]


def _union_by_group(
    group: npt.NDArray[np.int64],
    start: npt.NDArray[np.int64],
    end: npt.NDArray[np.int64],
    by_start: npt.NDArray[np.intp],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Merge intervals into disjoint ones within each group (0..255): (group, start, end) of the merged intervals.

    `by_start` sorts `start`; a stable sort of the small group numbers after it (a radix sort) orders
    the intervals by (group, start) without a second comparison sort.
    """
    if start.size == 0:
        return group, start, end
    # Offsetting each group past the previous one's end lets one sorted sweep merge them all.
    span = int(end.max()) + 1
    order = by_start[np.argsort(group[by_start].astype(np.uint8), kind="stable")]
    s, e = _union(group * span + start, group * span + end, order)
    g = s // span
    return g, s - g * span, e - g * span


def _pedal_intervals(batch: _Batch) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Disjoint sustain-pedal-down intervals of the pitched tracks, on the batch's bar grid."""
    arrays, tpqs = batch.pedals.arrays, batch.pedals.tpqs
    if not arrays:
        empty = np.zeros(0, np.int64)
        return empty, empty
    counts = [len(a["time"]) for a in arrays]
    file = np.repeat(np.array(batch.pedals.files, np.int64), counts)
    time = np.concatenate([a["time"] for a in arrays], dtype=np.int64)
    duration = np.concatenate([a["duration"] for a in arrays], dtype=np.int64)
    s = to_musetok_ticks_by_run(time, tpqs, counts) - batch.origins[file]
    e = s + to_musetok_ticks_by_run(duration, tpqs, counts)
    span, shift = batch.n_bars[file] * batch.resol, batch.bar0[file] * batch.resol
    s, e = np.minimum(np.maximum(s, 0), span), np.minimum(np.maximum(e, 0), span)
    keep = e > s
    return _union(s[keep] + shift[keep], e[keep] + shift[keep])


def _standard_profiles() -> npt.NDArray[np.float64]:
    """The 24 key profiles (12 major, then 12 minor, tonic C..B), each centred and scaled to std 1."""
    profiles = np.stack([np.roll(p, k) for p in (KK_MAJOR, KK_MINOR) for k in range(12)])
    return np.asarray((profiles - profiles.mean(1, keepdims=True)) / profiles.std(1, keepdims=True))


_PROFILES_T = _standard_profiles().T / 12.0  # so that z-scored chroma @ _PROFILES_T is Pearson's r
_interval = np.abs(np.arange(12)[:, None] - np.arange(12)[None, :])
_PAIR_CONSONANCE = HURON_CONSONANCE[np.minimum(_interval, 12 - _interval)]
_PITCH_CLASS = (np.arange(128)[:, None] % 12 == np.arange(12)[None, :]).astype(np.float64)  # (128, 12)
KEY_FEATURES = (
    "mode",
    "key_strength",
    "chroma_entropy_bits",
    "consonance",
    "triad_major",
    "triad_minor",
    "triad_diminished",
    "diatonicity",
)


def _templates(*steps: Sequence[int]) -> npt.NDArray[np.float64]:
    """Pitch-class sets (given as steps above the root) on all 12 roots: (12 · len(steps), 12) of 0/1, transposed."""
    rows = [np.isin((np.arange(12) - root) % 12, s) for s in steps for root in range(12)]
    return np.asarray(np.stack(rows).T, dtype=np.float64)


_TRIADS_T = _templates((0, 4, 7), (0, 3, 7), (0, 3, 6))  # major, minor, diminished triads on C..B
_SCALES_T = _templates((0, 2, 4, 5, 7, 9, 11))


_FEW_ROWS = 256  # `_best_of_roots`: below this many rows numpy's own reduction is faster


def _best_of_roots(product: npt.NDArray[np.float64], n_sets: int) -> npt.NDArray[np.float64]:
    """Maximum over each block of 12 columns (one pitch-class set on roots C..B): (k, 12 · n_sets) -> (k, n_sets).

    Exactly `product.reshape(-1, n_sets, 12).max(2)`: a maximum is the same in any order. Taken one
    column at a time, each step is one long strided loop; numpy's own reduction over a 12-wide last
    axis, or a maximum over (k, n_sets) views, makes k short loops and is several times slower, but
    below some 200 rows its single call beats the 11 calls a set.
    """
    if product.shape[0] < _FEW_ROWS:
        return np.asarray(product.reshape(-1, n_sets, 12).max(2))
    best = np.empty((n_sets, product.shape[0]))
    for s in range(n_sets):
        np.maximum(product[:, 12 * s], product[:, 12 * s + 1], out=best[s])
        for root in range(2, 12):
            np.maximum(best[s], product[:, 12 * s + root], out=best[s])
    return best.T


def _triad_fits(chroma: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Best root's share of each triad quality, (k, 12) -> (k, 3): major, minor, diminished.

    Exactly `(chroma @ _TRIADS_T).reshape(-1, 3, 12).max(2)` (see `_best_of_roots`).
    """
    return _best_of_roots(chroma @ _TRIADS_T, 3)


def _entropy_bits(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Entropy in bits of each distribution row of p (k, 12), with 0·log2(0) = 0.

    The very terms of `np.where(p > 0, p * np.log2(p), 0.0)`: a zero p takes log2(1) = 0 and adds
    p · 0 = 0, the same +0.0; a positive one the same product (multiplication commutes exactly).
    One log2 of defined values replaces a log2 of -inf, a nan product and a select.
    """
    terms = np.log2(np.where(p > 0, p, 1.0))
    terms *= p
    return -terms.sum(1) + 0.0  # + 0.0 turns -0.0 into 0.0


def _key_features(chroma: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """`KEY_FEATURES` of chroma rows (k, 12): shape (k, len(KEY_FEATURES)).

    The best major and best minor key come from `_best_of_roots`; the best of all 24 keys is the
    larger of the two, as `corr.max(1)` is.
    """
    total = chroma.sum(1, keepdims=True)
    p = chroma / np.where(total > 0, total, 1.0)
    centred = p - 1.0 / 12.0
    scale = np.sqrt((centred**2).mean(1, keepdims=True))
    flat = (total[:, 0] <= 0) | (scale[:, 0] <= 1e-9)  # silent or uniform: no key
    corr = (centred / np.where(flat[:, None], 1.0, scale)) @ _PROFILES_T
    corr[flat] = 0.0
    pair_mass = 1.0 - (p * p).sum(1)
    has_pairs = pair_mass > 1e-9
    consonance = np.where(has_pairs, ((p @ _PAIR_CONSONANCE) * p).sum(1) / np.where(has_pairs, pair_mass, 1.0), 0.0)
    major, minor = _best_of_roots(corr, 2).T
    out = np.empty((chroma.shape[0], len(KEY_FEATURES)))
    np.subtract(major, minor, out=out[:, 0])
    np.maximum(major, minor, out=out[:, 1])
    out[:, 2] = _entropy_bits(p)
    out[:, 3] = consonance
    out[:, 4:7] = _triad_fits(p)  # (k, quality)
    out[:, 7] = _best_of_roots(p @ _SCALES_T, 1)[:, 0]  # diatonicity
    return out


def _beat_chords(
    batch: _Batch,
    pitch: npt.NDArray[np.int64],
    start: npt.NDArray[np.int64],
    end: npt.NDArray[np.int64],
    file: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    """Per bar: sounding beats, beats fitting a major triad best, beats fitting a minor one: (n, 3).

    A beat is a quarter note of its file's bar grid, counted in the bar where it starts; its chroma is
    the sounding time of each pitch class in it. Ties (a single note, a dyad two triads share) count
    as neither. `start` and `end` are ticks of each note's own file; beats are laid end to end by file.
    """
    n, resol = batch.n, batch.resol
    n_beats = -(-batch.n_bars * resol // BEAT_RESOLUTION)
    beat0 = np.concatenate([[0], np.cumsum(n_beats)])
    if pitch.size == 0:
        return np.zeros((n, 3))
    shift = beat0[file] * BEAT_RESOLUTION
    by_class = _overlap_by_group(pitch % 12, start + shift, end + shift, 12, int(beat0[-1]), BEAT_RESOLUTION)
    chroma = by_class.T
    # Whole tick counts sum exactly in any order, so this product equals chroma @ _TRIADS_T; in
    # this layout the maximum over roots runs along the long axis.
    fit = (_TRIADS_T.T @ by_class).reshape(3, 12, -1).max(1).T  # (beats, major/minor/diminished), in ticks
    best = fit.max(1, keepdims=True)
    unique = (fit == best).sum(1) == 1
    sounding = chroma.sum(1) > 0
    beat_file = np.repeat(np.arange(len(n_beats)), n_beats)
    local_beat = np.arange(int(beat0[-1])) - beat0[beat_file]
    bar = batch.bar0[beat_file] + local_beat * BEAT_RESOLUTION // resol
    counts = [sounding, sounding & unique & (fit[:, 0] == best[:, 0]), sounding & unique & (fit[:, 1] == best[:, 0])]
    return np.stack([np.bincount(bar, c.astype(np.float64), minlength=n) for c in counts], axis=1)


def _window_and_song_sums(
    batch: _Batch, x: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per file, the sums of rows b-2..b+2 (clipped at the file's ends) and of all its rows: (n, k), (n_files, k).

    A window is a difference of a running sum that starts at the file's first row. The files' rows
    are padded with zeros to one length, (files, rows, k): a running sum and a sum along the rows
    make the very additions, in the same order, of `cumsum(0)` and `sum(0)` over each file alone
    (numpy adds row after row along an outer axis; the padding comes last).
    """
    n_files, width = len(batch.bars), x.shape[1]
    longest = int(batch.n_bars.max())
    padded = np.zeros((n_files, longest, width))
    padded.reshape(-1, width)[batch.bar_file * longest + batch.local_bar] = x
    csum = np.zeros((n_files, longest + 1, width))
    np.cumsum(padded, axis=1, out=csum[:, 1:])
    flat = csum.reshape(-1, width)
    row0 = batch.bar_file * (longest + 1)  # each file's zero row
    hi = np.minimum(batch.local_bar + CONTEXT_HALF_WIDTH + 1, batch.n_bars[batch.bar_file])
    lo = np.maximum(batch.local_bar - CONTEXT_HALF_WIDTH, 0)
    return flat[row0 + hi] - flat[row0 + lo], padded.sum(axis=1)


def _weighted(num: npt.NDArray[Any], den: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """num / den where den > 0, else 0."""
    shape = num.shape if num.shape == den.shape else np.broadcast_shapes(num.shape, den.shape)
    return np.divide(num, den, out=np.zeros(shape), where=den > 0)


@dataclass
class _Batch:
    """What the feature groups of a batch share: files of one bar length, their bars laid end to end.

    Global bar `bar0[i] + b` is bar b of file i; every per-bar array below is (n, ...) over them.
    """

    midis: list[LoadedMidi]
    bars: list[BarEvents]
    resol: int
    notes: _Notes
    pedals: _PedalTracks
    out: npt.NDArray[np.float64]  # (n, n_base), filled group by group
    n_bars: npt.NDArray[np.int64]  # (n_files,)
    bar0: npt.NDArray[np.int64]  # (n_files + 1,) first global bar of each file, then n
    origins: npt.NDArray[np.int64]  # (n_files,) bar 0's start in each file, 480-TPQ ticks
    bar_file: npt.NDArray[np.int64]  # (n,) the file of each bar
    local_bar: npt.NDArray[np.int64]  # (n,) each bar's number in its file

    @classmethod
    def of(cls, midis: list[LoadedMidi], bars: list[BarEvents]) -> _Batch:
        resol = int(bars[0].bar_resol)
        n_bars = np.array([b.n_bars for b in bars], np.int64)
        bar0 = np.concatenate([[0], np.cumsum(n_bars)])
        origins = np.array([b.leading_bars_dropped for b in bars], np.int64) * resol
        bar_file = np.repeat(np.arange(len(bars)), n_bars)
        n = int(bar0[-1])
        notes, pedals = _collect_notes(midis, origins)
        out = np.zeros((n, len(BASE_FEATURE_NAMES)), np.float64)
        local_bar = np.arange(n) - bar0[bar_file]
        return cls(midis, bars, resol, notes, pedals, out, n_bars, bar0, origins, bar_file, local_bar)

    @property
    def n(self) -> int:
        return int(self.bar0[-1])

    @property
    def beats_per_bar(self) -> float:
        return self.resol / BEAT_RESOLUTION

    def set(self, name: str, values: Any) -> None:
        self.out[:, _COL[name]] = values

    def bounds(self, file: npt.NDArray[np.int64]) -> list[int]:
        """Where each file's run starts in `file` (sorted file indices of some notes), and the end."""
        return list(np.searchsorted(file, np.arange(len(self.bars) + 1)).tolist())


@dataclass
class _Counted:
    """Per-bar onset statistics of the pitched notes (the weights of onset-pooled columns)."""

    pb: npt.NDArray[np.int64]  # onset bar of each pitched note with an onset inside its file
    n_onsets: npt.NDArray[np.float64]
    duration_ticks: npt.NDArray[np.float64]
    pitched: npt.NDArray[np.bool_]  # among pitched notes: onset bar inside its file


def bar_features(midi: LoadedMidi, bars: BarEvents) -> BarFeatures:
    """Compute `FEATURE_NAMES` for every MuseTok bar of `bars`.

    Args:
        midi: the loaded file that `bars` was made from.
        bars: its MuseTok bars; fixes the grid and the number of rows.

    Returns:
        BarFeatures with values (bars.n_bars, len(FEATURE_NAMES)), float32, finite.

    Raises:
        DataError: `bars` was made from a different file than `midi`, or has more than MAX_FEATURE_BARS bars.
    """
    _check(midi, bars)
    if bars.n_bars == 0:
        return BarFeatures(FEATURE_NAMES, np.zeros((0, len(FEATURE_NAMES)), np.float32))
    result = _batch_features([midi], [bars])[0]
    if isinstance(result, DataError):
        raise result
    return result


def bar_features_many(pairs: Sequence[tuple[LoadedMidi, BarEvents]]) -> list[BarFeatures | DataError]:
    """`bar_features` of many files at once: the same values, far less overhead per small file.

    Files of one bar length and at most BATCH_MAX_NOTES notes are computed together, about
    BATCH_BARS bars at a time, so a batch needs no more memory than one file at MAX_FEATURE_BARS.

    Args:
        pairs: (loaded file, its MuseTok bars) per file.

    Returns:
        One entry per pair, in order: its BarFeatures, or the DataError that `bar_features` raises for it.
    """
    results: list[BarFeatures | DataError | None] = [None] * len(pairs)
    by_resol: dict[int, list[int]] = {}
    for i, (midi, bars) in enumerate(pairs):
        try:
            _check(midi, bars)
        except DataError as err:
            results[i] = err
            continue
        if bars.n_bars == 0:
            results[i] = BarFeatures(FEATURE_NAMES, np.zeros((0, len(FEATURE_NAMES)), np.float32))
        else:
            by_resol.setdefault(int(bars.bar_resol), []).append(i)
    for members in by_resol.values():
        members.sort(key=lambda i: pairs[i][1].n_bars)  # similar lengths together: little padding
        for chunk in batch_runs(members, [_chunk_size(pairs[i][1]) for i in members], BATCH_BARS):
            computed = _batch_features([pairs[i][0] for i in chunk], [pairs[i][1] for i in chunk])
            for i, result in zip(chunk, computed, strict=True):
                results[i] = result
    return [r for r in results if r is not None]


def _chunk_size(bars: BarEvents) -> int:
    """The bars a file takes in a chunk: a file of more than BATCH_MAX_NOTES notes fills one alone."""
    return bars.n_bars if bars.report.n_notes <= BATCH_MAX_NOTES else BATCH_BARS + 1


def _check(midi: LoadedMidi, bars: BarEvents) -> None:
    if bars.n_bars > MAX_FEATURE_BARS:
        raise DataError(
            f"{bars.name!r} has {bars.n_bars:,} bars, above the limit of {MAX_FEATURE_BARS:,} bars per "
            "file for bar features (it bounds a worker's memory); skipped"
        )
    if bars.md5 != midi.md5:
        raise DataError(
            f"bar events of {bars.name!r} (md5 {bars.md5}) do not belong to {midi.name!r} (md5 {midi.md5}); "
            "pass the BarEvents made from this LoadedMidi"
        )


def _batch_features(midis: list[LoadedMidi], bars: list[BarEvents]) -> list[BarFeatures | DataError]:
    """Features of files with bars (at least one each) of one length, computed together."""
    batch = _Batch.of(midis, bars)
    per_second, note_seconds = _tempo_columns(batch)
    counted = _counted_columns(batch, per_second, note_seconds)
    n_artic = _articulation(batch, counted)
    note_time, union_time, chroma, chord_counts = _time_weighted_columns(batch)
    weights = _pooling_weights(batch.n, note_time, union_time, counted.n_onsets, n_artic, chord_counts[:, 0])
    values = _with_context(batch, chroma, _onset_chroma(batch, counted, chroma), weights)
    bad_file = np.zeros(len(bars), bool)
    bad_file[batch.bar_file[~np.isfinite(values).all(1)]] = True
    results: list[BarFeatures | DataError] = []
    for i, midi in enumerate(midis):
        rows = values[batch.bar0[i] : batch.bar0[i + 1]]
        if bad_file[i]:  # a bug, not a property of the input: fail loudly
            bad = [FEATURE_NAMES[c] for c in np.flatnonzero(~np.isfinite(rows).all(0))]
            results.append(DataError(f"non-finite features {bad} for {midi.name!r}; please report this file"))
        else:
            results.append(BarFeatures(FEATURE_NAMES, rows if len(midis) == 1 else rows.copy()))
    return results


def _tempo_columns(batch: _Batch) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """tempo_bpm; returns 1 / bar duration in seconds (0 for a zero-length bar) and each pitched note's seconds."""
    notes, n_files = batch.notes, len(batch.bars)
    pitched_all = np.flatnonzero(~notes.drum)
    p_file = notes.file[pitched_all]
    edge_file = np.repeat(np.arange(n_files), batch.n_bars + 1)
    first_edge = batch.bar0[:-1] + np.arange(n_files)
    tick_scale = np.array([float(_score(m).ticks_per_quarter) / BEAT_RESOLUTION for m in batch.midis])
    edges = (np.arange(edge_file.size) - first_edge[edge_file]) * batch.resol + batch.origins[edge_file]
    # One tempo-map lookup for bar edges and pitched note starts and ends.
    file_ticks = np.concatenate(
        [edges * tick_scale[edge_file], notes.start_file[pitched_all], notes.end_file[pitched_all]]
    )
    tick_file = np.concatenate([edge_file, p_file, p_file])
    seconds = np.empty(file_ticks.size)
    constant = [_constant_sec_per_tick(_score(m)) for m in batch.midis]
    if all(c is not None for c in constant):  # the common case: one tempo from the start, or none
        seconds = file_ticks * np.array(constant)[tick_file]
    else:
        by_file = np.argsort(tick_file, kind="stable")
        bounds = batch.bounds(tick_file[by_file])
        for i, midi in enumerate(batch.midis):
            run = by_file[bounds[i] : bounds[i + 1]]
            seconds[run] = _seconds(midi, file_ticks[run])
    bar_edge = np.arange(batch.n) + batch.bar_file  # index of each bar's first edge
    bar_seconds = seconds[bar_edge + 1] - seconds[bar_edge]
    n_pitched = pitched_all.size
    note_seconds = seconds[edge_file.size + n_pitched :] - seconds[edge_file.size : edge_file.size + n_pitched]
    per_second = np.where(bar_seconds > 0, 1.0 / np.where(bar_seconds > 0, bar_seconds, 1.0), 0.0)
    batch.set("tempo_bpm", 60.0 * batch.beats_per_bar * per_second)
    return per_second, note_seconds


def _constant_sec_per_tick(score: Any) -> float | None:
    """Seconds per tick of a score whose tempo map is one tempo from tick 0 (or none: 120 bpm), else None.

    The value `seconds_at` multiplies ticks by for such a map, so `ticks * it` is `seconds_at(score, ticks)`.
    """
    tempos = score.tempos
    if len(tempos) > 1:
        return None
    if len(tempos) == 1 and (tempos[0].time != 0 or tempos[0].mspq <= 0):
        return None
    mspq = float(tempos[0].mspq) if len(tempos) else float(DEFAULT_MSPQ)
    return mspq / (1e6 * float(score.ticks_per_quarter))


def _counted_columns(
    batch: _Batch, per_second: npt.NDArray[np.float64], note_seconds: npt.NDArray[np.float64]
) -> _Counted:
    """Counted features: each note in the bar where MuseTok puts its onset (densities, velocities, durations)."""
    n, resol, notes = batch.n, batch.resol, batch.notes
    pitched_all = ~notes.drum
    onset_bar, slot = _musetok_onsets(batch)
    inside = (onset_bar >= 0) & (onset_bar < batch.n_bars[notes.file])
    onset_bar += batch.bar0[notes.file]
    ob = onset_bar[inside]
    note_count = np.bincount(ob, minlength=n).astype(np.float64)
    steps = _slots_per_bar(resol)
    onset_seen = np.zeros(n * steps, bool)
    onset_seen[ob * steps + slot[inside]] = True
    onset_count = onset_seen.reshape(n, steps).sum(1).astype(np.float64)
    pitched_inside = inside & pitched_all
    onset_key = onset_bar[pitched_inside] * steps + slot[pitched_inside]
    pitched_seen = np.zeros(n * steps, bool)
    pitched_seen[onset_key] = True
    pitched_onsets = np.count_nonzero(pitched_seen.reshape(n, steps), axis=1)
    batch.set("pitched_onset_density_per_second", pitched_onsets * per_second)
    batch.set(
        "chroma_onset_density_per_second",
        _distinct_per_bar(onset_key * 12 + notes.pitch[pitched_inside] % 12, 12 * steps, n) * per_second,
    )
    batch.set("note_count", note_count)
    batch.set("note_density_per_beat", note_count / batch.beats_per_bar)
    batch.set("onset_density_per_beat", onset_count / batch.beats_per_bar)
    batch.set("note_density_per_second", note_count * per_second)
    batch.set("onset_density_per_second", onset_count * per_second)

    pitched = inside[pitched_all]  # among pitched notes: those with an onset bar inside their file
    p_start, p_end = notes.start[pitched_all], notes.end[pitched_all]
    pb = onset_bar[pitched_all][pitched]
    n_onsets = np.bincount(pb, minlength=n).astype(np.float64)
    velocity = notes.velocity[pitched_all][pitched].astype(np.float64)
    duration_ticks = (p_end - p_start)[pitched].astype(np.float64)
    v_mean = _weighted(np.bincount(pb, velocity, minlength=n), n_onsets)
    v_var = _weighted(np.bincount(pb, velocity * velocity, minlength=n), n_onsets) - v_mean**2
    batch.set("velocity_mean", v_mean)
    batch.set("velocity_relative", _velocity_relative(batch, v_mean, n_onsets, velocity, batch.bar_file[pb]))
    batch.set("velocity_std", np.sqrt(np.maximum(v_var, 0.0)))
    batch.set("duration_beats", _weighted(np.bincount(pb, duration_ticks, minlength=n), n_onsets) / BEAT_RESOLUTION)
    batch.set("duration_seconds", _weighted(np.bincount(pb, note_seconds[pitched], minlength=n), n_onsets))
    return _Counted(pb, n_onsets, duration_ticks, pitched)


def _velocity_relative(
    batch: _Batch,
    v_mean: npt.NDArray[np.float64],
    n_onsets: npt.NDArray[np.float64],
    velocity: npt.NDArray[np.float64],
    file: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    """velocity_relative: each bar's mean velocity against its file's (numpy's own mean and std per file).

    numpy's `v.std()` is sqrt(sum((v - v.mean())**2) / len(v)) with a pairwise sum; only that sum
    depends on the order of additions, so it alone is taken file by file (velocities are whole
    numbers, so their sums are exact in any order).
    """
    n_files = len(batch.bars)
    count = np.bincount(file, minlength=n_files)
    has_notes = count > 0
    piece_mean = _weighted(np.bincount(file, velocity, minlength=n_files), count)
    deviation = velocity - piece_mean[file]
    squares = deviation * deviation
    bounds = batch.bounds(file)
    square_sum = np.zeros(n_files)
    for i in np.flatnonzero(has_notes).tolist():
        square_sum[i] = np.add.reduce(squares[bounds[i] : bounds[i + 1]])
    std = np.sqrt(_weighted(square_sum, count))
    spread = np.where(has_notes, np.maximum(std, MIN_VELOCITY_SPREAD), MIN_VELOCITY_SPREAD)
    return np.where(n_onsets > 0, (v_mean - piece_mean[batch.bar_file]) / spread[batch.bar_file], 0.0)


def _distinct_per_bar(key: npt.NDArray[np.int64], keys_per_bar: int, n: int) -> npt.NDArray[np.int64]:
    """Number of distinct keys in each bar, where key // keys_per_bar is the bar: (n,).

    A sort and a comparison of neighbours: several times faster than `np.unique`, which hashes.
    """
    if key.size == 0:
        return np.zeros(n, np.int64)
    ordered = np.sort(key)
    first = np.empty(ordered.size, bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return np.bincount(ordered[first] // keys_per_bar, minlength=n)


def _articulation(batch: _Batch, counted: _Counted) -> npt.NDArray[np.float64]:
    """articulation: duration over the time to the next distinct pitched onset slot (in any bar of the file);
    returns the per-bar count of notes that have a next onset (the column's pooling weight).

    Slots are 40-tick steps of the raw start, not MuseTok's grid: the gap is a duration here. Each
    file's slots follow the previous file's, with one unused slot past its last onset.
    """
    n, pb, notes = batch.n, counted.pb, batch.notes
    pitched_all = ~notes.drum
    p_file = notes.file[pitched_all]
    own_slot = np.maximum((notes.start[pitched_all] + SLOT_TICKS // 2 - 1) // SLOT_TICKS, 0)
    bounds = np.array(batch.bounds(p_file))
    has_notes = bounds[:-1] < bounds[1:]
    last_slot = np.full(len(batch.bars), -1, np.int64)
    if own_slot.size:
        last_slot[has_notes] = np.maximum.reduceat(own_slot, bounds[:-1][has_notes])
    slot0 = np.concatenate([[0], np.cumsum(last_slot + 2)])
    own_slot = own_slot + slot0[p_file]
    n_slots = int(slot0[-1])
    used = np.full(n_slots, n_slots, np.int64)
    used[own_slot] = own_slot
    next_used = np.minimum.accumulate(used[::-1])[::-1]  # first used slot at or after each slot
    own = own_slot[counted.pitched]
    next_slot = next_used[own + 1]
    has_next = next_slot < slot0[p_file[counted.pitched] + 1]
    gap = (next_slot - own) * SLOT_TICKS
    ratio = np.minimum(counted.duration_ticks / np.maximum(gap, 1), MAX_ARTICULATION)
    n_artic = np.bincount(pb[has_next], minlength=n).astype(np.float64)
    batch.set("articulation", _weighted(np.bincount(pb[has_next], ratio[has_next], minlength=n), n_artic))
    return n_artic


def _time_weighted_columns(batch: _Batch) -> tuple[npt.NDArray[np.float64], ...]:
    """Pitch, range, polyphony, pedal and chord columns: pitched notes by the time they sound in each bar.

    Zero-length notes get one tick so that they still show up in pitch and harmony features.
    Returns (note_time, union_time, chroma, chord_counts), the pooling inputs.
    """
    n, resol, notes = batch.n, batch.resol, batch.notes
    pitched_all = ~notes.drum
    p_start, p_end, p_file = notes.start[pitched_all], notes.end[pitched_all], notes.file[pitched_all]
    span = batch.n_bars[p_file] * resol
    s = np.minimum(np.maximum(p_start, 0), span)
    e = np.minimum(np.maximum(np.maximum(p_end, p_start + 1), 0), span)
    keep = e > s
    s, e, pitch, file = s[keep], e[keep], notes.pitch[pitched_all][keep], p_file[keep]
    shift = batch.bar0[file] * resol  # each file's bars follow the previous file's
    gs, ge = s + shift, e + shift
    present = np.bincount(pitch, minlength=128) > 0
    pitches = np.flatnonzero(present)
    group = (np.cumsum(present) - 1)[pitch]
    by_start = np.argsort(gs, kind="stable")
    u_start, u_end = _union(gs, ge, by_start)
    pedal_start, pedal_end = _pedal_intervals(batch)
    n_p = pitches.size
    pc_group, pc_start, pc_end = _union_by_group(pitch % 12, gs, ge, by_start)
    overlap_all = _overlap_by_group(
        np.concatenate([group, np.full(u_start.size, n_p), np.full(pedal_start.size, n_p + 1), n_p + 2 + pc_group]),
        np.concatenate([gs, u_start, pedal_start, pc_start]),
        np.concatenate([ge, u_end, pedal_end, pc_end]),
        n_p + 14,
        n,
        resol,
    )
    overlap = overlap_all[:n_p].T  # (n_bars, n_pitches)
    union_time, pedal_time = overlap_all[n_p], overlap_all[n_p + 1]
    pitch_class_time = overlap_all[n_p + 2 :].sum(0)
    note_time = overlap.sum(1)
    sounding = note_time > 0
    # Overlaps are whole ticks and pitches whole numbers: these sums are exact in any order.
    pf = pitches.astype(np.float64)
    p_mean = _weighted(overlap @ pf, note_time)
    p_var = _weighted(overlap @ (pf * pf), note_time) - p_mean**2
    if n_p:
        is_on = overlap > 0
        bass = np.where(sounding, pf[np.argmax(is_on, axis=1)], 0.0)
        top = np.where(sounding, pf[n_p - 1 - np.argmax(is_on[:, ::-1], axis=1)], 0.0)
    else:
        bass = top = np.zeros(n)
    batch.set("pitch_mean", p_mean)
    batch.set("pitch_std", np.sqrt(np.maximum(p_var, 0.0)))
    batch.set("bass_pitch", bass)
    batch.set("top_pitch", top)
    batch.set("pitch_range", top - bass)
    batch.set("sounding_fraction", union_time / resol)
    batch.set("polyphony", _weighted(note_time, union_time))
    batch.set("pitch_class_polyphony", _weighted(pitch_class_time, union_time))
    batch.set("sustain_pedal_fraction", pedal_time / resol)
    chroma = overlap @ _PITCH_CLASS[pitches]
    chord_counts = _beat_chords(batch, pitch, s, e, file)
    batch.set("chord_major_fraction", _weighted(chord_counts[:, 1], chord_counts[:, 0]))
    batch.set("chord_minor_fraction", _weighted(chord_counts[:, 2], chord_counts[:, 0]))
    return note_time, union_time, chroma, chord_counts


def _onset_chroma(batch: _Batch, counted: _Counted, chroma: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Pitched notes counted once per pitch class in the bar of their onset: (n_bars, 12).

    A bar where nothing starts (a held chord) takes its sounding-time chroma, scaled to sum to 1.
    """
    pitch_class = batch.notes.pitch[~batch.notes.drum][counted.pitched] % 12
    onset = np.bincount(counted.pb * 12 + pitch_class, minlength=batch.n * 12).astype(np.float64).reshape(-1, 12)
    held = counted.n_onsets == 0
    onset[held] = _weighted(chroma[held], chroma[held].sum(1, keepdims=True))
    return onset


def _with_context(
    batch: _Batch,
    chroma: npt.NDArray[np.float64],
    onset_chroma: npt.NDArray[np.float64],
    weights: npt.NDArray[np.float64],
) -> npt.NDArray[np.float32]:
    """The base columns, their window and song pools, and the key columns of each, as float32 (n_bars, all).

    Window and song sums over both chromas, the weighted pooled columns and the distinct weights
    (`_pooling_weights`), file by file: a running sum must start at each file's first bar to give
    the same bits. The key columns of `out` are still 0 here: they are recomputed from the pooled
    chroma (sounding-time or onset) instead, so they are not summed.
    """
    out = batch.out
    n, n_base = out.shape
    n_files = len(batch.bars)
    n_pooled = len(_POOLED_COLS)
    stacked = np.concatenate([chroma, onset_chroma, out[:, _POOLED_COLS] * weights[:, _POOLED_KIND], weights], axis=1)
    window_sums, song_sums = _window_and_song_sums(batch, stacked)
    key = _key_features(
        np.concatenate(
            [chroma, window_sums[:, :12], song_sums[:, :12], onset_chroma, window_sums[:, 12:24], song_sums[:, 12:24]]
        )
    )
    m = 2 * n + n_files  # rows of one chroma's keys: bars, windows, songs
    values = np.empty((n, 3 * n_base), np.float32)
    values[:, :n_base] = out
    values[:, _KEY_COLS] = key[:n]
    values[:, _ONSET_KEY_COLS] = key[m : m + n]
    window = values[:, n_base : 2 * n_base]
    window[:, _POOLED_COLS] = _weighted(
        window_sums[:, 24 : 24 + n_pooled], window_sums[:, 24 + n_pooled + _POOLED_KIND]
    )
    window[:, _KEY_COLS] = key[n : 2 * n]
    window[:, _ONSET_KEY_COLS] = key[m + n : m + 2 * n]
    song = np.zeros((n_files, n_base))
    song[:, _POOLED_COLS] = _weighted(song_sums[:, 24 : 24 + n_pooled], song_sums[:, 24 + n_pooled + _POOLED_KIND])
    song[:, _KEY_COLS] = key[2 * n : m]
    song[:, _ONSET_KEY_COLS] = key[m + 2 * n :]
    values[:, 2 * n_base :] = song[batch.bar_file]
    return values


# The pooling weight of each column kind; chroma columns are recomputed from pooled chroma instead.
_WEIGHT_KINDS = ("bar", "sound", "union", "onset", "artic", "chord")
_KEY_COLS = np.array([_COL[k] for k in KEY_FEATURES])
_ONSET_KEY_COLS = np.array([_COL[f"onsets_{k}"] for k in KEY_FEATURES])
_CHROMA_POOLS = ("chroma", "onset_chroma")
_POOLED_COLS = np.array([i for i, (_, pool) in enumerate(_BASE.values()) if pool not in _CHROMA_POOLS])
_POOLED_KIND = np.array([_WEIGHT_KINDS.index(pool) for _, pool in _BASE.values() if pool not in _CHROMA_POOLS])


def _pooling_weights(
    n: int,
    note_time: npt.NDArray[np.float64],
    union_time: npt.NDArray[np.float64],
    n_onsets: npt.NDArray[np.float64],
    n_artic: npt.NDArray[np.float64],
    n_beats: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Per-bar weight of each kind of `_WEIGHT_KINDS` when pooled over bars: (n_bars, len(_WEIGHT_KINDS))."""
    return np.stack([np.ones(n), note_time, union_time, n_onsets, n_artic, n_beats], axis=1)


def midi_to_features(
    src: Path | str | bytes,
    *,
    name: str | None = None,
    **options: Any,
) -> tuple[BarEvents, BarFeatures]:
    """Load a MIDI file, convert it to MuseTok bars and compute their features.

    Args:
        src: path or raw bytes of a MIDI file.
        name: display name for messages (default: the file name, or the md5 for bytes).
        **options: passed to `score_to_bars` (include_drums, drop_out_of_range, drop_oov).

    Raises:
        MidiReadError: the file cannot be read. EmptyScoreError: it has no notes.
    """
    midi = load_midi(src, name=name)
    bars = score_to_bars(midi, **options)
    return bars, bar_features(midi, bars)


def feature_table(names: Sequence[str] = FEATURE_NAMES) -> str:
    """A Markdown table of the given features and their docs (for the README)."""
    rows = [f"| `{name}` | {FEATURE_DOCS[name]} |" for name in names]
    return "\n".join(["| feature | meaning |", "|---|---|", *rows])


def bar_start_times(midi: LoadedMidi, bars: BarEvents) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Where each MuseTok bar starts: in the file's own ticks and in seconds (from its tempo map).

    Returns:
        (start_tick, start_seconds), each shape (n_bars,); bar b starts at MuseTok grid tick
        (b + leading_bars_dropped) * bar_resol, converted back to the file's resolution.
    """
    grid = (np.arange(bars.n_bars, dtype=np.float64) + bars.leading_bars_dropped) * bars.bar_resol
    ticks = grid * (float(_score(midi).ticks_per_quarter) / BEAT_RESOLUTION)
    return np.rint(ticks).astype(np.int64), _seconds(midi, ticks)


REPRESENTATION = Representation(
    name="features",
    needs="features",
    description="handcrafted bar features (pitch, rhythm, harmony, dynamics), computed in the parsing workers",
)
