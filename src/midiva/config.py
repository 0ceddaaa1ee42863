"""Settings, resolved once in the CLI with precedence flag > environment > file > default.

Library functions take explicit arguments and never read the environment; this module is the
one place that does. The provenance file (`run.json` in an output directory, `<stem>.run.json` beside
an annotations CSV) records every resolved value with its source, plus versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from midiva.atomic import write_json_atomic
from midiva.errors import ConfigError

STORAGE_ENV = "VALENCE_AROUSAL_STORAGE_DIR"
# The bundled model's input recipe (scripts/train_default_model.sh; `midiva train`'s defaults): whole-piece
# and tempo-dependent columns out, and those that follow authoring rather than music (velocities,
# drum-including densities, note-count polyphony, harmony weighted by written note lengths, which
# follow a transcription's or a sequencer's convention: the onsets_* harmony columns replace them);
# the mean of bars b-8..b+8 as context.
DEFAULT_EXCLUDE_FEATURES = (
    "*_song",
    "tempo_bpm*",
    "note_count*",
    "*_per_beat*",
    "duration_beats*",
    "velocity_*",
    "note_density_*",
    "onset_density_*",
    "polyphony*",
    "mode*",
    "key_strength*",
    "chroma_entropy_bits*",
    "consonance*",
    "triad_*",
    "diatonicity*",
)
DEFAULT_CONTEXT = ("window8",)

# Settings field -> environment variable that overrides the config file.
ENV_VARS: dict[str, str] = {
    "device": "MIDIVA_DEVICE",
    "checkpoint": "MIDIVA_CHECKPOINT",
    "batch_size": "MIDIVA_BATCH_SIZE",
    "model": "MIDIVA_MODEL",
    "num_workers": "MIDIVA_NUM_WORKERS",
    "cpu_threads": "MIDIVA_CPU_THREADS",
    "storage_dir": STORAGE_ENV,
    "hf_token": "HF_TOKEN",
}

_storage_override: Path | None = None


@dataclass(frozen=True)
class Settings:
    """Every tunable of a run, with its default.

    Attributes:
        device: 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.
        checkpoint: MuseTok tokenizer checkpoint (None: `<storage_dir>/musetok/best_tokenizer/model.pt`).
        model: valence/arousal regressor (None: the bundled default model).
        backend: bar representation, 'features', 'musetok' or 'hybrid'.
        batch_size: bars per forward pass.
        num_workers: MIDI-parsing worker processes (0: parse in the main process).
        cpu_threads: BLAS/torch threads per process (0: the libraries' defaults, one per core each).
        storage_dir: where downloaded weights live (None: the per-user data directory).
        hf_token: Hugging Face token for the gated GigaMIDI data set.
    """

    device: str = "auto"
    checkpoint: str | None = None
    model: str | None = None
    backend: str = "features"
    batch_size: int = 4096
    num_workers: int = 0
    cpu_threads: int = 1
    storage_dir: str | None = None
    hf_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ResolvedSettings:
    """Settings plus the source ('flag', 'env', 'file', 'default') of each value."""

    settings: Settings
    sources: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        """Settings and sources as JSON-ready dicts (the token is never written)."""
        values = dataclasses.asdict(self.settings)
        values["hf_token"] = "***" if values.get("hf_token") else None
        return {"settings": values, "sources": self.sources}


def _coerce(name: str, value: Any, origin: str) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if "int" in str(kind) and not isinstance(value, int):
        try:
            return int(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{name} from {origin} must be an integer, got {value!r}") from err
    if value is not None and not isinstance(value, (str, int)):
        raise ConfigError(f"{name} from {origin} must be a string, got {value!r}")
    return str(value) if "str" in str(kind) and value is not None and not isinstance(value, str) else value


def parse_toml(text: str) -> dict[str, Any]:
    """Parse TOML text with `tomllib` (Python >= 3.11) or `tomli` (3.10; the same API).

    Raises:
        ValueError: the text is not TOML (`TOMLDecodeError` is a `ValueError`).
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    return tomllib.loads(text)


def read_config_file(path: Path | str) -> dict[str, Any]:
    """Read a TOML config file into a dict: settings at the top level, or all in a `[midiva]` table.

    A file shared with other tools (pyproject.toml) keeps their tables beside `[midiva]`; a
    top-level setting beside a `[midiva]` table is refused, never silently ignored.

    Raises:
        ConfigError: the file is missing or not TOML, has settings outside its `[midiva]`
            table, or names an unknown setting.
    """
    path = Path(path)
    try:
        data = parse_toml(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror or err}") from err
    except ValueError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from err
    known = {f.name for f in fields(Settings)}
    if "midiva" in data:
        table = data["midiva"]
        if not isinstance(table, dict):
            raise ConfigError(f"config file {str(path)!r}: 'midiva' must be a [midiva] table, got {table!r}")
        # other tools' tables may share the file; a scalar or a setting's name up here is meant for midiva
        outside = sorted(
            k for k, v in data.items() if k != "midiva" and (not isinstance(v, dict) or k.replace("-", "_") in known)
        )
        if outside:
            raise ConfigError(
                f"config file {str(path)!r} sets {outside} outside its [midiva] table, where they would be "
                "ignored; move them into [midiva] (or delete the [midiva] header to keep every setting at the top level)"
            )
        data = table
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {str(path)!r} has unknown settings {unknown}; known: {sorted(known)}")
    return data


def resolve_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | str | None = None,
) -> ResolvedSettings:
    """Merge defaults, a config file, environment variables and flags (later wins).

    Args:
        flags: values given on the command line; None values count as not given.
        env: environment mapping (the CLI passes os.environ).
        config_file: optional TOML file.

    Raises:
        ConfigError: a value has the wrong type or the file is invalid.
    """
    values = dataclasses.asdict(Settings())
    sources = dict.fromkeys(values, "default")
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file is not None:
        layers.append((f"file:{config_file}", read_config_file(config_file)))
    env = env or {}
    layers.append(("env", {k: env[v] for k, v in ENV_VARS.items() if env.get(v)}))
    layers.append(("flag", {k: v for k, v in (flags or {}).items() if k in values and v is not None}))
    for origin, layer in layers:
        for name, value in layer.items():
            values[name] = _coerce(name, value, origin)
            sources[name] = origin.split(":")[0]
    from midiva import representations

    if not representations.is_backend(str(values["backend"])):
        raise ConfigError(
            f"backend must be one of {', '.join(representations.backend_names())} or names joined by '+', "
            f"got {values['backend']!r}"
        )
    if int(values["batch_size"]) < 1:
        raise ConfigError(f"batch_size must be positive, got {values['batch_size']}")
    if int(values["cpu_threads"]) < 0:
        raise ConfigError(f"cpu_threads must be 0 (library defaults) or more, got {values['cpu_threads']}")
    return ResolvedSettings(Settings(**values), sources)


def set_storage_dir(path: Path | str | None) -> None:
    """Set the storage directory for this process (overrides the environment); None resets it."""
    global _storage_override
    _storage_override = Path(path).expanduser() if path is not None else None


def get_storage_dir(explicit: Path | str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Where weights are stored: explicit > set_storage_dir() > $VALENCE_AROUSAL_STORAGE_DIR > user data dir."""
    if explicit:
        return Path(explicit).expanduser()
    if _storage_override is not None:
        return _storage_override
    env = os.environ if env is None else env
    if env.get(STORAGE_ENV):
        return Path(env[STORAGE_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("midiva", appauthor=False))


def sha256_file(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str | None]:
    """Versions of midiva and the libraries that decide its numbers."""
    from importlib import metadata

    from midiva import __version__

    found: dict[str, str | None] = {"midiva": __version__, "python": sys.version.split()[0]}
    for dist in ("symusic", "torch", "numpy", "datasets"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def cpu_kind() -> dict[str, str]:
    """What decides float rounding in CPU training: the processor's model name, its instruction-set
    flags (as a short sha256) and the kernels torch dispatches to. Two machines with the same kind
    train bit-identical models; another kind rounds differently (e.g. AVX-512 against AVX2 kernels).
    """
    import hashlib
    import platform

    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:  # not Linux: the model name alone
        pass
    found = {"model": model, "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16]}
    try:
        import torch

        found["torch_capability"] = str(torch.backends.cpu.get_cpu_capability())
    except (ImportError, AttributeError):
        pass
    return found


def write_run_json(
    out_dir: Path | str,
    resolved: ResolvedSettings,
    *,
    command: str,
    extra: Mapping[str, Any] | None = None,
    checkpoint: Path | str | None = None,
    filename: str = "run.json",
) -> Path:
    """Write `filename` (settings with sources, versions, checkpoint sha256) atomically into out_dir."""
    out = Path(out_dir)
    record: dict[str, Any] = {"command": command, **resolved.to_json(), "versions": versions()}
    if checkpoint is not None and Path(checkpoint).is_file():
        record["checkpoint_sha256"] = sha256_file(checkpoint)
    if extra:
        record.update(extra)
    return write_json_atomic(out / filename, record, hint="choose a writable --out", indent=2, default=str)
