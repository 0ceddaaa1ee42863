"""MuseTok encoder: golden conformance from the MIDI files, batching, checkpoint loading, download, CLI.

The file-level pipeline (iter_encoded_files, encode_files, `midiva encode` writing/resume) is tested in test_encode.py.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from midiva.cli import main
from midiva.errors import CheckpointError, ConfigError, DataError, OutputError, VocabularyError
from midiva.events import PAD_ID, build_vocabulary, midi_to_bars
from midiva.latents import (
    CPU_BATCH_TOKENS,
    FULL_CONFIG,
    EncoderConfig,
    MuseTokEncoder,
    default_checkpoint_path,
    download_musetok,
    encode_bars,
    encode_songs,
    load_bar_tensors,
    load_encoder,
    random_encoder,
    resolve_device,
    save_bar_tensors,
    sinusoidal_positions,
)

ATOL = RTOL = 1e-5  # tiny_random/README.md: measured reimplementation error <= 2.4e-6
TINY = EncoderConfig(n_layers=2, n_heads=4, d_model=64, d_ff=128, d_latent=16, n_quantizers=4, codebook_size=32)
VOCAB = build_vocabulary()


@pytest.fixture(scope="module")
def tiny_dir(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint.parent


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint: Path) -> MuseTokEncoder:
    return load_encoder(tiny_checkpoint)  # config.json beside it gives the 4 heads


@pytest.fixture(scope="module")
def expected(tiny_dir: Path) -> Any:
    return np.load(tiny_dir / "expected.npz")


@pytest.fixture(scope="module")
def golden_files(tiny_dir: Path, shared_dir: Path) -> list[Path]:
    listing = json.loads((tiny_dir / "files.json").read_text())
    return [shared_dir / "data" / rel for rel in listing["paths"]]


@pytest.fixture(scope="module")
def golden_songs(golden_files: list[Path]) -> list[list[list[int]]]:
    """Per file, per bar: token ids from our own events stage, starting from the MIDI bytes."""
    return [midi_to_bars(path).bar_token_ids() for path in golden_files]


def synthetic_bar(n_notes: int, rng: np.random.Generator) -> list[int]:
    """A valid MuseTok bar: Bar_None, n_notes x (Beat, Pitch, Duration), Time_Signature_4/4."""
    notes = np.empty((n_notes, 3), dtype=np.int64)
    notes[:, 0] = rng.choice([VOCAB[f"Beat_{t}"] for t in (0, 6, 12, 24, 36)], size=n_notes)
    notes[:, 1] = [VOCAB[f"Note_Pitch_{p}"] for p in rng.integers(21, 109, size=n_notes)]
    notes[:, 2] = VOCAB["Note_Duration_480"]
    return [VOCAB["Bar_None"], *notes.ravel().tolist(), VOCAB["Time_Signature_4/4"]]


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return dict(torch.load(path, weights_only=True))


def clone_checkpoint(tmp_path: Path, sd: Any, config: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "model.pt"
    torch.save(sd, path)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------- golden conformance


def test_events_give_exactly_musetoks_encoder_input(golden_songs: list[list[list[int]]], expected: Any) -> None:
    for i, bars in enumerate(golden_songs):
        enc_inp = expected[f"f{i}_enc_inp"].reshape(-1, 128)
        padded = np.array([(bar + [PAD_ID] * 128)[:128] for bar in bars])
        assert_array_equal(padded, enc_inp[: len(bars)], err_msg=f"file {i}")
        assert (enc_inp[len(bars) :] == PAD_ID).all()


def test_golden_latents_from_midi_files(
    encoder: MuseTokEncoder, golden_songs: list[list[list[int]]], expected: Any
) -> None:
    # All 30 files' 1,385 bars go through shared, length-sorted batches, as a corpus run would.
    encoded = encode_songs(encoder, golden_songs, batch_size=256, include_hidden=True)
    assert sum(e.n_bars for e in encoded) == 1385
    for i, result in enumerate(encoded):
        assert result.latents.dtype == np.float32 and result.indices.dtype == np.int64
        assert_array_equal(result.indices, expected[f"f{i}_indices"], err_msg=f"file {i}")
        assert_allclose(result.latents, expected[f"f{i}_latents"], atol=ATOL, rtol=RTOL, err_msg=f"file {i}")
        assert_allclose(result.pre_quant, expected[f"f{i}_pre_quant"], atol=ATOL, rtol=RTOL, err_msg=f"file {i}")
        assert result.hidden is not None
        assert_allclose(result.hidden, expected[f"f{i}_encoder_hidden"], atol=ATOL, rtol=RTOL, err_msg=f"file {i}")


def test_musetoks_own_padded_segments_give_the_same_outputs(encoder: MuseTokEncoder, expected: Any) -> None:
    assert_allclose(encoder.implicit_codebooks.numpy(), expected["implicit_codebooks"], atol=1e-6, rtol=1e-6)
    for i in (0, 20, 29):  # 128-wide inputs with padding slots, exactly as MuseTok's model received them
        tokens = torch.from_numpy(expected[f"f{i}_enc_inp"].reshape(-1, 128))
        mask = torch.from_numpy(expected[f"f{i}_padding_mask"].reshape(-1, 128))
        with torch.inference_mode():
            out = encoder(tokens, mask)
        n = expected[f"f{i}_latents"].shape[0]
        assert_array_equal(out.indices[:n].numpy(), expected[f"f{i}_indices"])
        assert_allclose(out.latents[:n].numpy(), expected[f"f{i}_latents"], atol=ATOL, rtol=RTOL)
        assert_allclose(out.hidden[:n].numpy(), expected[f"f{i}_encoder_hidden"], atol=ATOL, rtol=RTOL)


def test_loaded_positional_table_equals_the_formula(encoder: MuseTokEncoder) -> None:
    # float32 angles: the stored table and the recomputed one differ by up to 3.8e-6 (SPEC §4.2 allows it)
    assert_allclose(encoder.positions.numpy(), sinusoidal_positions(128, 64).numpy(), atol=1e-5)


def test_last_layer_shortcut_matches_torch_transformer(encoder: MuseTokEncoder) -> None:
    """An independent nn.TransformerEncoder run over all positions agrees with our position-0-only last layer."""
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=False)
    reference = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    ours = {k: v for k, v in encoder.state_dict().items() if k.startswith("encoder.tr_encoder.layers.")}
    reference.load_state_dict({k.removeprefix("encoder.tr_encoder."): v for k, v in ours.items()})
    rng = np.random.default_rng(0)
    bars = [synthetic_bar(int(n), rng) for n in rng.integers(0, 60, size=24)]
    tokens = torch.tensor([(b + [PAD_ID] * 128)[:128] for b in bars])
    mask = torch.arange(128)[None, :] >= torch.tensor([min(len(b), 128) for b in bars])[:, None]
    x = encoder.token_emb.emb_lookup(tokens) * 8.0 + encoder.positions  # sqrt(64) = 8
    with torch.inference_mode():
        want = reference(x.transpose(0, 1), src_key_padding_mask=mask)[0]
        got = encoder(tokens, mask).hidden
    assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- batching and bad input


def test_batching_and_order_do_not_change_results(encoder: MuseTokEncoder, golden_songs: list[list[list[int]]]) -> None:
    bars = [bar for song in golden_songs[20:23] for bar in song][:80]
    base = encode_bars(encoder, bars, batch_size=4096)
    perm = np.random.default_rng(1).permutation(len(bars))
    for kwargs in ({"batch_size": 1}, {"batch_size": 7}, {"batch_size": 64, "batch_tokens": 300}):
        shuffled = encode_bars(encoder, [bars[j] for j in perm], **kwargs)
        assert_array_equal(shuffled.indices, base.indices[perm])
        assert_allclose(shuffled.latents, base.latents[perm], atol=1e-5, rtol=1e-5)


def test_bar_longer_than_128_tokens_is_truncated_like_musetok(encoder: MuseTokEncoder) -> None:
    long_bar = synthetic_bar(100, np.random.default_rng(2))  # 302 tokens
    assert len(long_bar) > 128
    whole, cut = encode_bars(encoder, [long_bar]), encode_bars(encoder, [long_bar[:128]])
    assert_array_equal(whole.latents, cut.latents)
    assert_array_equal(whole.indices, cut.indices)


def test_song_of_5000_bars_runs_in_bounded_batches(encoder: MuseTokEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    bars = [synthetic_bar(int(n), rng) for n in rng.integers(0, 12, size=5000)]
    shapes: list[tuple[int, int]] = []
    forward = MuseTokEncoder.forward

    def spy(self: MuseTokEncoder, tokens: torch.Tensor, mask: torch.Tensor) -> Any:
        shapes.append((int(tokens.shape[0]), int(tokens.shape[1])))
        return forward(self, tokens, mask)

    monkeypatch.setattr(MuseTokEncoder, "forward", spy)
    encoded = encode_bars(encoder, bars, batch_size=512, batch_tokens=8_000)
    assert encoded.latents.shape == (5000, 16) and encoded.indices.shape == (5000, 4)
    assert all(n <= 512 and n * width <= 8_000 and width <= 128 for n, width in shapes)
    assert sum(n for n, _ in shapes) == 5000
    # Sorting by length pads little: within 10% of the real token count (MuseTok pads all bars to 128: 7x).
    assert sum(n * w for n, w in shapes) < 1.10 * sum(min(len(b), 128) for b in bars)
    assert np.isfinite(encoded.latents).all()
    shapes.clear()
    encode_bars(encoder, bars[:600], batch_size=4096)  # CPU default: batches capped at CPU_BATCH_TOKENS
    assert shapes and all(n * width <= CPU_BATCH_TOKENS for n, width in shapes)


def test_empty_inputs(encoder: MuseTokEncoder) -> None:
    none = encode_bars(encoder, [])
    assert none.latents.shape == (0, 16) and none.indices.shape == (0, 4) and none.pre_quant.shape == (0, 16)
    songs = encode_songs(encoder, [[], [[VOCAB["Bar_None"], VOCAB["Time_Signature_4/4"]]], []])
    assert [s.n_bars for s in songs] == [0, 1, 0]
    blank = encode_bars(encoder, [[]])  # an all-padding slot: positions 0 and 1 stay unmasked
    assert np.isfinite(blank.latents).all()


def test_token_outside_vocabulary_is_rejected(encoder: MuseTokEncoder) -> None:
    with pytest.raises(VocabularyError, match="token id 168"):
        encode_bars(encoder, [[0, 1, 168]])
    with pytest.raises(ConfigError):
        encode_bars(encoder, [[0, 1]], batch_size=0)


def test_autocast_options(encoder: MuseTokEncoder, golden_songs: list[list[list[int]]]) -> None:
    bars = golden_songs[0]
    full = encode_bars(encoder, bars)
    half = encode_bars(encoder, bars, autocast="bf16")  # CPU bf16: the transformer only
    assert half.latents.dtype == np.float32
    assert np.abs(half.pre_quant - full.pre_quant).max() < 0.5
    with pytest.raises(ConfigError, match="fp16"):
        encode_bars(encoder, bars, autocast="fp16", device="cpu")
    with pytest.raises(ConfigError, match="autocast"):
        encode_bars(encoder, bars, autocast="int8")


def test_full_size_architecture_matches_the_real_checkpoint_listing(musetok_ref: Path) -> None:
    listing = {}
    for line in (musetok_ref / "full_config_state_dict_keys.txt").read_text().splitlines():
        if line.startswith("#") or "ENCODER_PATH" not in line:
            continue
        key, shape = line.split("\t")[:2]
        listing[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    with torch.device("meta"):
        model = MuseTokEncoder(FULL_CONFIG)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: v for k, v in listing.items() if k != "pe.pe"}
    assert sum(v.numel() for v in model.parameters()) == 38_242_432  # SPEC §4.8: encoder-path parameters


def test_full_size_random_encoder_runs() -> None:
    model = random_encoder(FULL_CONFIG, seed=0)
    bars = [synthetic_bar(n, np.random.default_rng(n)) for n in (0, 5, 40)]
    out = encode_bars(model, bars)
    assert out.latents.shape == (3, 128) and out.indices.shape == (3, 16)
    assert (out.indices >= 0).all() and (out.indices < 2048).all()


# ---------------------------------------------------------------- devices


def test_resolve_device(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("INFO", logger="midiva.latents"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "no CUDA device" in caplog.text
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("quantum")


# ---------------------------------------------------------------- checkpoint loading


def test_inferred_config_and_wrapped_state_dicts(tiny_checkpoint: Path, tiny_dir: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    plain = load_encoder(tiny_checkpoint)
    assert plain.config == TINY
    bars = [synthetic_bar(n, np.random.default_rng(n)) for n in (1, 10, 41)]
    want = encode_bars(plain, bars)
    sd = state_dict(tiny_checkpoint)
    for name, wrapped in {
        "model_state_dict": {"model_state_dict": sd, "epoch": 7},
        "state_dict_module": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "no_decoder": {k: v for k, v in sd.items() if not k.startswith(("decoder.", "dec_out_proj."))},
    }.items():
        (tmp_path / name).mkdir()
        path = clone_checkpoint(tmp_path / name, wrapped, config)
        got = encode_bars(load_encoder(path), bars)
        assert_array_equal(got.latents, want.latents, err_msg=name)


def test_heads_come_from_argument_config_or_default(tiny_checkpoint: Path, tmp_path: Path, expected: Any) -> None:
    bare = tmp_path / "model.pt"
    shutil.copy(tiny_checkpoint, bare)  # no config.json beside it: the real model's 8 heads are assumed
    bars = [
        expected["f0_enc_inp"].reshape(-1, 128)[b][expected["f0_enc_inp"].reshape(-1, 128)[b] != PAD_ID].tolist()
        for b in range(10)
    ]
    assert load_encoder(bare).config.n_heads == 8
    assert not np.allclose(encode_bars(load_encoder(bare), bars).pre_quant, expected["f0_pre_quant"], atol=1e-3)
    for enc in (load_encoder(bare, n_heads=4), load_encoder(bare, config={"enc_n_head": 4})):
        assert_allclose(encode_bars(enc, bars).latents, expected["f0_latents"], atol=ATOL, rtol=RTOL)
    with pytest.raises(ConfigError, match="not divisible"):
        load_encoder(bare, n_heads=5)


def test_truncated_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = tiny_checkpoint.read_bytes()
    bad = tmp_path / "model.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*model.pt.* truncated"):
        load_encoder(bad)
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_encoder(bad)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda sd: sd.pop("encoder.tr_encoder.layers.1.linear1.bias"),
            r"lacks 'encoder.tr_encoder.layers.1.linear1.bias' \(expected shape \(128,\)\)",
        ),
        (
            lambda sd: sd.__setitem__("encoder.tr_encoder.layers.1.linear2.weight", torch.zeros(64, 100)),
            r"'encoder.tr_encoder.layers.1.linear2.weight' has shape \(64, 100\), expected \(64, 128\)",
        ),
        (
            lambda sd: sd.__setitem__("token_emb.emb_lookup.weight", torch.zeros(210, 64)),
            "expected a 168-row token embedding, found 210",
        ),
        (
            lambda sd: sd.__setitem__("enc_out_proj.bias", torch.full((16,), float("nan"))),
            "'enc_out_proj.bias' contains NaN",
        ),
        (
            lambda sd: sd.__setitem__("encoder.tr_encoder.layers.3.linear1.bias", torch.zeros(128)),
            "first 'encoder.tr_encoder.layers.3.linear1.bias'",
        ),
        (lambda sd: sd.__setitem__("pe.pe", torch.zeros(50, 1, 64)), r"'pe.pe' has shape \(50, 1, 64\)"),
        (
            lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("residual_sim_vq")],
            "no 'residual_sim_vq.layers.0.frozen_codebook'",
        ),
    ],
    ids=[
        "missing_key",
        "wrong_shape",
        "wrong_vocabulary",
        "nan_values",
        "layer_gap",
        "short_positions",
        "no_quantizer",
    ],
)
def test_wrong_architecture_names_the_first_bad_key(
    tiny_checkpoint: Path, tmp_path: Path, edit: Any, message: str
) -> None:
    sd = state_dict(tiny_checkpoint)
    edit(sd)
    path = clone_checkpoint(tmp_path, sd, {"enc_n_head": 4})
    with pytest.raises(CheckpointError, match=message):
        load_encoder(path)


def test_not_a_state_dict_and_mismatched_config(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = clone_checkpoint(tmp_path, [torch.zeros(3)])
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_encoder(path)
    path = clone_checkpoint(tmp_path, state_dict(tiny_checkpoint), {"enc_n_head": 4, "enc_n_layer": 3})
    with pytest.raises(CheckpointError, match=r"enc_n_layer=3 but .* holds n_layers=2"):
        load_encoder(path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json"):
        load_encoder(path)


def test_missing_checkpoint_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_encoder(storage_dir=tmp_path)
    message = str(info.value)
    assert str(default_checkpoint_path(tmp_path)) in message and "midiva download-musetok" in message
    assert default_checkpoint_path(tmp_path) == tmp_path / "musetok" / "best_tokenizer" / "model.pt"


# ---------------------------------------------------------------- download (offline)


def fake_gdown(monkeypatch: pytest.MonkeyPatch, archive: Path | None, calls: list[str]) -> None:
    import gdown

    def download(*, id: str, output: str, quiet: bool = False, **_: Any) -> str | None:
        calls.append(id)
        if archive is None:
            raise ConnectionError("network unreachable")
        shutil.copy(archive, output)
        return output

    monkeypatch.setattr(gdown, "download", download)


def build_zip(tmp_path: Path, tiny_dir: Path, members: dict[str, Path]) -> Path:
    archive = tmp_path / "musetok.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, source in members.items():
            zf.write(source, name)
    return archive


def test_download_unpacks_and_verifies(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = build_zip(
        tmp_path,
        tiny_dir,
        {
            "checkpoints/best_tokenizer/model.pt": tiny_dir / "model.pt",
            "checkpoints/best_tokenizer/config.json": tiny_dir / "config.json",
        },
    )
    calls: list[str] = []
    fake_gdown(monkeypatch, archive, calls)
    storage = tmp_path / "store"
    path = download_musetok(storage)
    assert path == storage / "musetok" / "best_tokenizer" / "model.pt"
    assert path.read_bytes() == (tiny_dir / "model.pt").read_bytes()
    assert load_encoder(storage_dir=storage).config == TINY  # config.json came along
    assert calls == ["1HK534lEVdHYl3HMRkKvz8CWYliXRmOq_"]
    assert download_musetok(storage) == path and len(calls) == 1  # present and loadable: no second download
    assert sorted(p.name for p in (storage / "musetok").iterdir()) == ["best_tokenizer"]  # zip removed


def test_download_failures_are_checkpoint_errors(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    fake_gdown(monkeypatch, None, calls)
    with pytest.raises(CheckpointError, match=r"network unreachable.*by hand \(in a browser\)"):
        download_musetok(tmp_path / "a")
    fake_gdown(monkeypatch, build_zip(tmp_path, tiny_dir, {"readme.txt": tiny_dir / "README.md"}), calls)
    with pytest.raises(CheckpointError, match=r"no best_tokenizer/model.pt"):
        download_musetok(tmp_path / "b")
    broken = tmp_path / "broken.pt"
    broken.write_bytes((tiny_dir / "model.pt").read_bytes()[:1000])
    fake_gdown(monkeypatch, build_zip(tmp_path, tiny_dir, {"best_tokenizer/model.pt": broken}), calls)
    with pytest.raises(CheckpointError, match="cannot read"):
        download_musetok(tmp_path / "c")
    assert not default_checkpoint_path(tmp_path / "c").exists()  # a file that fails verification is removed


def test_cli_download(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_gdown(monkeypatch, build_zip(tmp_path, tiny_dir, {"best_tokenizer/model.pt": tiny_dir / "model.pt"}), [])
    monkeypatch.setenv("VALENCE_AROUSAL_STORAGE_DIR", str(tmp_path / "env_store"))
    assert main(["download-musetok"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "env_store" / "musetok" / "best_tokenizer" / "model.pt")


# ---------------------------------------------------------------- container and CLI


def test_bar_tensor_container_round_trip(tmp_path: Path) -> None:
    tensors: dict[str, np.ndarray] = {
        "latents": np.arange(12, dtype=np.float32).reshape(3, 4),
        "indices": np.ones((3, 2), dtype=np.int64),
    }
    path = save_bar_tensors(tmp_path / "sub" / "x.safetensors", tensors, {"md5": "abc", "n_bars": "3"})
    got, meta = load_bar_tensors(path)
    assert meta == {"md5": "abc", "n_bars": "3"}
    for key, value in tensors.items():
        assert_array_equal(got[key], value)
        assert got[key].dtype == value.dtype
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]  # no temp file left behind
    with pytest.raises(TypeError, match="n_bars"):
        save_bar_tensors(tmp_path / "y.safetensors", tensors, {"n_bars": 3})  # type: ignore[dict-item]
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot write"):
        save_bar_tensors(tmp_path / "file" / "z.safetensors", tensors, {})
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=r"junk.safetensors"):
        load_bar_tensors(tmp_path / "junk.safetensors")


def test_cli_encode_takes_the_encoder_json_through_config(
    tiny_checkpoint: Path, golden_files: list[Path], expected: Any, tmp_path: Path
) -> None:
    """`--config X.json` is the issue's spelling: the heads come from it when no config.json lies beside."""
    import shutil

    lonely = tmp_path / "ckpt" / "model.pt"
    lonely.parent.mkdir()
    shutil.copyfile(tiny_checkpoint, lonely)
    config = tiny_checkpoint.parent / "config.json"
    base = ["encode", str(golden_files[0]), "--checkpoint", str(lonely), "-q"]
    assert main([*base, "--out", str(tmp_path / "with"), "--config", str(config)]) == 0
    assert main([*base, "--out", str(tmp_path / "without")]) == 0
    md5 = midi_to_bars(golden_files[0]).md5
    with_config, _ = load_bar_tensors(tmp_path / "with" / f"{md5}.safetensors")
    without, _ = load_bar_tensors(tmp_path / "without" / f"{md5}.safetensors")
    assert_allclose(with_config["latents"], expected["f0_latents"], atol=ATOL, rtol=RTOL)
    assert not np.allclose(without["latents"], expected["f0_latents"], atol=ATOL, rtol=RTOL)  # 8 heads by default


def test_cli_encode_without_checkpoint_explains(
    golden_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["encode", str(golden_files[0]), "--storage-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "CheckpointError" in err and "download-musetok" in err and str(tmp_path / "empty") in err
    assert main(["encode", str(golden_files[0]), "--out", str(tmp_path), "--backend", "features"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU machine)")
@pytest.mark.parametrize("autocast", [None, "bf16", "fp16"])
def test_golden_latents_on_cuda(
    tiny_checkpoint: Path, golden_songs: list[list[list[int]]], expected: Any, autocast: str | None
) -> None:
    """float32 on GPU: within 1e-4 and the same codes wherever MuseTok's margin exceeds 1e-4 (README's rule).
    Reduced precision: reported, and held to a loose bound on pre-quantisation vectors."""
    gpu = load_encoder(tiny_checkpoint, device="cuda")
    encoded = encode_songs(gpu, golden_songs, batch_size=512, autocast=autocast)
    for i, result in enumerate(encoded):
        safe = expected[f"f{i}_vq_margin"] > 1e-4
        if autocast is None:
            assert_allclose(result.latents, expected[f"f{i}_latents"], atol=1e-4, rtol=1e-4)
            assert_array_equal(result.indices[safe], expected[f"f{i}_indices"][safe])
        else:
            assert np.abs(result.pre_quant - expected[f"f{i}_pre_quant"]).max() < 0.1


def test_cli_encode_on_absent_cuda_is_a_clear_error(
    tiny_checkpoint: Path,
    golden_files: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["encode", str(golden_files[0]), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path)]
    assert main([*argv, "--device", "cuda"]) == 1
    assert "ConfigError" in capsys.readouterr().err
    assert main([*argv, "--device", "auto", "-q"]) == 0  # auto falls back to the CPU
