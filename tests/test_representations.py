"""Representations as a registry: built-ins resolve lazily, recipes combine them, and a representation
defined outside midiva (`toy_representation`: one module and its registration) works end to end —
preprocess, train, annotate and resume — without a line changed anywhere else."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import toy_representation
from midiva import representations
from midiva.annotate import AnnotateOptions, annotate_stream, load_annotation_model
from midiva.cli import main
from midiva.errors import ConfigError
from midiva.ledger import output_paths, scan_ledger
from midiva.model import InputRecipe
from midiva.preprocess import preprocess_emopia
from midiva.sources import iter_files, list_midi_files
from midiva.train import TrainConfig, train_from_dir


def test_builtins_aliases_and_recipes() -> None:
    assert [r.name for r in representations.recipe("hybrid")] == ["features", "musetok"]
    assert [r.name for r in representations.recipe("features+toy")] == ["features", "toy"]
    assert representations.needs_of("hybrid") == {"features", "tokens"}
    assert representations.get("musetok").store_key == "latents" and representations.get("musetok").batched
    assert not representations.get("features").batched
    assert {"features", "musetok", "hybrid", "toy"} <= set(representations.backend_names())
    with pytest.raises(ConfigError, match="unknown bar representation 'nope'; known: features, musetok"):
        representations.recipe("features+nope")
    with pytest.raises(ConfigError, match="names a representation twice"):
        representations.recipe("features+features")
    with pytest.raises(ConfigError, match="already registered"):
        representations.register(representations.Representation("toy", "tokens"))
    with pytest.raises(ConfigError, match="needs must be one of"):
        representations.Representation("odd", "audio")


def test_an_input_recipe_places_each_block_and_names_a_missing_one() -> None:
    recipe = InputRecipe("features+toy", ("a", "b"), dims=(("toy", 2),), context=("mean",))
    assert recipe.input_dim == 8 and recipe.to_dict()["dims"] == {"toy": 2}
    assert InputRecipe.from_dict(recipe.to_dict()) == recipe
    assert "dims" not in InputRecipe("features", ("a",)).to_dict(), "the built-in recipes' saved form is unchanged"
    features = np.arange(6, dtype=np.float32).reshape(3, 2)
    toy = np.full((3, 2), 7, np.float32)
    built = recipe.build(features, None, ("a", "b"), {"toy": toy})
    np.testing.assert_array_equal(built[:, :4], np.concatenate([features, toy], axis=1))
    with pytest.raises(Exception, match="needs toy blocks"):
        recipe.build(features, None, ("a", "b"))
    with pytest.raises(Exception, match=r"toy blocks have shape \(3, 5\)"):
        recipe.build(features, None, ("a", "b"), {"toy": np.zeros((3, 5), np.float32)})


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_a_registered_representation_is_preprocessed_trained_and_annotated(
    tmp_path: Path, emopia_subset: Any, gigamidi_sample: Path
) -> None:
    small = emopia_subset(tmp_path / "emopia", {"train": 12, "val": 4, "test": 2})
    data = tmp_path / "data"
    summary = preprocess_emopia(small, data, backend="features+toy", progress=False)
    assert summary.n_written == 18 and summary.n_failed == 0
    assert main(["-q", "prepare-labels", "--data", str(data)]) == 0
    outcome = train_from_dir(data, tmp_path / "toy.safetensors", config=TrainConfig(max_epochs=2, patience=2))
    assert outcome.result.regressor.backend == "features+toy" and dict(outcome.result.regressor.recipe.dims) == {
        "toy": 2
    }

    model = load_annotation_model(tmp_path / "toy.safetensors", device="cpu")
    encoder: Any = model.encoders["toy"]
    assert isinstance(encoder, toy_representation.ToyEncoder)
    files = list_midi_files([gigamidi_sample])[:8]
    out = tmp_path / "a.csv"
    run = annotate_stream(
        iter_files(files), out, model.regressor, encoders=model.encoders, options=AnnotateOptions(progress=False)
    )
    assert run.files_done + run.files_failed == 8 and run.files_done >= 6
    assert len(encoder.calls) < run.files_done, "bars of several files share an encode call"
    state = scan_ledger(output_paths(out).ledger)
    assert (
        state is not None and state.fingerprint["toy_version"] == "1" and state.fingerprint["backend"] == "features+toy"
    )
    values = np.array([[float(r["valence"]), float(r["arousal"])] for r in _rows(out)])
    assert len(values) == run.bars and np.abs(values).max() <= 1.0
    other = {"toy": toy_representation.ToyEncoder(version="2")}
    with pytest.raises(ConfigError, match="toy_version: '1' then, '2' now"):
        annotate_stream(
            iter_files(files), out, model.regressor, encoders=other, options=AnnotateOptions(progress=False)
        )


def test_the_runner_fingerprints_the_model_itself_and_batch_size_does_not_change_bytes(
    tmp_path: Path, gigamidi_sample: Path
) -> None:
    """A Python caller resuming with another regressor is refused, naming the model; --batch-size leaves
    the features backend's bytes unchanged (the regressor always sees the same chunk shape)."""
    import dataclasses

    import torch

    from midiva.model import load_regressor

    files = list_midi_files([gigamidi_sample])[:6]
    bundled = load_regressor()
    out = {}
    for batch_size in (1, 4096):
        out[batch_size] = tmp_path / f"b{batch_size}.csv"
        annotate_stream(
            iter_files(files), out[batch_size], bundled, options=AnnotateOptions(batch_size=batch_size, progress=False)
        )
    assert out[1].read_bytes() == out[4096].read_bytes()
    module = load_regressor().module
    with torch.no_grad():
        next(iter(module.parameters())).add_(0.01)
    changed = dataclasses.replace(bundled, module=module, source="")
    assert changed.sha256 != bundled.sha256
    with pytest.raises(ConfigError, match=r"model_sha256: '[0-9a-f]{64}' then, '[0-9a-f]{64}' now"):
        annotate_stream(iter_files(files), out[1], changed, options=AnnotateOptions(progress=False))
