"""Short fuzz run: a few hundred seeded malformed files through `midiva annotate`, twice.

The long run (≥ 10,000 files) is `python benchmarks/fuzz.py`; both use `midi_fuzz`.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from midi_fuzz import FAMILIES, TYPED_ERRORS, check_outputs, generate, output_bytes, write_cases

from midiva.prepare import PrepareOptions, prepare_file
from midiva.sources import SourceRow

N_FILES = 300
SEED = 0


def run_annotate(directory: Path, out: Path, num_workers: int, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`midiva annotate` in a fresh process; a hang shows as TimeoutExpired."""
    command = [
        sys.executable,
        "-m",
        "midiva",
        "-q",
        "annotate",
        str(directory),
        "--out",
        str(out),
        "--num-workers",
        str(num_workers),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)


def test_generator_is_seeded_and_covers_every_family() -> None:
    first, again, other = generate(SEED, 40), generate(SEED, 40), generate(SEED + 1, 40)
    assert first == again and first != other
    assert {name.split("_", 1)[1].removesuffix(".mid") for name, _ in first} == set(FAMILIES)


@pytest.mark.timeout(120)
def test_every_case_fails_typed_in_every_stage_without_warnings(gigamidi_sample: Path) -> None:
    """In process, features and MuseTok tokens both: any exception other than a MidivaError is a bug."""
    seeds = [p.read_bytes() for p in sorted(gigamidi_sample.glob("*.mid")) if 0 < p.stat().st_size < 60_000][:10]
    options = PrepareOptions(include_drums=True, features=True, tokens=True)
    kinds: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, data in generate(SEED + 7, N_FILES, seeds):
            result = prepare_file(
                SourceRow(name, name, music=data or None, error_type=None if data else "DataError"), options
            )
            assert result.ok or result.error_type in TYPED_ERRORS, (name, result.error_type, result.error)
            assert not result.ok or (result.features is not None and result.token_ids is not None)
            kinds.add(result.error_type)
    assert "" in kinds and "MidiReadError" in kinds


@pytest.mark.timeout(240)
def test_short_fuzz_run_keeps_every_property(tmp_path: Path, gigamidi_sample: Path) -> None:
    seeds = [p.read_bytes() for p in sorted(gigamidi_sample.glob("*.mid")) if 0 < p.stat().st_size < 60_000][:10]
    paths = write_cases(generate(SEED, N_FILES, seeds), tmp_path / "cases")
    outputs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}" / "a.csv"
        done = run_annotate(tmp_path / "cases", out, workers, timeout_s=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Warning" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
        check = check_outputs(out, paths)
        assert check.problems == [], check.problems[:10]
        assert check.files == len({p.read_bytes() for p in paths}) and check.crashes == 0
        assert 0 < check.annotated < check.files  # the valid family annotates, the rest mostly fails
        outputs[workers] = output_bytes(out)
    assert outputs[0] == outputs[2]  # identical tables, failures included, with and without workers
