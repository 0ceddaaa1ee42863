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
    "MidivaError": "midiva.errors",
    "load_midi": "midiva.midi",
    "LoadedMidi": "midiva.midi",
    "score_to_bars": "midiva.events",
    "midi_to_bars": "midiva.events",
    "BarEvents": "midiva.events",
    "ConversionReport": "midiva.events",
    "build_vocabulary": "midiva.events",
    "bar_features": "midiva.features",
    "midi_to_features": "midiva.features",
    "BarFeatures": "midiva.features",
    "FEATURE_NAMES": "midiva.features",
    "load_encoder": "midiva.latents",
    "encode_bars": "midiva.latents",
    "EncodedBars": "midiva.latents",
    "load_regressor": "midiva.model",
    "Regressor": "midiva.model",
    "train_from_dir": "midiva.train",
    "evaluate_model": "midiva.train",
    "annotate_stream": "midiva.annotate",
    "load_annotation_model": "midiva.annotate",
    "predict": "midiva.prediction",
    "predict_files": "midiva.prediction",
    "BarPredictions": "midiva.prediction",
    "compute_stats": "midiva.analysis",
}

if TYPE_CHECKING:  # pragma: no cover
    from midiva.analysis import compute_stats
    from midiva.annotate import annotate_stream, load_annotation_model
    from midiva.errors import MidivaError
    from midiva.events import (
        BarEvents,
        ConversionReport,
        build_vocabulary,
        midi_to_bars,
        score_to_bars,
    )
    from midiva.features import FEATURE_NAMES, BarFeatures, bar_features, midi_to_features
    from midiva.latents import EncodedBars, encode_bars, load_encoder
    from midiva.midi import LoadedMidi, load_midi
    from midiva.model import Regressor, load_regressor
    from midiva.prediction import BarPredictions, predict, predict_files
    from midiva.train import evaluate_model, train_from_dir


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'midiva' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "FEATURE_NAMES",
    "BarEvents",
    "BarFeatures",
    "BarPredictions",
    "ConversionReport",
    "EncodedBars",
    "LoadedMidi",
    "MidivaError",
    "Regressor",
    "__version__",
    "annotate_stream",
    "bar_features",
    "build_vocabulary",
    "compute_stats",
    "encode_bars",
    "evaluate_model",
    "load_annotation_model",
    "load_encoder",
    "load_midi",
    "load_regressor",
    "midi_to_bars",
    "midi_to_features",
    "predict",
    "predict_files",
    "score_to_bars",
    "train_from_dir",
]
