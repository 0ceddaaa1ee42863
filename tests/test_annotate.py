"""Annotation at scale: sources, exactly-once output, resume after kill -9, shards, merge, bad input."""

from __future__ import annotations

import builtins
import csv
import dataclasses
import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import symusic

from midiva import ledger as ledger_mod
from midiva.annotate import AnnotateOptions, annotate_stream
from midiva.cli import main
from midiva.errors import ConfigError, DataError, MidiReadError, OutputError, SourceError
from midiva.events import midi_to_bars
from midiva.ledger import Md5Set, output_paths, scan_ledger
from midiva.merge import merge_outputs
from midiva.prepare import FileResult, PrepareOptions, prepare_file
from midiva.sources import (
    INSTRUMENT_CATEGORY_COLUMN,
    SourceRow,
    iter_files,
    iter_hub,
    list_midi_files,
    shard_of,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "src" / "midiva" / "assets" / "examples"


# ---------------------------------------------------------------- helpers and fixtures


def make_model(path: Path, seed: int) -> Path:
    """A features-backend regressor with seeded random weights and piece-context inputs."""
    import torch

    from midiva.features import FEATURE_NAMES
    from midiva.model import InputRecipe, Regressor, VARegressor, save_regressor

    torch.manual_seed(seed)
    recipe = InputRecipe("features", tuple(FEATURE_NAMES), 0, ("mean", "window2"))
    module = VARegressor(recipe.input_dim, 32).eval()
    return save_regressor(path, Regressor(module, recipe))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", seed=0)


class FakeRegressor:
    """Row-wise deterministic stand-in with the Regressor interface (no torch)."""

    backend = "features"

    def make_inputs(self, features: Any = None, latents: Any = None) -> np.ndarray:
        return np.asarray(features, np.float32)

    def predict(self, inputs: Any, *, batch_size: int = 4096, device: Any = "cpu") -> np.ndarray:
        x = np.asarray(inputs, np.float64)
        w = np.linspace(-1.0, 1.0, x.shape[1])
        return np.stack([np.tanh(x @ w / 50), np.tanh(x.sum(1) / 500)], 1).astype(np.float32)


def run_cli(*argv: object) -> int:
    return main([str(a) for a in argv])


def read_rows(path: Path) -> list[tuple[str, int, float, float]]:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["md5", "bar_number", "valence", "arousal"]
        return [(m, int(b), float(v), float(a)) for m, b, v, a in reader]


def read_dicts(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def bars_by_md5(rows: list[tuple[str, int, float, float]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for md5, bar, _, _ in rows:
        out.setdefault(md5, []).append(bar)
    return out


def assert_contiguous(rows: list[tuple[str, int, float, float]]) -> None:
    """Every md5's rows are adjacent and numbered 0..n-1; no md5 appears twice."""
    seen: set[str] = set()
    previous = None
    for md5, bar, valence, arousal in rows:
        if md5 != previous:
            assert md5 not in seen, f"rows of {md5} are split or duplicated"
            seen.add(md5)
            expected = 0
            previous = md5
        assert bar == expected
        expected += 1
        assert -1.0 <= valence <= 1.0 and -1.0 <= arousal <= 1.0


def expected_bars(paths: list[Path]) -> dict[str, int]:
    """md5 -> MuseTok bar count, for the files events can convert."""
    out = {}
    for path in paths:
        try:
            bars = midi_to_bars(path)
        except Exception:  # the annotate run must record these as failures
            continue
        out[hashlib.md5(path.read_bytes()).hexdigest()] = bars.n_bars
    return out


@pytest.fixture(scope="module")
def sample_files(gigamidi_sample: Path) -> list[Path]:
    return list_midi_files([gigamidi_sample])


@pytest.fixture(scope="module")
def sample_parquet(tmp_path_factory: pytest.TempPathFactory, sample_files: list[Path]) -> Path:
    """The 30-file sample as GigaMIDI-style parquet: train/ (25 files) and test/ (5 + a row without music)."""
    root = tmp_path_factory.mktemp("gigamidi_parquet")
    schema = pa.schema(
        [
            ("md5", pa.string()),
            ("music", pa.binary()),
            ("music_styles_curated", pa.list_(pa.string())),
            ("music_style_scraped", pa.string()),
            ("title", pa.string()),
            ("artist", pa.string()),
            ("num_tracks", pa.int64()),
            ("NOMML", pa.list_(pa.int64())),
            ("tempo", pa.string()),
            (INSTRUMENT_CATEGORY_COLUMN, pa.int64()),
        ]
    )
    records = []
    for i, path in enumerate(sample_files):
        data = path.read_bytes()
        records.append(
            {
                "md5": hashlib.md5(data).hexdigest(),
                "music": data,
                "music_styles_curated": ["classical"] if "Maestro" in path.name else ["pop", "rock"],
                "music_style_scraped": "Pop" if i % 2 else None,
                "title": path.stem,
                "artist": f"artist {i}",
                "num_tracks": 1 + i % 4,
                "NOMML": [12, 6][: 1 + i % 2],
                "tempo": "120.0",
                INSTRUMENT_CATEGORY_COLUMN: i % 3,
            }
        )
    missing = dict(records[0], md5="f" * 32, music=None, title="row without music")
    (root / "train").mkdir()
    (root / "test").mkdir()
    pq.write_table(pa.Table.from_pylist(records[:25], schema), root / "train" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist([*records[25:], missing], schema), root / "test" / "part-0.parquet")
    return root


def make_score(n_bars: int, *, drums_only: bool = False, tpq: int = 480) -> bytes:
    score = symusic.Score(tpq)
    score.tracks.append(symusic.Track("t", 0, drums_only))
    for bar in range(n_bars):
        score.tracks[0].notes.append(symusic.Note(bar * 4 * tpq, tpq, 36 if drums_only else 60 + bar % 12, 90))
    return score.dumps_midi()


# ---------------------------------------------------------------- units


def test_md5set_membership_across_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Md5Set, "_MERGE_AT", 4)
    rng = random.Random(0)
    keys = ["0" * 32, "f" * 32, "00" * 15 + "01", "01" + "00" * 15] + [
        f"{rng.getrandbits(128):032x}" for _ in range(200)
    ]
    found = Md5Set()
    for key in keys:
        assert found.add(key)
        assert not found.add(key)
    assert len(found) == len(keys)
    assert all(k in found for k in keys)
    assert not any(f"{rng.getrandbits(128):032x}" in found for _ in range(200))
    assert "1" * 32 not in found and "0" * 31 + "2" not in found
    bulk = Md5Set.from_pairs([Md5Set.pairs(keys[:100]), Md5Set.pairs(keys[50:] + keys[:3])])
    assert len(bulk) == len(keys) and all(k in bulk for k in keys) and "1" * 32 not in bulk


def test_shard_of_is_md5_prefix_modulo_and_partitions() -> None:
    assert shard_of("0000000a" + "0" * 24, 4) == 10 % 4
    assert shard_of("ffffffff" + "0" * 24, 7) == 0xFFFFFFFF % 7
    keys = [hashlib.md5(str(i).encode()).hexdigest() for i in range(300)]
    counts = Counter(shard_of(k, 3) for k in keys)
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 60


def test_prepare_file_records_bad_bytes_and_keeps_drums() -> None:
    options = PrepareOptions(include_drums=True, features=True)
    cases = {
        "zero_bytes": b"",
        "truncated_header": b"MThd\x00\x00",
        "corrupt_track": b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0MTrk\xff\xff\xff\xff\x90",
    }
    for name, data in cases.items():
        result = prepare_file(SourceRow(hashlib.md5(data).hexdigest(), name, music=data), options)
        assert not result.ok and result.error_type == "MidiReadError", name
    drums = make_score(4, drums_only=True)
    row = SourceRow(hashlib.md5(drums).hexdigest(), "drums_only", music=drums)
    kept = prepare_file(row, options)
    assert kept.ok and kept.n_bars == 4 and kept.features is not None and kept.features.shape[0] == 4
    dropped = prepare_file(row, PrepareOptions(include_drums=False))
    assert dropped.error_type == "EmptyScoreError" and dropped.stage == "events"


def test_a_task_of_many_files_prepares_each_as_alone(sample_files: list[Path], emopia_dir: Path) -> None:
    from midiva.prepare import prepare_files

    clips = sorted((emopia_dir / "midis").glob("*.mid"))[:40]
    rows = list(iter_files([*sample_files, *clips]))
    rows.insert(5, SourceRow(hashlib.md5(b"MThd").hexdigest(), "broken", music=b"MThd\x00"))
    for options in (PrepareOptions(), PrepareOptions(include_drums=False, tokens=True)):
        together = prepare_files(rows, options)
        alone = [prepare_file(row, options) for row in rows]
        assert [r.md5 for r in together] == [r.md5 for r in rows]
        for a, b in zip(together, alone, strict=True):
            assert (a.ok, a.stage, a.error_type, a.n_bars, a.info, a.token_ids) == (
                b.ok,
                b.stage,
                b.error_type,
                b.n_bars,
                b.info,
                b.token_ids,
            )
            assert (a.features is None) == (b.features is None)
            if a.features is not None:
                assert a.features.dtype == b.features.dtype and np.array_equal(a.features, b.features), a.name
        assert sum(not r.ok for r in together) == 2  # the broken bytes and the empty sample file


def test_an_unforeseen_error_in_a_batch_sends_its_files_through_alone(
    sample_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import midiva.events
    from midiva.prepare import prepare_files

    rows = list(iter_files(sample_files))
    expected = [(r.md5, r.ok, r.n_bars) for r in (prepare_file(row, PrepareOptions()) for row in rows)]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the batched conversion")

    monkeypatch.setattr(midiva.events, "score_to_bars_many", broken)
    assert [(r.md5, r.ok, r.n_bars) for r in prepare_files(rows, PrepareOptions())] == expected


def test_unreadable_and_oversized_files_become_failure_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import midiva.sources as sources_mod

    big = tmp_path / "big.mid"
    big.write_bytes(make_score(50))
    monkeypatch.setattr(sources_mod, "MAX_MIDI_BYTES", 100)
    unreadable, oversized = list(iter_files([tmp_path, big]))  # a directory cannot be read as a file
    assert (
        unreadable.music is None
        and unreadable.error_type == "MidiReadError"
        and "cannot read" in (unreadable.error or "")
    )
    assert unreadable.md5 == hashlib.md5(str(tmp_path).encode()).hexdigest()
    assert oversized.music is None and "above the 0 MiB limit" in (oversized.error or "")
    assert oversized.md5 == hashlib.md5(big.read_bytes()).hexdigest()
    result = prepare_file(oversized, PrepareOptions())
    assert (result.stage, result.error_type) == ("source", "MidiReadError")


# ---------------------------------------------------------------- end to end


def test_parquet_end_to_end(tmp_path: Path, sample_parquet: Path, sample_files: list[Path], tiny_model: Path) -> None:
    out = tmp_path / "va" / "annotations.csv"
    assert run_cli("annotate", "--dataset", sample_parquet, "--out", out, "--model", tiny_model, "--parquet", "-q") == 0
    rows = read_rows(out)
    assert_contiguous(rows)
    expected = expected_bars(sample_files)
    got = {md5: len(bars) for md5, bars in bars_by_md5(rows).items()}
    assert got == expected and len(rows) == sum(expected.values())
    paths = output_paths(out)
    failures = {r["md5"]: r for r in read_dicts(paths.failures)}
    empty_md5 = hashlib.md5((sample_files[0].parent / "empty.mid").read_bytes()).hexdigest()
    assert failures[empty_md5]["error_type"] == "EmptyScoreError"
    assert failures["f" * 32]["stage"] == "source" and "music" in failures["f" * 32]["message"]
    assert len(failures) == 31 - len(expected)
    meta = {r["md5"]: r for r in read_dicts(paths.meta)}
    assert len(meta) == 31 and Counter(r["split"] for r in meta.values()) == {"train": 25, "test": 6}
    some = next(r for r in meta.values() if r["status"] == "ok" and "Maestro" in r["title"])
    assert some["music_styles_curated"] == "classical" and int(some["n_bars"]) == expected[some["md5"]]
    assert {r["music_styles_curated"] for r in meta.values()} >= {"pop|rock", "classical"}
    summary = json.loads(paths.summary.read_text())
    assert summary["files_done"] == len(expected) and summary["bars"] == len(rows) and summary["complete"]
    assert json.loads(paths.run.read_text())["command"] == "annotate" and paths.run.name == "annotations.run.json"
    assert pq.read_table(out.with_suffix(".parquet")).num_rows == len(rows)
    assert pq.read_table(paths.meta.with_suffix(".parquet")).num_rows == 31
    # The directory source gives the same rows for the same files.
    out_dir = tmp_path / "dir" / "annotations.csv"
    assert run_cli("annotate", sample_files[0].parent, "--out", out_dir, "--model", tiny_model, "-q") == 0
    assert sorted(read_rows(out_dir)) == sorted(rows)
    # A rerun finds everything done and changes nothing.
    before = out.read_bytes()
    assert run_cli("annotate", "--dataset", sample_parquet, "--out", out, "--model", tiny_model, "-q") == 0
    assert out.read_bytes() == before
    assert json.loads(paths.summary.read_text())["files_skipped_done"] == 31


def test_resume_skips_finished_files_unread_and_rereads_changed_ones(
    tmp_path: Path, sample_files: list[Path], tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from midiva.sources import md5_cache_path

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    kept = [p for p in sample_files if p.name != "empty.mid"][:9]
    for path in kept[:8]:
        (corpus / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "a.csv"
    assert run_cli("annotate", corpus, "--out", out, "--model", tiny_model, "-q") == 0
    assert md5_cache_path(out).read_text().count("\n") == 1 + 8
    before, replacement = out.read_bytes(), kept[8].read_bytes()
    import midiva.sources

    reads: list[str] = []
    read_file = midiva.sources.read_regular_file
    monkeypatch.setattr(
        midiva.sources,
        "read_regular_file",
        lambda path, cap: (path.parent == corpus and reads.append(path.name)) or read_file(path, cap),
    )
    assert run_cli("annotate", corpus, "--out", out, "--model", tiny_model, "-q") == 0
    assert reads == [] and out.read_bytes() == before
    assert json.loads(output_paths(out).summary.read_text())["files_skipped_done"] == 8
    changed = corpus / kept[0].name
    changed.write_bytes(replacement)  # new content: new size and mtime, so read and hashed again
    assert run_cli("annotate", corpus, "--out", out, "--model", tiny_model, "-q") == 0
    assert reads == [kept[0].name]
    summary = json.loads(output_paths(out).summary.read_text())
    assert (summary["files_done"], summary["files_skipped_done"]) == (1, 7)
    assert out.read_bytes().startswith(before)


def test_md5_cache_round_trips_ignores_damage_and_never_fails_a_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from midiva.sources import FileMd5Cache

    cache = FileMd5Cache(tmp_path / "c.md5cache")
    cache.record("a/b.mid", 10, 123, "0" * 32)
    cache.record("bad\nname.mid", 1, 1, "1" * 32)  # cannot be stored in a line: not cached
    cache.save()
    with open(tmp_path / "c.md5cache", "a", encoding="utf-8") as handle:
        handle.write("not a record\n" + "2" * 32 + "\t5\t")  # damage and a torn last line
    loaded = FileMd5Cache.load(tmp_path / "c.md5cache")
    assert len(loaded) == 1 and loaded.lookup("a/b.mid", 10, 123) == "0" * 32
    assert loaded.lookup("a/b.mid", 10, 124) is None and loaded.lookup("a/b.mid", 11, 123) is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    unwritable = FileMd5Cache(blocker / "c.md5cache")
    unwritable.record("x.mid", 1, 1, "3" * 32)
    unwritable.save()  # logs, does not raise
    assert "md5 cache not saved" in caplog.text


def test_parquet_rows_to_skip_are_passed_on_bare(sample_parquet: Path) -> None:
    from midiva.sources import iter_parquet

    rows = list(iter_parquet(sample_parquet))
    keep = rows[3].md5
    bare = list(iter_parquet(sample_parquet, skip=lambda md5: md5 != keep))
    assert [r.md5 for r in bare] == [r.md5 for r in rows] and [r.split for r in bare] == [r.split for r in rows]
    assert [r.music is not None for r in bare] == [r.md5 == keep for r in rows]
    assert bare[3] == rows[3]


def test_default_model_annotates_the_bundled_examples_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert run_cli("annotate", EXAMPLES, "-q") == 0  # the README's first command: no flags beyond the input
    rows = read_rows(tmp_path / "annotations.csv")
    assert_contiguous(rows)
    examples = sorted(EXAMPLES.glob("*.mid"))
    assert len(examples) >= 4 and all(p.stat().st_size < 8000 for p in examples)
    assert len(rows) == sum(expected_bars(examples).values())


def _symlink_corpus(root: Path, sources: list[Path]) -> Path:
    root.mkdir(parents=True)
    for i, path in enumerate(sources):
        (root / f"{i:03d}_{path.name}").symlink_to(path)
    return root


@pytest.mark.slow
def test_kill9_at_random_moments_then_resume_is_exactly_once(
    tmp_path: Path, sample_files: list[Path], emopia_dir: Path, tiny_model: Path
) -> None:
    emopia = sorted((emopia_dir / "midis").glob("*.mid"))[::18][:60]
    corpus = _symlink_corpus(tmp_path / "corpus", sample_files + emopia)
    n_files = len(sample_files) + len(emopia)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def command(out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "midiva",
            "-q",
            "annotate",
            str(corpus),
            "--out",
            str(out),
            "--model",
            str(tiny_model),
            "--batch-size",
            "128",
            "--commit-interval",
            "0",
            "--num-workers",
            "0",
        ]

    clean = tmp_path / "clean" / "a.csv"
    t0 = time.monotonic()
    subprocess.run(command(clean), check=True, env=env, timeout=120)
    duration = time.monotonic() - t0
    out = tmp_path / "killed" / "a.csv"
    rng = random.Random(20240607)
    committed: list[int] = []
    mid_run = 0
    # Kill at random moments (startup included) until at least 3 kills landed mid-run: the run
    # itself takes well under a second here, so a fixed number of attempts could all miss it.
    for attempt in range(15):
        proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt == 0:  # anywhere, startup included
            time.sleep(rng.uniform(0.0, duration))
        else:  # once this attempt has committed something, at a random later moment
            deadline = time.monotonic() + 60
            ledger = output_paths(out).ledger
            start_size = ledger.stat().st_size if ledger.exists() else 0
            while proc.poll() is None and time.monotonic() < deadline:
                if ledger.exists() and ledger.stat().st_size > start_size:
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.03))  # short: the rest of the run may take well under 0.1 s
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = scan_ledger(output_paths(out).ledger) if output_paths(out).ledger.exists() else None
        committed.append(state.n_files if state else 0)
        mid_run += int(0 < committed[-1] < n_files and (len(committed) == 1 or committed[-1] > committed[-2]))
        if mid_run >= 3:
            break
        if committed[-1] == n_files:  # the run finished before the kills landed mid-run: start over
            shutil.rmtree(out.parent)
            committed, mid_run = [], 0
    subprocess.run(command(out), check=True, env=env, timeout=120)
    assert mid_run >= 2, f"too few kills landed mid-run: committed files after each kill {committed}"
    for a, b in zip(
        (*output_paths(clean).tables, output_paths(clean).ledger),
        (*output_paths(out).tables, output_paths(out).ledger),
        strict=True,
    ):
        assert a.read_bytes() == b.read_bytes(), f"{b.name} differs from the uninterrupted run"
    rows = read_rows(out)
    assert_contiguous(rows)
    assert len(rows) == sum(expected_bars(sorted(corpus.iterdir())).values())


def test_musetok_and_hybrid_backends_match_direct_prediction(
    tmp_path: Path, sample_files: list[Path], tiny_checkpoint: Path, request: pytest.FixtureRequest
) -> None:
    import torch

    from midiva.features import FEATURE_NAMES, bar_features
    from midiva.latents import encode_bars, load_encoder
    from midiva.midi import load_midi
    from midiva.model import InputRecipe, Regressor, VARegressor, load_regressor, save_regressor

    files = [p for p in sample_files if p.name.startswith("POP909") or p.name in ("Maestro_1.mid", "Funkytown.mid")]
    encoder = load_encoder(tiny_checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `midiva annotate` does with workers; the suite runs on 2 shared cores
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    for backend in ("musetok", "hybrid"):
        torch.manual_seed(3)
        names = tuple(FEATURE_NAMES) if backend == "hybrid" else ()
        recipe = InputRecipe(backend, names, encoder.config.d_latent, ("mean",))
        model = save_regressor(
            tmp_path / f"{backend}.safetensors", Regressor(VARegressor(recipe.input_dim, 16).eval(), recipe)
        )
        out = tmp_path / backend / "a.csv"
        assert (
            run_cli(
                "annotate",
                *files,
                "--out",
                out,
                "--model",
                model,
                "--checkpoint",
                tiny_checkpoint,
                "--device",
                "cpu",
                "--batch-size",
                64,
                "--num-workers",
                1,
                "-q",
            )
            == 0
        )
        rows = read_rows(out)
        assert_contiguous(rows)
        regressor = load_regressor(model)
        for path in files:  # each file alone, outside the pipeline: the bars must line up
            midi = load_midi(path)
            bars = midi_to_bars(path)
            latents = encode_bars(encoder, bars.bar_token_ids()).latents
            features = bar_features(midi, bars).values if backend == "hybrid" else None
            direct = regressor.predict(regressor.make_inputs(features, latents))
            got = np.array([(v, a) for m, _, v, a in rows if m == midi.md5])
            assert got.shape == direct.shape
            np.testing.assert_allclose(got, direct, atol=2e-4)


def test_limit_stops_early_and_resume_completes_identically(tmp_path: Path, sample_files: list[Path]) -> None:
    clean = tmp_path / "clean.csv"
    annotate_stream(iter_files(sample_files), clean, FakeRegressor(), options=AnnotateOptions(batch_size=256))
    out = tmp_path / "part.csv"
    first = annotate_stream(
        iter_files(sample_files), out, FakeRegressor(), options=AnnotateOptions(batch_size=256, limit=7)
    )
    assert first.files_done + first.files_failed == 7 and not first.complete
    assert not scan_ledger(output_paths(out).ledger).complete  # type: ignore[union-attr]
    second = annotate_stream(iter_files(sample_files), out, FakeRegressor(), options=AnnotateOptions(batch_size=1000))
    assert second.files_skipped_done == 7 and second.complete
    assert second.total_files == 30 and second.total_bars == len(read_rows(out)) == first.bars + second.bars
    assert out.read_bytes() == clean.read_bytes()


def test_worker_pool_matches_in_process_run(tmp_path: Path, sample_files: list[Path]) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    annotate_stream(iter_files(sample_files), a, FakeRegressor(), options=AnnotateOptions(num_workers=0))
    annotate_stream(
        iter_files(sample_files), b, FakeRegressor(), options=AnnotateOptions(num_workers=2, batch_size=300)
    )
    assert a.read_bytes() == b.read_bytes()
    assert output_paths(a).meta.read_bytes() == output_paths(b).meta.read_bytes()


def parse_only(row: SourceRow, options: PrepareOptions, strict: bool) -> FileResult:
    """prepare_file without the run's prediction step: the main process predicts and formats."""
    return prepare_file(row, dataclasses.replace(options, finish=None), strict)


def test_rows_made_in_workers_match_rows_made_by_the_writer(tmp_path: Path, sample_files: list[Path]) -> None:
    from midiva.model import load_regressor

    regressor = load_regressor()
    runs = {
        "workers": dict(options=AnnotateOptions(num_workers=2)),
        "in_process": dict(options=AnnotateOptions(num_workers=0, batch_size=97)),
        "writer": dict(options=AnnotateOptions(num_workers=2), prepare=parse_only),
    }
    for name, kwargs in runs.items():
        annotate_stream(iter_files(sample_files), tmp_path / name / "a.csv", regressor, **kwargs)  # type: ignore[arg-type]
    tables = {name: [p.read_bytes() for p in output_paths(tmp_path / name / "a.csv").tables] for name in runs}
    assert tables["workers"] == tables["in_process"] == tables["writer"]
    meta = read_dicts(output_paths(tmp_path / "workers" / "a.csv").meta)
    ok = [r for r in meta if r["status"] == "ok"]
    assert len(ok) == len(meta) - 1 and all(r["domain_distance"] for r in ok)  # only the empty file fails


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_model_that_predicts_nan_stops_the_run_and_keeps_nothing_wrong(
    tmp_path: Path, sample_files: list[Path], num_workers: int
) -> None:
    import torch

    from midiva.model import load_regressor

    regressor = load_regressor(make_model(tmp_path / "m.safetensors", seed=1))
    with torch.no_grad():
        regressor.module.out.bias.fill_(float("nan"))  # damaged weights: every bar would be NaN
    out = tmp_path / "a.csv"
    with pytest.raises(DataError, match="weights are unusable"):
        annotate_stream(iter_files(sample_files[:3]), out, regressor, options=AnnotateOptions(num_workers=num_workers))
    assert read_rows(out) == []  # no file was recorded as annotated, nor as failed for the model's fault
    assert read_dicts(output_paths(out).failures) == []


def crash_on_funkytown(row: SourceRow, options: PrepareOptions, strict: bool) -> FileResult:
    if "Funkytown" in row.name:
        os._exit(139)  # what a segfault in the MIDI parser looks like from outside
    return prepare_file(row, options, strict)


def test_a_crashing_worker_costs_only_its_file(tmp_path: Path, sample_files: list[Path]) -> None:
    out = tmp_path / "a.csv"
    summary = annotate_stream(
        iter_files(sample_files),
        out,
        FakeRegressor(),
        prepare=crash_on_funkytown,
        options=AnnotateOptions(num_workers=2),
    )
    failures = read_dicts(output_paths(out).failures)
    crashed = [f for f in failures if f["error_type"] == "WorkerCrash"]
    assert len(crashed) == 1 and "Funkytown" in crashed[0]["name"]
    assert summary.files_done == 28 and summary.files_failed == 2


def test_row_text_is_the_plain_formatting_byte_for_byte() -> None:
    from midiva.annotate import format_rows

    rng = np.random.default_rng(3)
    edges = [0.0, -0.0, 1.0, -1.0, 0.99995, -0.99995, 0.00005, -0.00005, -0.00004999, 0.12345, -0.5, 0.49995]
    sweep = np.linspace(-1, 1, 400_002).reshape(-1, 2)  # every 0.5e-5: each rounding boundary's neighbours
    for values in (
        *np.array_split(sweep, 4),
        rng.uniform(-1, 1, (5000, 2)),
        np.array(edges).reshape(-1, 2),
        rng.uniform(-1, 1, (7, 2)).astype(np.float32),
        np.array([[1.5, -3.0], [np.nan, 0.2], [0.1, np.inf]]),
        np.zeros((0, 2)),
    ):
        plain = (np.round(np.asarray(values, dtype=np.float64), 4) + 0.0).tolist()
        expected = "".join(f"{'a' * 32},{i},{v:.4f},{a:.4f}\n" for i, (v, a) in enumerate(plain)).encode()
        assert format_rows("a" * 32, values) == expected


def blas_threads_now() -> int:
    from threadpoolctl import threadpool_info

    return max(int(pool["num_threads"]) for pool in threadpool_info() if pool["user_api"] == "blas")


def record_blas_threads(row: SourceRow, options: PrepareOptions, strict: bool) -> FileResult:
    """prepare_file, with the BLAS threads of the process that parsed the row as its split."""
    return dataclasses.replace(prepare_file(row, options, strict), split=str(blas_threads_now()))


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("cpu_threads", [1, 0])
def test_cpu_threads_caps_blas_where_files_are_parsed(
    tmp_path: Path, sample_files: list[Path], num_workers: int, cpu_threads: int
) -> None:
    from threadpoolctl import threadpool_limits

    out = tmp_path / "a.csv"
    with threadpool_limits(limits=2, user_api="blas"):  # as if the machine had 2 cores and no cap
        annotate_stream(
            iter_files(sample_files[:4]),
            out,
            FakeRegressor(),
            prepare=record_blas_threads,
            options=AnnotateOptions(num_workers=num_workers, cpu_threads=cpu_threads),
        )
        after = blas_threads_now()
    splits = {r["split"] for r in read_dicts(output_paths(out).meta) if r["status"] == "ok"}
    assert splits == {"1" if cpu_threads else "2"}
    assert after == 2  # the run gives the caller's limit back


def record_malloc_tuned(row: SourceRow, options: PrepareOptions, strict: bool) -> FileResult:
    """prepare_file, with whether the process that parsed the row keeps freed memory as its split."""
    from midiva.prepare import _worker_state

    return dataclasses.replace(prepare_file(row, options, strict), split=str(_worker_state.get("malloc_tuned", False)))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_parsing_workers_keep_freed_memory_and_the_caller_does_not(
    tmp_path: Path, sample_files: list[Path], num_workers: int
) -> None:
    from midiva.prepare import keep_freed_memory

    out = tmp_path / "a.csv"
    options = AnnotateOptions(num_workers=num_workers)
    annotate_stream(iter_files(sample_files[:2]), out, FakeRegressor(), prepare=record_malloc_tuned, options=options)
    splits = {r["split"] for r in read_dicts(output_paths(out).meta) if r["status"] == "ok"}
    assert splits == {str(num_workers > 0)}
    if sys.platform.startswith("linux"):
        script = "from midiva.prepare import keep_freed_memory; import numpy; assert keep_freed_memory(); numpy.ones(1 << 24)"
        subprocess.run([sys.executable, "-c", script], check=True)
    else:
        assert not keep_freed_memory()


# ---------------------------------------------------------------- shards and merge


def test_shards_partition_the_run_and_merge_back(
    tmp_path: Path, sample_files: list[Path], tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = sample_files[0].parent
    full = tmp_path / "full.csv"
    assert run_cli("annotate", corpus, "--out", full, "--model", tiny_model, "-q") == 0
    shard_csvs = []
    for i in range(3):
        shard = tmp_path / f"shard{i}" / "a.csv"
        assert (
            run_cli(
                "annotate", corpus, "--out", shard, "--model", tiny_model, "--num-shards", 3, "--shard-index", i, "-q"
            )
            == 0
        )
        shard_csvs.append(shard)
        md5s = {r["md5"] for r in read_dicts(output_paths(shard).meta)}
        assert md5s and all(shard_of(m, 3) == i for m in md5s)
    shard_rows = [read_rows(s) for s in shard_csvs]
    assert sum(len(r) for r in shard_rows) == len(read_rows(full))
    assert sorted(r for rows in shard_rows for r in rows) == sorted(read_rows(full))
    merged = tmp_path / "merged" / "a.csv"
    capsys.readouterr()
    assert run_cli("merge", *shard_csvs, "--out", merged, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"] + report["failed"] == 30 and report["bars"] == len(read_rows(full))
    assert sorted(read_rows(merged)) == sorted(read_rows(full))
    assert len(read_dicts(output_paths(merged).meta)) == 30
    assert scan_ledger(output_paths(merged).ledger).n_files == 30  # type: ignore[union-attr]
    # A missing shard, and the same shard twice, are refused.
    assert run_cli("merge", shard_csvs[0], shard_csvs[1], "--out", tmp_path / "m2.csv") == 1
    assert "missing [2]" in capsys.readouterr().err
    assert (
        run_cli("merge", shard_csvs[0], shard_csvs[0], shard_csvs[1], shard_csvs[2], "--out", tmp_path / "m3.csv") == 1
    )
    assert f"{str(shard_csvs[0])!r} is given twice" in capsys.readouterr().err


def test_merge_detects_a_duplicate_and_damaged_rows(tmp_path: Path, sample_files: list[Path]) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    annotate_stream(iter_files(sample_files[:10]), a, FakeRegressor())
    annotate_stream(iter_files(sample_files[8:16]), b, FakeRegressor())
    with pytest.raises(DataError, match="also appears in an earlier input"):
        merge_outputs([a, b], tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()
    c = tmp_path / "c.csv"
    annotate_stream(iter_files(sample_files[10:16]), c, FakeRegressor())
    report = merge_outputs([a, c], tmp_path / "m.csv")
    assert report.files + report.failed == 16
    text = c.read_text().splitlines(keepends=True)
    md5, bar, rest = text[2].split(",", 2)
    text[2] = f"{md5},{int(bar) + 1},{rest}"  # same length: the ledger offsets still match
    c.write_text("".join(text))
    with pytest.raises(DataError, match="not bar_numbers"):
        merge_outputs([a, c], tmp_path / "m2.csv")


def test_merge_refuses_an_incomplete_shard(tmp_path: Path, sample_files: list[Path]) -> None:
    a = tmp_path / "a.csv"
    annotate_stream(iter_files(sample_files), a, FakeRegressor(), options=AnnotateOptions(limit=3))
    with pytest.raises(DataError, match="incomplete"):
        merge_outputs([a], tmp_path / "m.csv")
    assert merge_outputs([a], tmp_path / "m.csv", allow_incomplete=True).files == 3


# ---------------------------------------------------------------- bad input and bad output


def test_bad_files_are_recorded_and_long_files_annotated(tmp_path: Path) -> None:
    corpus = tmp_path / "bad"
    corpus.mkdir()
    files = {
        "zero_bytes.mid": b"",
        "truncated_header.mid": b"MThd\x00\x00\x00",
        "not_midi.mid": b"RIFF....WAVEfmt " * 4,
        "drums_only.mid": make_score(6, drums_only=True),
        "ten_thousand_bars.mid": make_score(10_000),
        "fine.mid": make_score(3),
    }
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    out = tmp_path / "a.csv"
    summary = annotate_stream(
        iter_files(list_midi_files([corpus])), out, FakeRegressor(), options=AnnotateOptions(batch_size=4096)
    )
    failures = {r["name"].rsplit("/", 1)[-1]: r for r in read_dicts(output_paths(out).failures)}
    assert set(failures) == {"zero_bytes.mid", "truncated_header.mid", "not_midi.mid"}
    assert all(f["error_type"] == "MidiReadError" and f["message"] for f in failures.values())
    per_file = {
        hashlib.md5(d).hexdigest(): n
        for d, n in ((files["drums_only.mid"], 6), (files["ten_thousand_bars.mid"], 10_000), (files["fine.mid"], 3))
    }
    rows = read_rows(out)
    assert_contiguous(rows)
    assert {m: len(b) for m, b in bars_by_md5(rows).items()} == per_file
    assert summary.failures_by_type == {"MidiReadError": 3}
    no_drums = tmp_path / "nd.csv"
    annotate_stream(
        iter_files([corpus / "drums_only.mid"]), no_drums, FakeRegressor(), options=AnnotateOptions(include_drums=False)
    )
    assert read_dicts(output_paths(no_drums).failures)[0]["error_type"] == "EmptyScoreError"
    with pytest.raises(MidiReadError):
        annotate_stream(
            iter_files([corpus / "not_midi.mid"]),
            tmp_path / "s.csv",
            FakeRegressor(),
            options=AnnotateOptions(strict=True),
        )


def test_model_and_backend_mismatch_is_refused_before_work(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a.csv"
    assert run_cli("annotate", EXAMPLES, "--out", out, "--model", tiny_model, "--backend", "musetok") == 1
    err = capsys.readouterr().err
    assert "ConfigError" in err and "--backend musetok does not match" in err and "'features'" in err
    assert not out.exists()


def test_resume_with_another_model_is_refused_and_no_resume_starts_over(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a.csv"
    other = make_model(tmp_path / "other.safetensors", seed=1)
    assert run_cli("annotate", EXAMPLES, "--out", out, "--model", tiny_model, "-q") == 0
    first = out.read_bytes()
    assert run_cli("annotate", EXAMPLES, "--out", out, "--model", other, "-q") == 1
    assert "other settings" in capsys.readouterr().err and out.read_bytes() == first
    assert run_cli("annotate", EXAMPLES, "--out", out, "--model", other, "--no-resume", "-q") == 0
    assert out.read_bytes() != first and len(read_rows(out)) == len(first.decode().splitlines()) - 1


def _read_only(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """Make writes under `directory` fail as on a read-only mount (chmod alone does not stop root)."""
    directory.chmod(0o555)
    if os.geteuid() != 0:
        return
    real_open = builtins.open

    def guarded(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+") and Path(str(file)).resolve().is_relative_to(directory.resolve()):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


def test_read_only_output_is_a_clear_error(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    _read_only(monkeypatch, locked)
    try:
        assert run_cli("annotate", EXAMPLES, "--out", locked / "a.csv", "--model", tiny_model, "-q") == 1
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert "OutputError" in err and "a.csv" in err and "writable --out" in err


def test_full_disk_keeps_committed_rows_and_rerun_completes(
    tmp_path: Path, sample_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = tmp_path / "clean.csv"
    options = AnnotateOptions(batch_size=256, commit_interval_s=0.0)
    annotate_stream(iter_files(sample_files), clean, FakeRegressor(), options=options)
    real_write_all = ledger_mod._write_all
    calls = Counter[str]()

    def fill_up(handle: Any, data: Any) -> None:
        calls["n"] += 1
        if calls["n"] >= 13:  # a few commits succeed, then the disk is full mid-commit
            real_write_all(handle, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(handle, data)

    monkeypatch.setattr(ledger_mod, "_write_all", fill_up)
    out = tmp_path / "a.csv"
    with pytest.raises(OutputError, match=r"No space left on device.*rerun the same command"):
        annotate_stream(iter_files(sample_files), out, FakeRegressor(), options=options)
    state = scan_ledger(output_paths(out).ledger)
    assert state is not None and 0 < state.n_files < 30
    for path, end in zip(output_paths(out).tables, state.ends, strict=True):
        assert path.stat().st_size == end  # the half-written commit was rolled back
    assert clean.read_bytes().startswith(out.read_bytes())
    monkeypatch.setattr(ledger_mod, "_write_all", real_write_all)
    annotate_stream(iter_files(sample_files), out, FakeRegressor(), options=options)
    assert out.read_bytes() == clean.read_bytes()


def test_rows_without_a_ledger_are_not_overwritten(tmp_path: Path, sample_files: list[Path]) -> None:
    out = tmp_path / "a.csv"
    annotate_stream(iter_files(sample_files[:3]), out, FakeRegressor())
    output_paths(out).ledger.unlink()
    before = out.read_bytes()
    with pytest.raises(OutputError, match=r"ledger .* missing"):
        annotate_stream(iter_files(sample_files[:3]), out, FakeRegressor())
    assert out.read_bytes() == before
    annotate_stream(iter_files(sample_files[:3]), out, FakeRegressor(), options=AnnotateOptions(resume=False))
    assert out.read_bytes() == before


# ---------------------------------------------------------------- the hub (no network: load_dataset is replaced)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_broken_source_keeps_the_finished_files(tmp_path: Path, sample_files: list[Path], num_workers: int) -> None:
    def rows() -> Any:
        yield from iter_files(sample_files[:6])
        raise SourceError("the hub stream broke")

    out = tmp_path / "a.csv"
    options = AnnotateOptions(commit_interval_s=3600, num_workers=num_workers)
    with pytest.raises(SourceError):
        annotate_stream(rows(), out, FakeRegressor(), options=options)
    state = scan_ledger(output_paths(out).ledger)
    assert state is not None and state.n_files == 6 and not state.complete
    rerun = annotate_stream(iter_files(sample_files[:6]), out, FakeRegressor())
    assert rerun.files_skipped_done == 6 and rerun.complete


def test_retried_failures_are_superseded_in_the_merge(tmp_path: Path, sample_files: list[Path]) -> None:
    corpus = _symlink_corpus(tmp_path / "corpus", sample_files[:4])
    (corpus / "broken.mid").write_bytes(b"MThd\x00")
    out = tmp_path / "a.csv"
    annotate_stream(iter_files(list_midi_files([corpus])), out, FakeRegressor())
    again = annotate_stream(
        iter_files(list_midi_files([corpus])), out, FakeRegressor(), options=AnnotateOptions(retry_failures=True)
    )
    assert again.files_failed == 1 and again.files_skipped_done == 4
    assert len(read_dicts(output_paths(out).failures)) == 2  # the log keeps both attempts
    merged = tmp_path / "m.csv"
    report = merge_outputs([out], merged)
    assert (report.files, report.failed) == (4, 1)
    assert len(read_dicts(output_paths(merged).failures)) == 1 and len(read_dicts(output_paths(merged).meta)) == 5


def test_hub_source_passes_config_splits_and_token(monkeypatch: pytest.MonkeyPatch, sample_files: list[Path]) -> None:
    import datasets

    calls = []
    data = sample_files[0].read_bytes()

    def fake_load_dataset(path: str, **kwargs: Any) -> list[dict[str, Any]]:
        calls.append((path, kwargs))
        return [{"md5": hashlib.md5(data).hexdigest(), "music": data, "title": kwargs["split"], "NOMML": [12]}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = list(iter_hub(config="v2.0.0", token="hf_secret"))
    assert [c[1]["split"] for c in calls] == ["train", "validation", "test"]
    assert all(
        c[0] == "Metacreation/GigaMIDI"
        and c[1]["name"] == "v2.0.0"
        and c[1]["token"] == "hf_secret"
        and c[1]["streaming"]
        for c in calls
    )
    assert [r.split for r in rows] == ["train", "validation", "test"] and rows[0].meta["NOMML"] == "12"


@pytest.mark.parametrize("kind", ["gated", "http401", "not_authenticated"])
def test_hub_access_errors_say_how_to_get_access(
    monkeypatch: pytest.MonkeyPatch, kind: str, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import datasets
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    class Response:  # the parts of an HTTP response the hub's errors read
        status_code = 401
        headers: ClassVar[dict[str, str]] = {}
        request = None

    def denied(path: str, **kwargs: Any) -> Any:
        if kind == "gated":
            raise GatedRepoError("Access to dataset Metacreation/GigaMIDI is restricted.", response=Response())  # type: ignore[arg-type]
        if kind == "http401":
            raise HfHubHTTPError("Client Error for url https://huggingface.co/api/datasets/x", response=Response())  # type: ignore[arg-type]
        raise datasets.exceptions.DatasetNotFoundError(
            "Dataset 'Metacreation/GigaMIDI' is a gated dataset on the Hub. You must be authenticated to access it."
        )

    monkeypatch.setattr(datasets, "load_dataset", denied)
    with pytest.raises(
        SourceError, match=r"huggingface\.co/datasets/Metacreation/GigaMIDI.*HF_TOKEN.*huggingface-cli login"
    ):
        list(iter_hub(splits=["train"]))
    assert (
        run_cli(
            "annotate",
            "--dataset",
            "Metacreation/GigaMIDI",
            "--split",
            "train",
            "--out",
            tmp_path / "a.csv",
            "--model",
            tiny_model,
            "-q",
        )
        == 1
    )
    assert "accept its conditions" in capsys.readouterr().err


def test_annotate_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("annotate", "--out", tmp_path / "a.csv") == 2
    assert "exactly one of them" in capsys.readouterr().err
    assert run_cli("annotate", EXAMPLES, "--num-shards", 2, "--shard-index", 2) == 2
    assert "--shard-index 2 must be below --num-shards 2" in capsys.readouterr().err
    assert run_cli("annotate", tmp_path / "missing_dir", "--out", tmp_path / "a.csv") == 1
    assert "missing_dir' does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        annotate_stream([], tmp_path / "x.csv", FakeRegressor(), options=AnnotateOptions(num_shards=2, shard_index=5))


def test_annotate_out_is_a_directory_and_merge_into_a_file_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    assert run_cli("annotate", EXAMPLES, "--out", folder, "-q") == 2  # usage: --out names a file
    assert f"'{folder}' is a directory" in capsys.readouterr().err
    out = tmp_path / "a.csv"
    assert run_cli("annotate", EXAMPLES, "--out", out, "-q") == 0
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert run_cli("merge", out, "--out", blocker / "m.csv") == 1
    err = capsys.readouterr().err
    assert "OutputError: cannot write the merged output" in err and "Traceback" not in err
