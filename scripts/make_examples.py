"""Compose the example MIDI files shipped in `src/midiva/assets/examples/` (made here, from code).

Five short pieces with contrasting character, for the README's first command:
  bright_fast_major.mid   C major, 148 bpm, running eighths over I-V-vi-IV, high register, loud
  slow_minor.mid          A minor, 58 bpm, sparse low chords and a falling line, soft
  tense_fast_minor.mid    E minor, 168 bpm, chromatic ostinato, diminished chords, accents
  calm_major.mid          F major, 72 bpm, arpeggiated I-IV-ii-V, mid register, gentle
  band_with_drums.mid     G major, 120 bpm, piano + bass + drum kit (channel 10), 4 tracks

Run `python scripts/make_examples.py` (deterministic: the same bytes every time).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import symusic

TPQ = 480
BAR = 4 * TPQ
OUT = Path(__file__).resolve().parents[1] / "src" / "midiva" / "assets" / "examples"

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)


def chord(root: int, scale: tuple[int, ...], degree: int, size: int = 3) -> list[int]:
    """Pitches of the triad (or seventh) on `degree` (0-based) of the scale rooted at `root`."""
    out = []
    for k in range(size):
        step = degree + 2 * k
        out.append(root + scale[step % 7] + 12 * (step // 7))
    return out


def new_score(bpm: float, numerator: int = 4) -> symusic.Score:
    score = symusic.Score(TPQ)
    score.tempos.append(symusic.Tempo(0, bpm))
    score.time_signatures.append(symusic.TimeSignature(0, numerator, 4))
    return score


def track(score: symusic.Score, name: str, program: int, is_drum: bool = False) -> symusic.Track:
    score.tracks.append(symusic.Track(name, program, is_drum))
    return score.tracks[-1]


def add(tr: symusic.Track, time: int, duration: int, pitch: int, velocity: int) -> None:
    tr.notes.append(symusic.Note(time, duration, pitch, velocity))


def bright_fast_major() -> symusic.Score:
    score = new_score(148)
    melody, harmony = track(score, "melody", 0), track(score, "chords", 0)
    degrees = (0, 4, 5, 3) * 2
    for bar, degree in enumerate(degrees):
        start = bar * BAR
        for pitch in chord(60, MAJOR, degree):
            add(harmony, start, BAR // 2, pitch, 88)
            add(harmony, start + BAR // 2, BAR // 2, pitch, 80)
        tones = chord(72, MAJOR, degree, 4)
        for i in range(8):  # running eighths up and down the chord
            add(melody, start + i * TPQ // 2, TPQ // 2, tones[(0, 1, 2, 3, 2, 1, 2, 3)[i]], 104 - 4 * (i % 2))
    return score


def slow_minor() -> symusic.Score:
    score = new_score(58)
    low, line = track(score, "left hand", 0), track(score, "right hand", 0)
    degrees = (0, 5, 3, 4, 0, 3, 4, 0)
    falling = (76, 74, 72, 71, 69, 67, 65, 64)
    for bar, degree in enumerate(degrees):
        start = bar * BAR
        for pitch in chord(45, MINOR, degree):
            add(low, start, BAR, pitch, 42)
        add(line, start, 3 * TPQ, falling[bar] - 12, 50)
        add(line, start + 3 * TPQ, TPQ, falling[bar] - 13, 44)
    return score


def tense_fast_minor() -> symusic.Score:
    score = new_score(168)
    ostinato, stabs = track(score, "ostinato", 0), track(score, "stabs", 0)
    cells = (52, 53, 52, 58, 52, 53, 59, 58)  # minor second and tritone against the tonic
    for bar in range(8):
        start = bar * BAR
        for i in range(16):
            add(ostinato, start + i * TPQ // 4, TPQ // 4, cells[i % 8] + (bar % 2), 96 + 16 * (i % 4 == 0))
        root = 64 + (bar % 4)
        for beat in (0, 3):
            for pitch in (root, root + 3, root + 6, root + 9):  # diminished seventh
                add(stabs, start + beat * TPQ + (TPQ // 2 if beat else 0), TPQ // 3, pitch, 118)
    return score


def calm_major() -> symusic.Score:
    score = new_score(72, numerator=3)
    arpeggio, tune = track(score, "arpeggio", 0), track(score, "tune", 0)
    bar_ticks = 3 * TPQ
    degrees = (0, 3, 1, 4, 0, 3, 4, 0)
    for bar, degree in enumerate(degrees):
        start = bar * bar_ticks
        tones = chord(53, MAJOR, degree)
        for i, pitch in enumerate((*tones, tones[1] + 12, tones[2], tones[1])):
            add(arpeggio, start + i * TPQ // 2, TPQ if i < 5 else TPQ // 2, pitch, 56)  # ends with the bar
        add(tune, start, 2 * TPQ, chord(65, MAJOR, degree)[2], 64)
        add(tune, start + 2 * TPQ, TPQ, chord(65, MAJOR, degree)[1], 58)
    return score


def band_with_drums() -> symusic.Score:
    score = new_score(120)
    piano, bass = track(score, "piano", 0), track(score, "bass", 33)
    lead, drums = track(score, "lead", 81), track(score, "drums", 0, is_drum=True)
    degrees = (0, 4, 5, 3, 0, 4, 3, 4)
    for bar, degree in enumerate(degrees):
        start = bar * BAR
        triad = chord(55, MAJOR, degree)
        for beat in range(4):
            for pitch in triad:
                add(piano, start + beat * TPQ + TPQ // 2, TPQ // 2, pitch, 76)
            add(bass, start + beat * TPQ, TPQ // 2, triad[0] - 24 + (7 if beat % 2 else 0), 92)
            add(drums, start + beat * TPQ, TPQ // 4, 36 if beat % 2 == 0 else 38, 100)  # kick / snare
            for half in range(2):
                add(drums, start + beat * TPQ + half * TPQ // 2, TPQ // 4, 42, 70)  # closed hi-hat
        melody = chord(67, MAJOR, degree, 4)
        for i, pitch in enumerate((melody[0], melody[1], melody[2], melody[1])):
            add(lead, start + i * TPQ, TPQ - 40, pitch, 90)
    return score


PIECES = {
    "bright_fast_major": bright_fast_major,
    "slow_minor": slow_minor,
    "tense_fast_minor": tense_fast_minor,
    "calm_major": calm_major,
    "band_with_drums": band_with_drums,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="output directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, compose in PIECES.items():
        path = args.out / f"{name}.mid"
        compose().dump_midi(path)
        print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
