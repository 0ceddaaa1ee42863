"""midiva: bar-level valence and arousal for symbolic music.

MIDI (path or bytes) -> MuseTok REMI events per bar -> bar features and/or MuseTok latents
-> an EMOPIA-trained MLP -> valence and arousal in [-1, 1] per bar.

Importing midiva does not import torch; the heavy stages are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it; resolved lazily so `import midiva` stays light.
_LAZY = {
    "load_midi": "midiva.midi",
    "LoadedMidi": "midiva.midi",
    "score_to_bars": "midiva.events",
    "midi_to_bars": "midiva.events",
    "BarEvents": "midiva.events",
    "ConversionReport": "midiva.events",
    "build_vocabulary": "midiva.events",
    "bar_features": "midiva.features",
    "FEATURE_NAMES": "midiva.features",
    "MidivaError": "midiva.errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from midiva.errors import MidivaError
    from midiva.events import BarEvents, ConversionReport, build_vocabulary, midi_to_bars, score_to_bars
    from midiva.features import FEATURE_NAMES, bar_features
    from midiva.midi import LoadedMidi, load_midi


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'midiva' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["__version__", *_LAZY]
