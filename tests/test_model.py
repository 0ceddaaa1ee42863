"""The regressor: MLP, input recipe, checkpoint round trip, bad checkpoints, metrics by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from midiva.errors import CheckpointError, DataError
from midiva.labels import DEFAULT_LABEL_MAPPING, check_label_mapping
from midiva.metrics import ccc, level_metrics, masked_metrics, pearson, quadrant_of
from midiva.model import InputRecipe, Regressor, VARegressor, load_regressor, save_regressor

NAMES = ("a", "b", "c")


def _regressor(recipe: InputRecipe, *, tanh: bool = True, seed: int = 0) -> Regressor:
    torch.manual_seed(seed)
    module = VARegressor(recipe.input_dim, tanh=tanh).eval()
    module.set_normalisation(np.arange(recipe.input_dim, dtype=np.float32), np.full(recipe.input_dim, 2.0))
    return Regressor(module, recipe, dict(DEFAULT_LABEL_MAPPING), {"metrics": {"val": {"clip.mae_valence": 0.25}}})


def test_hidden_dim_defaults_to_half_the_input() -> None:
    assert VARegressor(10).hidden_dim == 5
    assert VARegressor(1).hidden_dim == 1
    assert VARegressor(10, 7).hidden_dim == 7


def test_outputs_stay_in_range_with_and_without_tanh() -> None:
    recipe = InputRecipe("features", NAMES)
    x = np.random.default_rng(0).normal(scale=1000.0, size=(50, 3)).astype(np.float32)
    for tanh in (True, False):
        reg = _regressor(recipe, tanh=tanh)
        with torch.no_grad():
            reg.module.out.weight.mul_(100.0)  # make raw outputs far outside [-1, 1]
        y = reg.predict(x)
        assert y.shape == (50, 2) and y.dtype == np.float32
        assert np.all(np.abs(y) <= 1.0)
        raw = reg.module(torch.from_numpy(x)).detach().numpy()
        assert (np.abs(raw) > 1).any() != tanh  # without tanh the raw output escapes; predict clips it


def test_each_bar_is_predicted_on_its_own_as_the_module_would() -> None:
    for activation in ("relu", "gelu"):
        torch.manual_seed(3)
        module = VARegressor(3, 16, activation=activation, output_scale=0.8).eval()
        module.set_normalisation(np.array([1.0, -2.0, 0.5]), np.array([2.0, 0.0, 3.0]))
        reg = Regressor(module, InputRecipe("features", NAMES))
        x = np.random.default_rng(1).normal(scale=4.0, size=(301, 3)).astype(np.float32)
        together = reg.predict(x)
        alone = np.concatenate([reg.predict(x[i : i + 1]) for i in range(len(x))])
        assert np.array_equal(together, alone), "a bar's prediction must not depend on the bars beside it"
        assert np.array_equal(reg.predict(x[7:40]), together[7:40])
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(together, expected, atol=2e-6)
        assert np.abs(together).max() <= 0.8


def test_the_predictor_travels_without_torch() -> None:
    import pickle

    reg = _regressor(InputRecipe("features", NAMES))
    predictor = pickle.loads(pickle.dumps(reg.predictor))
    x = np.random.default_rng(2).normal(size=(9, 3)).astype(np.float32)
    made = predictor.make_inputs(x, feature_names=NAMES)
    assert np.array_equal(predictor.predict(made), reg.predict(reg.make_inputs(x, feature_names=NAMES)))
    assert all(isinstance(v, np.ndarray) for v in (predictor.head.w1, predictor.head.mean))
    assert predictor.domain_distance(x) is None  # this model records no training-domain reference


def test_normalisation_is_part_of_the_module() -> None:
    module = VARegressor(2, dropout=0.0, tanh=False).eval()
    module.set_normalisation(np.array([10.0, -5.0]), np.array([2.0, 0.0]))
    assert module.input_std.tolist() == [2.0, math.inf]
    x = torch.tensor([[10.0, -5.0]])
    with torch.no_grad():
        expected = module.out(module.act(module.hidden(torch.zeros(1, 2))))
        np.testing.assert_allclose(module(x).numpy(), expected.numpy(), atol=1e-6)
        # a column that was constant in training is ignored: any value gives the same output
        far = torch.tensor([[10.0, 1e6], [10.0, -30.0]])
        np.testing.assert_allclose(module(far).numpy(), np.repeat(expected.numpy(), 2, 0), atol=1e-6)


def test_save_load_round_trip(tmp_path: Path) -> None:
    recipe = InputRecipe("hybrid", ("b", "a"), latent_dim=4, context=("mean", "window2"))
    reg = _regressor(recipe, tanh=False)
    path = save_regressor(tmp_path / "m.safetensors", reg)
    loaded = load_regressor(path)
    assert loaded.recipe == recipe and loaded.backend == "hybrid"
    assert loaded.label_mapping == DEFAULT_LABEL_MAPPING
    assert loaded.metrics == {"val": {"clip.mae_valence": 0.25}}
    assert loaded.module.architecture() == reg.module.architecture()
    rng = np.random.default_rng(2)
    feats, lats = rng.normal(size=(9, 3)), rng.normal(size=(9, 4))
    x = loaded.make_inputs(feats, lats, NAMES)
    assert x.shape == (9, recipe.input_dim) == (9, 18)
    np.testing.assert_array_equal(loaded.predict(x), reg.predict(x))
    assert not list(tmp_path.glob("*.tmp"))


def test_input_clip_bounds_far_columns_and_survives_a_round_trip(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(4)
    module = VARegressor(3, 8, input_clip=2.0, output_scale=0.8).eval()
    module.set_normalisation(np.array([1.0, -2.0, 0.5]), np.array([2.0, 1.0, 3.0]))
    reg = Regressor(module, InputRecipe("features", NAMES))
    at_clip = np.array([[1.0 + 2.0 * 2.0, -2.0, 0.5]], np.float32)  # column 0 exactly 2 SD above its mean
    far = np.array([[1.0 + 2.0 * 500.0, -2.0, 0.5]], np.float32)  # 500 SD above
    np.testing.assert_array_equal(reg.predict(far), reg.predict(at_clip))
    unclipped = VARegressor(3, 8, output_scale=0.8).eval()
    unclipped.load_state_dict(module.state_dict())
    free = Regressor(unclipped, InputRecipe("features", NAMES))
    assert not np.array_equal(free.predict(far), free.predict(at_clip))  # without the clip it extrapolates
    x = np.random.default_rng(5).normal(scale=6.0, size=(40, 3)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(reg.predict(x), module(torch.from_numpy(x)).numpy(), atol=2e-6)
    path = save_regressor(tmp_path / "clip.safetensors", reg)
    loaded = load_regressor(path)
    assert loaded.module.input_clip == 2.0 and loaded.predictor.head.input_clip == 2.0
    np.testing.assert_array_equal(loaded.predict(x), reg.predict(x))
    assert "input_clip" not in free.module.architecture()  # unclipped models keep the header they had
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["midiva"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    for bad_value in (-1.0, 0, True, "2"):
        meta["architecture"]["input_clip"] = bad_value
        bad = tmp_path / "bad_clip.safetensors"
        save_file(tensors, str(bad), metadata={"midiva": json.dumps(meta)})
        with pytest.raises(CheckpointError, match="input_clip"):
            load_regressor(bad)
    with pytest.raises(CheckpointError, match="input_clip"):
        VARegressor(3, input_clip=0.0)


def test_feature_groups_gather_a_features_columns_over_twins_and_context_blocks() -> None:
    recipe = InputRecipe("hybrid", ("b", "b_win5", "a"), latent_dim=2, context=("window8",))
    assert recipe.feature_groups() == {"b": [0, 1, 5, 6], "a": [2, 7]}  # latents (3-4, 8-9) belong to none
    assert InputRecipe("musetok", latent_dim=4).feature_groups() == {}


def test_recipe_selects_features_by_name_and_builds_context() -> None:
    recipe = InputRecipe("features", ("c", "a"), context=("mean", "std", "window1"))
    feats = np.array([[1, 10, 100], [2, 20, 200], [6, 60, 600]], np.float32)
    x = recipe.build(feats, None, NAMES)
    base = feats[:, [2, 0]]
    np.testing.assert_allclose(x[:, :2], base)
    np.testing.assert_allclose(x[:, 2:4], np.tile(base.mean(0), (3, 1)))
    np.testing.assert_allclose(x[:, 4:6], np.tile(base.std(0), (3, 1)), rtol=1e-6)
    window = np.array([base[:2].mean(0), base.mean(0), base[1:].mean(0)])
    np.testing.assert_allclose(x[:, 6:8], window, rtol=1e-6)


def test_recipe_reports_missing_features_and_wrong_latents() -> None:
    recipe = InputRecipe("hybrid", ("a", "zzz"), latent_dim=4)
    with pytest.raises(DataError, match=r"\['zzz'\]"):
        recipe.build(np.zeros((2, 3)), np.zeros((2, 4)), NAMES)
    ok = InputRecipe("hybrid", ("a",), latent_dim=4)
    with pytest.raises(DataError, match=r"\(2, 16\).*\(n_bars, 4\)"):
        ok.build(np.zeros((2, 3)), np.zeros((2, 16)), NAMES)
    with pytest.raises(DataError, match="needs MuseTok latents"):
        ok.build(np.zeros((2, 3)), None, NAMES)
    with pytest.raises(DataError, match="3 bars but latents have 2"):
        ok.build(np.zeros((3, 3)), np.zeros((2, 4)), NAMES)
    with pytest.raises(DataError, match="NaN"):
        InputRecipe("features", NAMES).build(np.full((2, 3), np.nan), None, NAMES)
    with pytest.raises(DataError, match="context block"):
        InputRecipe("features", NAMES, context=("median",))


def test_predict_rejects_inputs_of_the_wrong_width() -> None:
    reg = _regressor(InputRecipe("features", NAMES))
    with pytest.raises(DataError, match=r"shape \(4, 5\).*\(n_bars, 3\)"):
        reg.predict(np.zeros((4, 5), np.float32))


def test_load_regressor_rejects_bad_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(CheckpointError, match="does not exist"):
        load_regressor(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_regressor(garbage)
    no_meta = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(no_meta))
    with pytest.raises(CheckpointError, match="no midiva metadata"):
        load_regressor(no_meta)
    # Metadata that claims a wider input than the stored tensors.
    good = save_regressor(tmp_path / "good.safetensors", _regressor(InputRecipe("features", NAMES)))
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as handle:
        meta = json.loads(handle.metadata()["midiva"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    meta["architecture"]["input_dim"] = 4
    meta["recipe"]["feature_names"] = ["a", "b", "c", "d"]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"midiva": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="do not match"):
        load_regressor(bad)


def test_bundled_model_loads_without_a_path() -> None:
    reg = load_regressor()
    assert reg.backend == "features"
    assert reg.source.endswith("default_model.safetensors")
    assert set(reg.metrics) >= {"val", "test"}
    assert Path(reg.source).stat().st_size < 1_000_000


def test_label_mapping_validation() -> None:
    assert check_label_mapping({"Q1": [1, 0], "Q2": [0, 1], "Q3": [-1, 0], "Q4": [0, -1]})["Q3"] == (-1.0, 0.0)
    with pytest.raises(DataError, match=r"missing \['Q4'\]"):
        check_label_mapping({"Q1": [1, 0], "Q2": [0, 1], "Q3": [-1, 0]})
    with pytest.raises(DataError, match="in \\[-1, 1\\]"):
        check_label_mapping({**DEFAULT_LABEL_MAPPING, "Q1": [2.0, 0.0]})


def test_quadrants_from_signs() -> None:
    v = np.array([0.5, -0.5, -0.5, 0.5, 0.0, 0.0])
    a = np.array([0.5, 0.5, -0.5, -0.5, 0.0, -0.1])
    assert quadrant_of(v, a).tolist() == [0, 1, 2, 3, 0, 3]


def test_pearson_and_ccc_by_hand() -> None:
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 5.0, 9.0])
    # deviations (-1.5, -.5, .5, 1.5) and (-3, -1, 0, 4): cov = 11 / 4, var_x = 1.25, var_y = 6.5
    assert pearson(x, y) == pytest.approx(2.75 / math.sqrt(1.25 * 6.5))
    # CCC = 2·cov / (var_x + var_y + (mean_x - mean_y)^2) = 5.5 / (1.25 + 6.5 + 2.5^2)
    assert ccc(x, y) == pytest.approx(5.5 / 14.0)
    assert ccc(x, x) == pytest.approx(1.0)
    assert math.isnan(pearson(np.ones(3), np.arange(3.0)))


def test_level_metrics_by_hand() -> None:
    pred = np.array([[0.5, 0.5], [-0.2, 0.3], [0.1, -0.4], [-0.3, -0.1]])
    target = np.array([[0.8, 0.6], [-0.6, 0.8], [-0.8, -0.4], [0.4, -0.6]])
    m = level_metrics(pred, target, np.array([0, 1, 2, 3]))
    assert m.n == 4
    assert m.mae_valence == pytest.approx((0.3 + 0.4 + 0.9 + 0.7) / 4)
    assert m.mse_arousal == pytest.approx((0.01 + 0.25 + 0.0 + 0.25) / 4)
    assert m.rmse_arousal == pytest.approx(math.sqrt(m.mse_arousal))
    # predicted quadrants Q1, Q2, Q4, Q3 against true Q1..Q4: two right
    assert m.quadrant_accuracy == 0.5
    assert m.valence_sign_accuracy == 0.5 and m.arousal_sign_accuracy == 1.0
    assert m.confusion[2][3] == 1 and m.confusion[3][2] == 1 and sum(map(sum, m.confusion)) == 4


def test_masked_metrics_ignore_padding_and_average_clips() -> None:
    rng = np.random.default_rng(3)
    lengths = [3, 5, 1]
    pred = rng.uniform(-1, 1, size=(3, 5, 2))
    target = rng.uniform(-1, 1, size=(3, 5, 2))
    mask = np.arange(5)[None, :] < np.array(lengths)[:, None]
    quads = ["Q1", "Q3", "Q2"]
    clean = masked_metrics(np.where(mask[..., None], pred, 0), np.where(mask[..., None], target, 0), mask, quads)
    garbage = masked_metrics(
        np.where(mask[..., None], pred, np.nan), np.where(mask[..., None], target, 1e6), mask, quads
    )
    assert clean.to_dict() == garbage.to_dict()
    assert clean.bar.n == 9 and clean.clip.n == 3
    clip1 = pred[1, :5].mean(0)
    expect = level_metrics(
        np.stack([pred[0, :3].mean(0), clip1, pred[2, :1].mean(0)]),
        np.stack([target[0, :3].mean(0), target[1].mean(0), target[2, :1].mean(0)]),
        np.array([0, 2, 1]),
    )
    assert clean.clip == expect
    assert set(clean.to_dict()) >= {"clip.quadrant_accuracy", "clip.mae_valence", "bar.ccc_arousal"}
    with pytest.raises(DataError, match="at least one real bar"):
        masked_metrics(pred, target, np.zeros_like(mask), quads)


# ---------------------------------------------------------------- acceptance regressions (CLI boundary)


def test_save_regressor_maps_a_safetensors_write_error_to_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    from midiva.errors import OutputError

    def fail(*_args: object, **_kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No such file or directory (os error 2)")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OutputError, match=r"cannot write the model to .*choose a writable --out"):
        save_regressor(tmp_path / "m.safetensors", _regressor(InputRecipe("features", NAMES)))


def test_prepare_labels_cli_rejects_a_foreign_or_damaged_clips_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from midiva.cli import main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "clips.csv").write_text("a,b\n1,2\n")
    assert main(["prepare-labels", "--data", str(foreign)]) == 1
    err = capsys.readouterr().err
    assert "DataError:" in err and "lacks the columns" in err and "Traceback" not in err
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "clips.csv").write_text("fname,quadrant,song,split,n_bars\nQ1_x_0,Q9,x,train,4\n")
    assert main(["prepare-labels", "--data", str(damaged)]) == 1
    assert "line 2: bad quadrant 'Q9'" in capsys.readouterr().err
    (damaged / "clips.csv").write_text("fname,quadrant,song,split,n_bars\nQ1_x_0,Q1,x,train,4\n")
    (damaged / "preprocess.json").write_text("{not json")
    assert main(["prepare-labels", "--data", str(damaged)]) == 1
    assert "cannot read" in capsys.readouterr().err and not (damaged / "labels_clip.json").exists()
