"""Bar representations as a registry: what a model's per-bar inputs are made of.

A representation turns one parsed file (`midiva.prepare.FileResult`) into a (n_bars, dim) float32
block. It registers its name, what the parsing worker must compute for it (`needs`: the bar
features, or the bars' REMI token ids), whether it is encoded in the main process in batches across
files (`batched`, an encoder on the run's device), how it loads its encoder and encodes a batch, and
what identifies it in a resume fingerprint. A backend (what a model was trained on, and what
`--backend` names) is a recipe: one representation, a built-in alias ('hybrid' = features then
musetok) or names joined by '+' ('features+barseq'); the model's input is its blocks side by side.

Adding a representation is one new module that defines a `Representation` named `REPRESENTATION`,
plus its line in `BUILTIN` below (or a `register` call, for code outside midiva). Modules are
imported only when their representation is used, so the features backend never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy.typing as npt

from midiva.errors import ConfigError

NEEDS = ("features", "tokens", "pitched_tokens")


@dataclass(frozen=True)
class EncodeContext:
    """How the batched representations of one run encode (the run's device settings)."""

    batch_size: int = 4096
    device: str = "cpu"
    autocast: str | None = None


@dataclass(frozen=True)
class Representation:
    """One kind of per-bar input and how a batch job makes it.

    Attributes:
        name: registry key; also the key of its block in stored clips (see `store_key`).
        needs: what the parsing worker computes per file: 'features' (`FileResult.features`),
            'tokens' (`FileResult.token_ids`, one list of REMI token ids per bar) or 'pitched_tokens'
            (`FileResult.pitched_token_ids`: the same bars' ids made from the pitched tracks only).
        batched: encoded in the main process, the bars of many files per call (an encoder);
            False: the block is the worker's output as it is.
        store_key: tensor name of the block in per-file/clip safetensors files.
        load: `(checkpoint, device, storage_dir) -> encoder` (None for unbatched representations).
        encode: `(encoder, songs, context) -> per song, its named (n_bars, ...) arrays`, where a
            song is the list of its bars' token ids; the model's block is the one named `store_key`
            (others, e.g. MuseTok's codebook indices, are kept by sinks that store tensors).
        fingerprint: `encoder -> {key: value}` that identifies the encoder in a resume fingerprint.
        batch_invariant: a bar's values do not depend on which bars share its batch; when False,
            the batch size is part of the fingerprint.
        description: one line for `--help` and error messages.
    """

    name: str
    needs: str
    batched: bool = False
    store_key: str = ""
    load: Callable[[Path | str | None, str, Path | str | None], Any] | None = None
    encode: (
        Callable[[Any, Sequence[Sequence[Sequence[int]]], EncodeContext], list[dict[str, npt.NDArray[Any]]]] | None
    ) = None
    fingerprint: Callable[[Any], dict[str, Any]] = field(default=lambda encoder: {})
    batch_invariant: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.needs not in NEEDS:
            raise ConfigError(f"representation {self.name!r}: needs must be one of {NEEDS}, got {self.needs!r}")
        if self.batched and (self.load is None or self.encode is None):
            raise ConfigError(f"representation {self.name!r} is batched but has no load/encode function")
        if not self.store_key:
            object.__setattr__(self, "store_key", self.name)


# name -> module that defines REPRESENTATION (imported on first use)
BUILTIN: dict[str, str] = {
    "features": "midiva.features",
    "musetok": "midiva.latents",
    "barseq": "midiva.barseq",
}
ALIASES: dict[str, tuple[str, ...]] = {"hybrid": ("features", "musetok")}
_registered: dict[str, Representation] = {}


def register(representation: Representation) -> Representation:
    """Add a representation (e.g. from a plug-in module); returns it.

    Raises:
        ConfigError: another representation has this name.
    """
    known = _registered.get(representation.name)
    if known is not None and known is not representation:
        raise ConfigError(f"a representation named {representation.name!r} is already registered")
    if representation.name in ALIASES or "+" in representation.name:
        raise ConfigError(f"{representation.name!r} cannot name a representation (an alias or a '+' recipe)")
    _registered[representation.name] = representation
    return representation


def names() -> tuple[str, ...]:
    """Every representation's name (built-in first)."""
    return tuple(dict.fromkeys([*BUILTIN, *_registered]))


def backend_names() -> tuple[str, ...]:
    """What `--backend` accepts besides '+' recipes: every representation and the aliases."""
    return (*names(), *ALIASES)


def get(name: str) -> Representation:
    """The representation called `name`.

    Raises:
        ConfigError: no such representation.
    """
    if name not in _registered and name in BUILTIN:
        module = importlib.import_module(BUILTIN[name])
        register(module.REPRESENTATION)
    if name not in _registered:
        raise ConfigError(f"unknown bar representation {name!r}; known: {', '.join(backend_names())}")
    return _registered[name]


def recipe(backend: str) -> tuple[Representation, ...]:
    """The representations of a backend, in input column order ('hybrid' -> features, musetok).

    Raises:
        ConfigError: an unknown name, or one given twice.
    """
    parts = ALIASES.get(backend) or tuple(backend.split("+"))
    if len(set(parts)) != len(parts):
        raise ConfigError(f"backend {backend!r} names a representation twice")
    return tuple(get(part) for part in parts)


def is_backend(backend: str) -> bool:
    """Whether `backend` names a known recipe."""
    try:
        recipe(backend)
    except ConfigError:
        return False
    return True


def needs_of(backend: str) -> frozenset[str]:
    """What the parsing worker computes for a backend (a subset of `NEEDS`, e.g. {'features', 'tokens'})."""
    return frozenset(rep.needs for rep in recipe(backend))


def load_encoders(
    backend: str, *, checkpoint: Path | str | None = None, device: str = "cpu", storage_dir: Path | str | None = None
) -> dict[str, Any]:
    """The loaded encoder of each batched representation of `backend`, by name.

    `checkpoint` is MuseTok's (the one representation with a user-supplied checkpoint today); each
    other representation loads its own default.
    """
    return {
        rep.name: rep.load(checkpoint if rep.name == "musetok" else None, device, storage_dir)  # type: ignore[misc]
        for rep in recipe(backend)
        if rep.batched
    }


def fingerprint(backend: str, encoders: Mapping[str, Any], context: EncodeContext) -> dict[str, Any]:
    """What identifies the representations of a run: each encoder's identity, and the batch size
    or autocast mode where those change the values."""
    out: dict[str, Any] = {}
    for rep in recipe(backend):
        if not rep.batched:
            continue
        out.update(rep.fingerprint(encoders[rep.name]))
        if context.autocast:
            out["autocast"] = context.autocast
        if not rep.batch_invariant:
            out["batch_size"] = context.batch_size
    return out


def encode_batch(
    backend: str,
    encoders: Mapping[str, Any],
    songs: Mapping[str, Sequence[Sequence[Sequence[int]]]],
    context: EncodeContext,
) -> dict[str, list[dict[str, npt.NDArray[Any]]]]:
    """Every batched representation's arrays for a batch of songs (per song, its named arrays), by name.

    `songs` holds the batch once per kind of token input, keyed by need ('tokens', 'pitched_tokens');
    each representation encodes the one it `needs`.

    Raises:
        ConfigError: an encoder the backend needs was not loaded.
    """
    out: dict[str, list[dict[str, npt.NDArray[Any]]]] = {}
    for rep in recipe(backend):
        if not rep.batched:
            continue
        if encoders.get(rep.name) is None:
            raise ConfigError(f"the {backend!r} backend needs the {rep.name} encoder; pass --checkpoint")
        assert rep.encode is not None
        batch = songs.get(rep.needs, ())
        out[rep.name] = rep.encode(encoders[rep.name], batch, context) if batch else []
    return out
