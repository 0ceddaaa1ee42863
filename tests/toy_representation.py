"""A representation defined outside midiva, as a new backend would be: this module plus its `register` call.

'toy' encodes each bar's token ids into two numbers (token count, a token checksum) in the main
process, batched across files like an encoder on a device; it counts its calls so tests can see the
batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from midiva.representations import EncodeContext, Representation, register


class ToyEncoder:
    """Stands in for a learned encoder; `version` is its identity in resume fingerprints."""

    def __init__(self, version: str = "1") -> None:
        self.version = version
        self.calls: list[int] = []  # songs per encode call


def _load(checkpoint: Path | str | None, device: str, storage_dir: Path | str | None) -> ToyEncoder:
    return ToyEncoder()


def _encode(
    encoder: ToyEncoder, songs: Sequence[Sequence[Sequence[int]]], context: EncodeContext
) -> list[dict[str, Any]]:
    encoder.calls.append(len(songs))
    return [
        {"toy": np.array([[len(bar), sum(bar) % 97] for bar in song], np.float32).reshape(len(song), 2)}
        for song in songs
    ]


REPRESENTATION = register(
    Representation(
        name="toy",
        needs="tokens",
        batched=True,
        load=_load,
        encode=_encode,
        fingerprint=lambda encoder: {"toy_version": encoder.version},
        description="token count and checksum per bar (a test representation)",
    )
)
