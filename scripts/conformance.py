"""Replay MuseTok's golden event records against midiva.events and print the conformance rates.

Usage: python scripts/conformance.py [--shared ../shared]

For every `ok` record the events, bar starts, token ids and leading-bar count must be identical
(the 4 `tie_order_ambiguous` synthetic files only after sorting same-(bar, Beat, Pitch) notes by
duration, SPEC §2.1). For every `oov`/`error` record, the strict options must raise the typed
error of MuseTok's failing stage, and the defaults either raise the same typed error (unreadable
or empty files) or convert the file with counts in the report that explain the change.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from midiva.errors import EmptyScoreError, MidiReadError, MidivaError, VocabularyError
from midiva.events import BarEvents, _musetok_events, midi_to_bars
from midiva.midi import load_midi

REPO = Path(__file__).resolve().parents[1]
STRICT = {"drop_oov": False, "drop_out_of_range": False}


def golden_sets(shared: Path) -> dict[str, tuple[Path, Path]]:
    """Reference file -> (its .jsonl.gz, the folder holding its MIDI files)."""
    ref = shared / "reference" / "musetok"
    return {
        "emopia": (ref / "events_emopia.jsonl.gz", shared / "data" / "emopia" / "midis"),
        "gigamidi_sample": (ref / "events_gigamidi_sample.jsonl.gz", shared / "data" / "gigamidi_sample"),
        "synthetic": (ref / "events_synthetic.jsonl.gz", ref / "synthetic_midis"),
    }


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt") as f:
        for line in f:
            yield json.loads(line)


def expected_error(record: dict[str, Any]) -> type[MidivaError] | None:
    """The midiva error for MuseTok's failure, or None where midiva reads the file (tempo 0)."""
    if record["error_type"] == "ZeroDivisionError":
        return None
    if record["error_stage"] == "midi_analyzer":
        return EmptyScoreError if "empty" in record["error"] else MidiReadError
    return VocabularyError


def sorted_ties(bars: list[list[str]]) -> list[list[str]]:
    """Each bar's notes with same-(Beat, Pitch) runs sorted by duration (tie-order-free form)."""
    out = []
    for events in bars:
        head, notes, tail = events[:1], events[1:], []
        while notes and not notes[-1].startswith("Note_Duration"):
            tail.insert(0, notes.pop())
        triples = [tuple(notes[i : i + 3]) for i in range(0, len(notes), 3)]
        runs: list[list[tuple[str, ...]]] = []
        for t in triples:
            if runs and runs[-1][0][:2] == t[:2]:
                runs[-1].append(t)
            else:
                runs.append([t])
        flat = [e for run in runs for t in sorted(run, key=lambda t: int(t[2].rsplit("_", 1)[1])) for e in t]
        out.append(head + flat + tail)
    return out


def split_bars(events: list[str], bar_starts: list[int]) -> list[list[str]]:
    bounds = [*bar_starts, len(events)]
    return [events[s:e] for s, e in itertools.pairwise(bounds)]


def same_as_golden(bars: BarEvents, record: dict[str, Any]) -> bool:
    return (
        bars.events == record["events"]
        and bars.bar_starts == record["bar_starts"]
        and bars.token_ids == record["token_ids"]
        and bars.leading_bars_dropped == record["leading_bars_dropped"]
    )


def check_ok(record: dict[str, Any], midi_dir: Path) -> str:
    """'identical', 'tie_equal' (ambiguous tie order, equal once sorted) or 'differs: ...'."""
    try:
        bars = midi_to_bars(midi_dir / record["file"])
    except MidivaError as err:
        return f"differs: {type(err).__name__}: {err}"
    if same_as_golden(bars, record):
        return "identical"
    if record.get("tie_order_ambiguous") and (
        sorted_ties(split_bars(bars.events, bars.bar_starts))
        == sorted_ties(split_bars(record["events"], record["bar_starts"]))
        and bars.leading_bars_dropped == record["leading_bars_dropped"]
    ):
        return "tie_equal"
    return "differs: events"


def check_failure(record: dict[str, Any], midi_dir: Path) -> tuple[bool, bool, str]:
    """(strict raised the expected typed error, defaults improved on MuseTok, description)."""
    path = midi_dir / record["file"]
    expected = expected_error(record)
    try:
        midi_to_bars(path, **STRICT)
        strict_error: MidivaError | None = None
    except MidivaError as err:
        strict_error = err
    typed = type(strict_error) is expected if expected else strict_error is None
    if typed and record["status"] == "oov":  # MuseTok's own events, and the first missing event
        typed = _musetok_events(load_midi(path)) == record["events"] and record["error"] in str(strict_error)
    if typed and record["error_stage"] == "corpus2events":
        typed = record["error"] in str(strict_error)
    try:
        bars = midi_to_bars(path)
    except MidivaError as err:
        return typed, False, f"{type(err).__name__} with defaults"
    report = bars.report
    explained = (
        expected is None
        or (report.dropped_out_of_range_pitches if record["error_stage"] == "corpus2events" else report.oov_events) > 0
    )
    changes = {k: v for k, v in report.to_dict().items() if v and k not in ("n_notes", "leading_bars_dropped")}
    return typed, explained, f"converted with defaults, report {changes}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="shared data folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every failure record")
    args = parser.parse_args(argv)
    n_ok = n_identical = n_tie = n_tie_equal = n_fail = n_typed = n_improved = 0
    for name, (records, midi_dir) in golden_sets(args.shared).items():
        counts: Counter[str] = Counter()
        for record in read_records(records):
            if record["status"] == "ok":
                outcome = check_ok(record, midi_dir)
                counts[outcome.split(":")[0]] += 1
                if record.get("tie_order_ambiguous"):
                    n_tie += 1
                    n_tie_equal += outcome in ("identical", "tie_equal")
                else:
                    n_ok += 1
                    n_identical += outcome == "identical"
                if outcome.startswith("differs"):
                    print(f"  {name}/{record['file']}: {outcome}")
            else:
                typed, improved, what = check_failure(record, midi_dir)
                n_fail += 1
                n_typed += typed
                n_improved += improved
                counts["failure_typed" if typed else "failure_untyped"] += 1
                if args.verbose or not typed:
                    print(
                        f"  {name}/{record['file']} ({record['status']}, {record['error_type']}): "
                        f"typed={typed} improved={improved}; {what}"
                    )
        print(f"{name}: {dict(counts)}")
    print(
        f"ok-records identical: {n_identical}/{n_ok} (+ tie_order_ambiguous equal after sorting ties: "
        f"{n_tie_equal}/{n_tie}); failures: typed {n_typed}/{n_fail}, improved {n_improved}"
    )
    return 0 if n_identical == n_ok and n_tie_equal == n_tie and n_typed == n_fail else 1


if __name__ == "__main__":
    sys.exit(main())
