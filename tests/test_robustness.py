"""The authoring-robustness suite on a handful of clips: variants, failures, medleys, real files."""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from midiva import authoring as A
from midiva.annotate import load_annotation_model
from midiva.emopia import list_emopia
from midiva.events import score_to_bars
from midiva.labels import DEFAULT_LABEL_MAPPING, QUADRANTS
from midiva.midi import load_midi
from midiva.robustness import (
    LabelledClip,
    bar_predictor,
    build_medleys,
    file_sensitivity,
    score_medleys,
    score_variants,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips(emopia_dir: Path) -> list[LabelledClip]:
    listing = list_emopia(emopia_dir, ["val"])
    chosen = listing.clips[:: max(1, len(listing.clips) // 8)][:8]
    return [LabelledClip(c.name, c.song, c.quadrant, c.path.read_bytes()) for c in chosen]


@pytest.fixture(scope="module")
def predict():  # type: ignore[no-untyped-def]
    return bar_predictor(load_annotation_model(None, device="cpu"))


def test_identity_variant_has_no_delta_and_failures_are_counted(clips: list[LabelledClip], predict) -> None:  # type: ignore[no-untyped-def]
    def identity(score, rng):  # type: ignore[no-untyped-def]
        return score

    variants = {"identity": identity, "no_notes_left": A.transposed(200), "flat": A.constant_velocity(64)}
    scores = score_variants(predict, clips, variants, DEFAULT_LABEL_MAPPING)
    by_name = {s.variant: s for s in scores}
    assert [s.variant for s in scores] == ["original", "identity", "no_notes_left", "flat"]
    assert by_name["identity"].mean_abs_delta_valence == pytest.approx(0.0, abs=1e-6)
    assert by_name["identity"].metrics == pytest.approx(by_name["original"].metrics)
    failed = by_name["no_notes_left"]
    assert failed.n_clips == 0 and failed.n_failed == len(clips) and failed.failures == {"DataError": len(clips)}
    assert by_name["flat"].n_clips == len(clips)
    assert 0.0 <= by_name["flat"].metrics["quadrant_accuracy"] <= 1.0


def test_medleys_join_clips_at_bar_lines(clips: list[LabelledClip]) -> None:
    medleys = build_medleys(clips, 6, seed=3)
    assert medleys
    for medley in medleys:
        bars = score_to_bars(load_midi(medley.data))
        assert bars.n_bars == len(medley.bar_quadrants), "every MuseTok bar of the medley has its segment's label"
        starts = [0, *medley.boundaries]
        quads = [medley.bar_quadrants[s] for s in starts]
        assert all(a != b for a, b in itertools.pairwise(quads)), "neighbouring segments differ in quadrant"
    again = build_medleys(clips, 6, seed=3)
    assert [m.data for m in again] == [m.data for m in medleys]


def test_medley_scores_accuracy_and_lag(clips: list[LabelledClip]) -> None:
    medleys = build_medleys(clips, 4, seed=1)
    by_data = {m.data: m for m in medleys}
    points = np.array([DEFAULT_LABEL_MAPPING[q] for q in QUADRANTS], np.float32)

    def perfect(data: bytes) -> np.ndarray:
        return points[[QUADRANTS.index(q) for q in by_data[data].bar_quadrants]]

    def late(data: bytes) -> np.ndarray:  # follows each change two bars late
        q = [QUADRANTS.index(x) for x in by_data[data].bar_quadrants]
        return points[q[:2] + q[:-2]]

    exact = score_medleys(perfect, medleys)
    assert (
        exact.bar_quadrant_accuracy == 1.0
        and exact.median_lag_bars == 0
        and exact.n_boundaries == sum(len(m.boundaries) for m in medleys)
    )
    lagged = score_medleys(late, medleys)
    assert lagged.median_lag_bars == 2 and lagged.bar_quadrant_accuracy < 1.0


def test_file_sensitivity_on_real_files(gigamidi_sample: Path, predict) -> None:  # type: ignore[no-untyped-def]
    names = ["Funkytown.mid", "Maestro_1.mid"]
    result = {s.name: s for s in file_sensitivity(predict, {n: (gigamidi_sample / n).read_bytes() for n in names})}
    assert set(result) == set(names)
    assert result["Maestro_1.mid"].delta_valence_no_drums == 0.0, "a file without drums does not change without them"
    assert all(np.isfinite([s.delta_valence_flat_velocity, s.delta_arousal_no_drums]).all() for s in result.values())


def test_domain_distance_is_recorded_or_left_empty_with_one_warning(
    tmp_path: Path, gigamidi_sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    from midiva.cli import main
    from midiva.model import load_regressor, save_regressor

    files = [str(gigamidi_sample / n) for n in ("Funkytown.mid", "Maestro_1.mid", "POP909_008.mid")]
    assert main(["-q", "annotate", *files, "--out", str(tmp_path / "a" / "annotations.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "a" / "annotations.meta.csv").open()))
    assert all(float(r["domain_distance"]) > 0 for r in rows)
    legacy = load_regressor()
    legacy.metadata.pop("domain")
    save_regressor(tmp_path / "legacy.safetensors", legacy)
    capsys.readouterr()
    assert (
        main(
            [
                "annotate",
                *files,
                "--model",
                str(tmp_path / "legacy.safetensors"),
                "--out",
                str(tmp_path / "b" / "annotations.csv"),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "b" / "annotations.meta.csv").open()))
    assert [r["domain_distance"] for r in rows] == ["", "", ""]
    assert capsys.readouterr().err.count("training-domain reference") == 1, "one warning per run, not per file"


def test_benchmark_script_writes_its_tables(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import authoring as bench  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    assert bench.main(["--max-clips", "8", "--medleys", "4", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "authoring.md").read_text()
    for name in (
        "original",
        "velocity_100",
        "retimed_90bpm_96tpq",
        "tracks_octave_doublings",
        "drums_added",
        "notated_durations",
        "medleys:",
    ):
        assert name in text


def test_feature_drivers_neutralise_each_feature_of_a_features_model(
    gigamidi_sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The drivers script: the file's mean is the one `midiva.predict` gives, every input column belongs to one
    base feature, and neutralising a feature the file is unusual on moves its reading."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import feature_drivers as bench  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    from midiva.model import load_regressor
    from midiva.prediction import predict

    files = [gigamidi_sample / "Funkytown.mid", gigamidi_sample / "empty.mid"]
    assert bench.main([*map(str, files), "--json", "--top", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["file"] for s in out["skipped"]] == ["empty.mid"]
    (result,) = out["files"]
    preds = predict(files[0])
    assert result["valence"] == pytest.approx(float(np.mean(preds.valence)), abs=1e-5)
    assert result["arousal"] == pytest.approx(float(np.mean(preds.arousal)), abs=1e-5)
    groups = bench.feature_groups(load_regressor())
    assert sorted(c for cols in groups.values() for c in cols) == list(range(88))
    assert {d["feature"] for d in result["drivers"]} == set(groups)
    assert max(abs(d["delta_valence"]) for d in result["drivers"]) > 0.05


@pytest.mark.parametrize("backend", ["musetok", "hybrid"])
def test_suite_scores_musetok_and_hybrid_models(
    backend: str, clips: list[LabelledClip], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import torch

    from midiva.features import FEATURE_NAMES
    from midiva.latents import load_encoder
    from midiva.model import InputRecipe, Regressor, VARegressor, save_regressor

    torch.manual_seed(0)
    encoder = load_encoder(tiny_checkpoint)
    names = tuple(FEATURE_NAMES) if backend == "hybrid" else ()
    recipe = InputRecipe(backend, names, encoder.config.d_latent, ("window4",))
    path = save_regressor(tmp_path / "m.safetensors", Regressor(VARegressor(recipe.input_dim, 16).eval(), recipe))
    predict = bar_predictor(load_annotation_model(path, checkpoint=tiny_checkpoint, device="cpu"))
    variants = {"flat": A.constant_velocity(100), "doubled": A.spread_tracks(doublings=True)}
    scores = score_variants(predict, clips[:4], variants, DEFAULT_LABEL_MAPPING)
    assert [s.n_clips for s in scores] == [4, 4, 4]
    assert scores[2].mean_abs_delta_valence > 0, "the tokens see the doublings, so a random model's predictions move"
    medleys = build_medleys(clips, 2, seed=0)
    assert score_medleys(predict, medleys).n_bars == sum(len(m.bar_quadrants) for m in medleys)


README_VARIANT_ROW = re.compile(
    r"^\| ([a-z][a-z_0-9+\-]*) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", re.MULTILINE
)


def test_readme_model_card_quotes_the_robustness_suite(repo_dir: Path, emopia_dir: Path, gigamidi_sample: Path) -> None:
    """The model card's authoring table (val quadrant and arousal-sign accuracy, mean |Δ| V and A, test quadrant
    accuracy) matches what the suite measures for the bundled model, on the rows that matter most for band MIDI."""
    readme = (repo_dir / "README.md").read_text(encoding="utf-8")
    rows = {m[1]: [float(x) for x in m.groups()[1:]] for m in README_VARIANT_ROW.finditer(readme)}
    names = ("drums_added", "band_backing", "sequenced_band", "tracks_octave_doublings")
    assert {"original", *names} <= set(rows)
    model = load_annotation_model(None, device="cpu")
    predict = bar_predictor(model)
    variants = A.evaluation_variants(A.load_drum_patterns(sorted(gigamidi_sample.glob("*.mid"))))
    measured: dict[str, list[float]] = {}
    for split in ("val", "test"):
        clips = [
            LabelledClip(c.name, c.song, c.quadrant, c.path.read_bytes())
            for c in list_emopia(emopia_dir, [split]).clips
        ]
        for s in score_variants(predict, clips, {n: variants[n] for n in names}, model.regressor.label_mapping):
            values = [
                s.metrics["quadrant_accuracy"],
                s.metrics["arousal_sign_accuracy"],
                s.mean_abs_delta_valence,
                s.mean_abs_delta_arousal,
            ]
            measured[s.variant] = values if split == "val" else [*measured[s.variant], values[0]]
    for name, quoted in rows.items():
        if name in measured:
            assert quoted == pytest.approx(measured[name], abs=5e-4), name
