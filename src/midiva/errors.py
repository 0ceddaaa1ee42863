"""Typed errors of every stage: each message says what happened, to which input, and what to do."""

from __future__ import annotations


class MidivaError(Exception):
    """Base class of every error midiva raises on purpose; batches record it and go on."""


class MidiReadError(MidivaError):
    """The bytes are not a readable MIDI file (corrupt, truncated, zero-length, too large)."""


class EmptyScoreError(MidivaError):
    """The MIDI file parsed but holds no notes to tokenize (after the chosen filtering)."""


class VocabularyError(MidivaError):
    """An event (time signature, onset slot, pitch) is outside MuseTok's vocabulary."""


class CheckpointError(MidivaError):
    """A checkpoint is missing, unreadable, or of the wrong architecture."""


class ConfigError(MidivaError):
    """A setting, config file or environment variable has an invalid value."""


class DataError(MidivaError):
    """A data set, split, label file or representation is missing or inconsistent."""


class OutputError(MidivaError):
    """An output path cannot be written (read-only, full disk, wrong format)."""


class SourceError(MidivaError):
    """An input source (hub data set, parquet, directory) cannot be opened or read."""


class OutputLockedError(OutputError):
    """Another live process writes the same output (its lock names the holder's PID and host)."""


class WorkerCrash(MidivaError):
    """A worker process died while handling one file (a segfault in the MIDI parser, the OOM killer)."""
