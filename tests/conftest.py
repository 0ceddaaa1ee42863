"""Shared fixtures: paths into ../shared (read-only test data beside the checkout)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data missing: {path} (expected ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def emopia_dir(shared_dir: Path) -> Path:
    """EMOPIA as distributed: midis/ and split/{train,val,test}.csv."""
    return _require(shared_dir / "data" / "emopia")


@pytest.fixture(scope="session")
def emopia_split(emopia_dir: Path) -> Path:
    return _require(emopia_dir / "split")


@pytest.fixture(scope="session")
def gigamidi_sample(shared_dir: Path) -> Path:
    """30 real MIDI files of the kinds GigaMIDI holds (one empty)."""
    return _require(shared_dir / "data" / "gigamidi_sample")


@pytest.fixture(scope="session")
def musetok_ref(shared_dir: Path) -> Path:
    """MuseTok reference: SPEC.md, golden events, dictionary, tiny_random/."""
    return _require(shared_dir / "reference" / "musetok")


@pytest.fixture(scope="session")
def tiny_checkpoint(musetok_ref: Path) -> Path:
    """The tiny random-weight MuseTok tokenizer state_dict (config.json beside it)."""
    return _require(musetok_ref / "tiny_random" / "model.pt")


@pytest.fixture(autouse=True)
def _restore_midiva_logger():
    """`cli.main` configures the 'midiva' logger (handler, level, no propagation); undo it per test
    so caplog sees library log records regardless of test order."""
    import logging

    logger = logging.getLogger("midiva")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def _subset_emopia(root: Path, emopia_dir: Path, per_split: dict[str, int]) -> Path:
    """A small EMOPIA copy (symlinks to the shared MIDI files) with evenly spaced clips of each official split."""
    (root / "midis").mkdir(parents=True)
    (root / "split").mkdir()
    for split, count in per_split.items():
        with open(emopia_dir / "split" / f"{split}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        rows = sorted(rows, key=lambda r: r["fname"])[:: max(1, len(rows) // count)][:count]
        with open(root / "split" / f"{split}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["fname", "label"])
            writer.writeheader()
            writer.writerows(rows)
        for row in rows:
            (root / "midis" / f"{row['fname']}.mid").symlink_to(emopia_dir / "midis" / f"{row['fname']}.mid")
    return root


@pytest.fixture(scope="session")
def emopia_subset(emopia_dir: Path) -> Callable[[Path, dict[str, int]], Path]:
    """`emopia_subset(root, {"train": 24, "val": 8})`: a small EMOPIA at `root` (see `_subset_emopia`)."""
    return lambda root, per_split: _subset_emopia(root, emopia_dir, per_split)
