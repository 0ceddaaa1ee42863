"""barseq: token grouping, batching-independent bytes, windows for long songs, OOV, checkpoints, training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from midiva.barseq import (
    CHUNK_BARS,
    N_EMBEDDINGS,
    BarSeqConfig,
    BarSeqEncoder,
    BarSeqNet,
    EncodeReport,
    bars_to_elements,
    default_barseq_path,
    encode_songs,
    load_barseq,
    save_barseq,
    transpose_elements,
)
from midiva.config import sha256_file
from midiva.errors import CheckpointError
from midiva.events import VOCABULARY, midi_to_bars

TINY = BarSeqConfig(d_model=16, n_heads=2, token_layers=0, context_bars=2, embed_dim=8, dropout=0.0)
CLIPS = ("Q1_0vLPYiPN7qY_0", "Q3_-vAz_HTFEXs_0", "Q2_--2B4d4lQhs_0")


def _tiny(seed: int = 0, config: BarSeqConfig = TINY) -> BarSeqEncoder:
    torch.manual_seed(seed)
    net = BarSeqNet(config)
    with torch.no_grad():  # random, not zero, padding rows and edge vector, so masking is really tested
        net.edge.normal_()
    return BarSeqEncoder(net.eval(), sha256="")


@pytest.fixture(scope="module")
def songs(emopia_dir: Path) -> list[list[list[int]]]:
    paths = [emopia_dir / "midis" / f"{name}.mid" for name in CLIPS]
    clips = [midi_to_bars(p).bar_token_ids() for p in paths if p.is_file()]
    assert len(clips) >= 2, "expected EMOPIA clips missing"
    long_song = [bar for _ in range(40) for bar in clips[0]][: CHUNK_BARS + 77]  # crosses a chunk boundary
    return [*clips, long_song]


def test_elements_group_beat_pitch_duration_and_round_trip(songs: list[list[list[int]]]) -> None:
    v = VOCABULARY
    bar = [
        v["Bar_None"],
        v["Beat_0"],
        v["Note_Pitch_60"],
        v["Note_Duration_480"],
        v["Note_Pitch_64"],
        v["Note_Duration_240"],
        v["Beat_12"],
        v["Note_Pitch_67"],
        v["Note_Duration_120"],
        v["Time_Signature_4/4"],
    ]
    el = bars_to_elements([bar])
    assert el.counts.tolist() == [5]  # Bar | Beat+60+480 | 64+240 | Beat+67+120 | TS
    assert el.ids[1].tolist() == [v["Beat_0"], v["Note_Pitch_60"], v["Note_Duration_480"]]
    assert el.ids[2, 0] == 167 and el.ids[2, 1] == v["Note_Pitch_64"]
    from midiva.barseq_train import elements_to_bars

    assert elements_to_bars(bars_to_elements(songs[0])) == songs[0]


def test_transpose_keeps_pitches_in_range_and_pitch_classes() -> None:
    pitches = (21, 60, 107, 108)
    bar = [VOCABULARY["Bar_None"], *(VOCABULARY[f"Note_Pitch_{p}"] for p in pitches)]
    el = bars_to_elements([bar])
    from midiva.barseq import _PITCH_OF_ID

    for shift in (-5, -1, 3, 6):
        out = _PITCH_OF_ID[transpose_elements(el.ids, shift)[1:, 1]]
        assert ((out >= 21) & (out <= 108)).all()
        assert ((out - np.array(pitches)) % 12 == shift % 12).all()


@pytest.mark.parametrize("token_layers", [0, 1], ids=["deep-set", "attention"])
def test_bytes_do_not_depend_on_batching(songs: list[list[list[int]]], token_layers: int) -> None:
    enc = _tiny(config=dataclasses.replace(TINY, token_layers=token_layers))
    together = encode_songs(enc, songs)
    alone = [encode_songs(enc, [s])[0] for s in songs]
    reversed_ = encode_songs(enc, songs[::-1])[::-1]
    one = encode_songs(enc, songs, batch_size=1)
    small = encode_songs(enc, songs, batch_size=7)
    for i, song in enumerate(songs):
        assert together[i].shape == (len(song), TINY.dim) and together[i].dtype == np.float32
        for other in (alone, reversed_, one, small):
            assert together[i].tobytes() == other[i].tobytes(), f"song {i} changed with batching"


def test_long_song_windows_not_truncated(songs: list[list[list[int]]]) -> None:
    enc = _tiny()
    song = songs[-1]
    base = encode_songs(enc, [song])[0]
    assert len(base) == len(song)  # every bar encoded
    changed = [list(b) for b in song]
    far = len(song) - 1
    changed[far] = [VOCABULARY["Bar_None"], VOCABULARY["Beat_0"], VOCABULARY["Note_Pitch_30"]]
    out = encode_songs(enc, [changed])[0]
    k = TINY.context_bars
    assert out[: far - k].tobytes() == base[: far - k].tobytes()  # outside the window: identical
    assert not np.array_equal(out[far - k :], base[far - k :])  # inside it: the change is seen


def test_probabilities_and_expected_values() -> None:
    enc = _tiny()
    out = encode_songs(enc, [[[0, 25, 118, 60]] * 5])[0]
    probs = out[:, TINY.embed_dim : TINY.embed_dim + 4]
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    mapping = np.array([TINY.label_mapping[q] for q in ("Q1", "Q2", "Q3", "Q4")], np.float32)
    np.testing.assert_allclose(out[:, -2:], probs @ mapping, rtol=1e-5, atol=1e-6)


def test_oov_tokens_counted_and_empty_bars_encoded() -> None:
    enc = _tiny()
    report = EncodeReport()
    song = [[0, 25, 118, 60], [0, 999, -3, 118], [], [0] * 200]
    out = encode_songs(enc, [song], report=report)[0]
    assert out.shape == (4, TINY.dim) and np.isfinite(out).all()
    assert (report.oov_tokens, report.empty_bars, report.truncated_tokens, report.n_bars) == (2, 1, 72, 4)
    assert encode_songs(enc, [[]])[0].shape == (0, TINY.dim)


def test_checkpoint_round_trip_and_sha(tmp_path: Path, songs: list[list[list[int]]]) -> None:
    enc = _tiny(seed=3)
    path = save_barseq(tmp_path / "b.safetensors", enc.net, {"note": "test"})
    loaded = load_barseq(path)
    assert loaded.sha256 == sha256_file(path) and loaded.dim == TINY.dim
    assert loaded.metadata["note"] == "test"
    assert encode_songs(loaded, songs[:2])[0].tobytes() == encode_songs(enc, songs[:2])[0].tobytes()


def _rewrite_header(src: Path, dst: Path, edit_tensors=None, edit_header=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()["midiva"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    save_file(tensors, str(dst), metadata={"midiva": json.dumps(header)})
    return dst


def test_wrong_vocabulary_or_dimensions_named(tmp_path: Path) -> None:
    path = save_barseq(tmp_path / "ok.safetensors", _tiny().net)

    def more_rows(t):
        t["token.weight"] = torch.zeros(N_EMBEDDINGS + 40, TINY.d_model)

    with pytest.raises(CheckpointError, match=r"vocabulary mismatch in token\.weight.*\(169, 16\).*\(209, 16\)"):
        load_barseq(_rewrite_header(path, tmp_path / "vocab.safetensors", edit_tensors=more_rows))

    def wider(h):
        h["config"]["d_model"] = 32

    with pytest.raises(CheckpointError, match="dimensions mismatch"):
        load_barseq(_rewrite_header(path, tmp_path / "dims.safetensors", edit_header=wider))

    def other_vocab(h):
        h["vocab_size"] = 210

    with pytest.raises(CheckpointError, match="210-event vocabulary"):
        load_barseq(_rewrite_header(path, tmp_path / "v.safetensors", edit_header=other_vocab))
    with pytest.raises(CheckpointError, match="not found"):
        load_barseq(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_barseq(tmp_path / "junk.safetensors")


def test_bundled_weights_load_and_are_small() -> None:
    path = default_barseq_path()
    assert path.stat().st_size < 3_000_000
    enc = load_barseq()
    assert enc.dim == enc.config.embed_dim + 6 and enc.sha256 == sha256_file(path)
    assert enc.metadata["training"]["split"].startswith("EMOPIA train")


def test_readme_quotes_the_bundled_barseq_head(repo_dir: Path) -> None:
    """The README's barseq paragraph quotes the val metrics stored in the bundled barseq weights."""
    import re

    val = load_barseq(None).metadata["val"]
    readme = (repo_dir / "README.md").read_text(encoding="utf-8")
    quoted = re.search(
        r"The bundled head \(seed 0\) scores on val quadrant accuracy\s+([0-9.]+), valence sign ([0-9.]+), "
        r"MAE valence ([0-9.]+)",
        readme,
    )
    assert quoted, "the README's barseq paragraph no longer quotes the bundled head"
    for text, key in zip(quoted.groups(), ("quadrant_accuracy", "valence_sign_accuracy", "mae_valence"), strict=True):
        assert float(text) == pytest.approx(val[key], abs=5e-4), key


def test_training_is_deterministic_and_learns(emopia_dir: Path) -> None:
    from midiva.barseq_train import ClipData, TrainSettings, clip_predictions, train_barseq

    clips = []
    for i, name in enumerate(CLIPS[:2]):
        el = bars_to_elements(midi_to_bars(emopia_dir / "midis" / f"{name}.mid").bar_token_ids()[:6])
        clips.append(ClipData(name, name, "train", int(name[1]) - 1, [el]))
        assert i < 2
    settings = TrainSettings(epochs=5, batch_clips=2, lr=1e-2, seed=1)
    net_a, hist = train_barseq(clips, config=TINY, settings=settings)
    net_b, _ = train_barseq(clips, config=TINY, settings=settings)
    for (ka, a), (_, b) in zip(net_a.state_dict().items(), net_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), ka
    assert hist[-1].loss < hist[0].loss
    pred = clip_predictions(BarSeqEncoder(net_a, ""), clips)
    assert pred[0, 0] > pred[1, 0]  # Q1 clip brighter than the Q3 clip after fitting them


def test_token_cache_is_used_only_for_what_made_it(
    tmp_path: Path, emopia_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training token cache is read back when clips and settings match, and rebuilt otherwise (also for
    a cache of an older token format), never used stale."""
    import midiva.barseq_train as bt

    small = tmp_path / "emopia"
    (small / "midis").mkdir(parents=True)
    for path in sorted((emopia_dir / "midis").glob("Q2_*.mid"))[:2]:
        (small / "midis" / path.name).symlink_to(path)
    cache = tmp_path / "tokens.npz"
    first = bt.load_clip_data(small, n_augment=1, cache=cache)
    assert cache.is_file() and len(first) == 2
    built: list[str] = []
    real = bt._clip_data
    monkeypatch.setattr(bt, "_clip_data", lambda clip, *a: built.append(clip.name) or real(clip, *a))
    again = bt.load_clip_data(small, n_augment=1, cache=cache)
    assert not built and [c.versions[0].ids.tolist() for c in again] == [c.versions[0].ids.tolist() for c in first]
    bt.load_clip_data(small, n_augment=0, cache=cache)  # other settings: rebuilt
    assert len(built) == 2
    monkeypatch.setattr(bt, "CACHE_FORMAT", "midiva.barseq.tokens/1")  # an older token format: rebuilt
    bt.load_clip_data(small, n_augment=0, cache=cache)
    assert len(built) == 4


def test_barseq_is_a_registered_representation_through_the_runner(gigamidi_sample: Path) -> None:
    """`--backend barseq` / `features+barseq`: the runner encodes bars of many files at once, and each file's
    block is bit-identical to encoding it alone (so resume and re-batching keep the bytes)."""
    from midiva import representations
    from midiva.barseq import encode_songs
    from midiva.events import pitched_bar_token_ids, score_to_bars
    from midiva.midi import load_midi
    from midiva.runner import RunOptions, stream
    from midiva.sources import iter_files, list_midi_files

    rep = representations.get("barseq")
    assert rep.batched and rep.needs == "pitched_tokens" and "barseq" in representations.backend_names()
    encoders = representations.load_encoders("features+barseq")
    files = list_midi_files([gigamidi_sample])[:6]
    out = list(stream(iter_files(files), "features+barseq", encoders=encoders, options=RunOptions(progress=False)))
    ok = [(f, t) for f, t, _ in out if f.ok]
    assert len(ok) >= 4
    for f, tensors in ok:
        assert (
            tensors["barseq"].shape == (f.n_bars, encoders["barseq"].dim) and tensors["features"].shape[0] == f.n_bars
        )
        midi = load_midi(Path(f.name))
        alone = encode_songs(encoders["barseq"], [pitched_bar_token_ids(midi, score_to_bars(midi))])[0]
        assert alone.tobytes() == tensors["barseq"].tobytes()
    fingerprint = representations.fingerprint("features+barseq", encoders, representations.EncodeContext())
    assert fingerprint == {"barseq_sha256": encoders["barseq"].sha256}


def test_drums_do_not_reach_barseq(gigamidi_sample: Path) -> None:
    """A band arrangement and the same file without its drum tracks: barseq reads the same bars the same,
    bit for bit, wherever a bar's window lies inside both files' bars; MuseTok's own tokens differ."""
    import symusic

    from midiva.barseq import encode_songs, load_barseq
    from midiva.events import pitched_bar_token_ids, score_to_bars
    from midiva.midi import load_midi

    midi = load_midi(gigamidi_sample / "All The Small Things.mid")
    assert any(t.is_drum and t.note_num() for t in midi.score.tracks)
    score = midi.score.copy()
    kept = [t for t in score.tracks if not t.is_drum]
    score.tracks = symusic.core.TrackTickList() if not kept else type(score.tracks)(kept)
    bare = load_midi(bytes(score.dumps_midi()))
    grid, bare_grid = score_to_bars(midi), score_to_bars(bare)
    tokens, bare_tokens = pitched_bar_token_ids(midi, grid), pitched_bar_token_ids(bare, bare_grid)
    assert len(tokens) == grid.n_bars and tokens != grid.bar_token_ids()
    assert bare_tokens == bare_grid.bar_token_ids()  # no drums: MuseTok's tokens themselves
    encoder = load_barseq(None)
    with_drums, without = encode_songs(encoder, [tokens, bare_tokens])
    k = encoder.config.context_bars
    shift = bare_grid.leading_bars_dropped - grid.leading_bars_dropped  # bar b here is bar b - shift there
    inside = [b for b in range(grid.n_bars) if k <= b - shift < bare_grid.n_bars - k and k <= b < grid.n_bars - k]
    assert len(inside) > 50
    assert with_drums[inside].tobytes() == without[[b - shift for b in inside]].tobytes()


def test_preprocess_emopia_stores_barseq_blocks_beside_the_features(tmp_path: Path, emopia_dir: Path) -> None:
    """`midiva preprocess-emopia --backend features+barseq` (device 'auto') stores both blocks per clip."""
    from midiva.cli import main
    from midiva.latents import load_bar_tensors

    small = tmp_path / "emopia" / "midis"
    small.mkdir(parents=True)
    for path in sorted((emopia_dir / "midis").glob("Q1_*.mid"))[:3]:
        (small / path.name).symlink_to(path)
    out = tmp_path / "data"
    assert (
        main(
            [
                "-q",
                "preprocess-emopia",
                "--emopia-dir",
                str(small.parent),
                "--out",
                str(out),
                "--backend",
                "features+barseq",
            ]
        )
        == 0
    )
    stored = sorted((out / "clips").glob("*.safetensors"))
    assert stored
    tensors, meta = load_bar_tensors(stored[0])
    assert set(tensors) == {"features", "barseq"} and tensors["barseq"].shape == (int(meta["bars"]), 38)
    bundled = load_barseq(None).sha256  # clips and the run record the weights that encoded them
    assert meta["barseq_sha256"] == bundled
    assert json.loads((out / "preprocess.json").read_text())["barseq_sha256"] == bundled


def test_model_trained_on_other_barseq_weights_is_refused(tmp_path: Path) -> None:
    """A features+barseq model records the barseq weights its inputs came from; other weights of the same
    width would give wrong predictions silently, so loading it names the mismatch. Old models load."""
    from midiva.annotate import load_annotation_model
    from midiva.features import FEATURE_NAMES
    from midiva.model import InputRecipe, Regressor, VARegressor, save_regressor

    dim = load_barseq(None).dim
    recipe = InputRecipe("features+barseq", tuple(FEATURE_NAMES[:4]), dims=(("barseq", dim),))
    module = VARegressor(recipe.input_dim, 8).eval()
    bundled = load_barseq(None).sha256
    for sha, refused in ((None, False), (bundled, False), ("0" * 64, True)):
        meta = {"data": {"barseq_sha256": sha}} if sha else {}
        path = save_regressor(tmp_path / f"{refused}{bool(sha)}.safetensors", Regressor(module, recipe, metadata=meta))
        if refused:
            with pytest.raises(CheckpointError, match=r"trained on barseq weights 000000000000.*retrain"):
                load_annotation_model(path, device="cpu")
        else:
            assert load_annotation_model(path, device="cpu").backend == "features+barseq"
