"""Settings precedence: flag > environment > file > default, and run.json provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from midiva.config import (
    get_storage_dir,
    resolve_settings,
    set_storage_dir,
    write_run_json,
)
from midiva.errors import ConfigError


def test_defaults_when_nothing_given() -> None:
    resolved = resolve_settings({}, {}, None)
    assert resolved.settings.device == "auto"
    assert set(resolved.sources.values()) == {"default"}


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "midiva.toml"
    cfg.write_text('device = "cuda:1"\nbatch_size = 16\nnum_workers = 3\n')
    env = {"MIDIVA_DEVICE": "cpu", "MIDIVA_BATCH_SIZE": "32"}
    resolved = resolve_settings({"batch_size": 64, "device": None}, env, cfg)
    s = resolved.settings
    assert (s.batch_size, s.device, s.num_workers) == (64, "cpu", 3)
    assert resolved.sources["batch_size"] == "flag"
    assert resolved.sources["device"] == "env"
    assert resolved.sources["num_workers"] == "file"


def test_cpu_threads_setting_precedence_and_range(tmp_path: Path) -> None:
    cfg = tmp_path / "midiva.toml"
    cfg.write_text("cpu_threads = 4\n")
    assert resolve_settings({}, {}, None).settings.cpu_threads == 1
    assert resolve_settings({}, {}, cfg).settings.cpu_threads == 4
    resolved = resolve_settings({}, {"MIDIVA_CPU_THREADS": "0"}, cfg)
    assert (resolved.settings.cpu_threads, resolved.sources["cpu_threads"]) == (0, "env")
    assert resolve_settings({"cpu_threads": 2}, {"MIDIVA_CPU_THREADS": "0"}, cfg).settings.cpu_threads == 2
    with pytest.raises(ConfigError, match="cpu_threads must be 0"):
        resolve_settings({}, {"MIDIVA_CPU_THREADS": "-1"}, None)


def test_midiva_table_in_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "pyproject-like.toml"
    cfg.write_text('[midiva]\nbackend = "hybrid"\nbatch-size = 7\n')
    settings = resolve_settings({}, {}, cfg).settings
    assert (settings.backend, settings.batch_size) == ("hybrid", 7)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("device = ", "not valid TOML"),
        ("colour = 'red'\n", "unknown settings"),
        ("batch_size = 'many'\n", "must be an integer"),
        ("backend = 'magic'\n", "backend must be"),
    ],
)
def test_bad_config_file_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve_settings({}, {}, cfg)


def test_bad_env_value_names_its_source() -> None:
    with pytest.raises(ConfigError, match="env"):
        resolve_settings({}, {"MIDIVA_BATCH_SIZE": "lots"}, None)


def test_storage_dir_precedence(tmp_path: Path) -> None:
    env = {"VALENCE_AROUSAL_STORAGE_DIR": str(tmp_path / "env")}
    assert get_storage_dir(env=env) == tmp_path / "env"
    set_storage_dir(tmp_path / "call")
    try:
        assert get_storage_dir(env=env) == tmp_path / "call"
        assert get_storage_dir(tmp_path / "explicit", env=env) == tmp_path / "explicit"
    finally:
        set_storage_dir(None)
    assert "midiva" in str(get_storage_dir(env={}))


def test_run_json_records_sources_versions_and_hides_token(tmp_path: Path) -> None:
    resolved = resolve_settings({"hf_token": "secret", "batch_size": 8}, {}, None)
    ckpt = tmp_path / "ckpt.bin"
    ckpt.write_bytes(b"abc")
    path = write_run_json(tmp_path / "out", resolved, command="test", checkpoint=ckpt)
    record = json.loads(path.read_text())
    assert record["settings"]["hf_token"] == "***"
    assert "secret" not in path.read_text()
    assert record["sources"]["batch_size"] == "flag"
    assert record["versions"]["symusic"]
    assert record["checkpoint_sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_toml_is_read_with_tomli_on_python_3_10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import tomllib

    from midiva.labels import read_label_mapping

    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on 3.10: `import tomllib` fails
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # tomli is the package tomllib was taken from: same API
    mapping = tmp_path / "mapping.toml"
    mapping.write_text("[mapping]\nQ1 = [0.5, 0.5]\nQ2 = [-0.5, 0.5]\nQ3 = [-0.5, -0.5]\nQ4 = [0.5, -0.5]\n")
    assert read_label_mapping(mapping)["Q1"] == (0.5, 0.5)
    cfg = tmp_path / "midiva.toml"
    cfg.write_text("batch_size = 8\n")
    assert resolve_settings({}, {}, cfg).settings.batch_size == 8


def test_settings_outside_the_midiva_table_are_refused_not_ignored(tmp_path: Path) -> None:
    cfg = tmp_path / "midiva.toml"
    cfg.write_text('device = "cpu"\nbatch-size = 8\n\n[midiva]\nbackend = "hybrid"\n')  # the first two are top level
    with pytest.raises(ConfigError, match=r"sets \['batch-size', 'device'\] outside its \[midiva\] table.*move them"):
        resolve_settings({}, {}, cfg)
    cfg.write_text('[midiva]\nbackend = "hybrid"\n\n[device]\nname = "cpu"\n')  # a table named like a setting
    with pytest.raises(ConfigError, match=r"\['device'\] outside"):
        resolve_settings({}, {}, cfg)
    cfg.write_text('midiva = "hybrid"\n')
    with pytest.raises(ConfigError, match="must be a \\[midiva\\] table"):
        resolve_settings({}, {}, cfg)
    # other tools' tables in a shared file (pyproject.toml) stay theirs
    cfg.write_text('[project]\nname = "x"\n\n[tool.ruff]\nline-length = 99\n\n[midiva]\nbatch_size = 8\n')
    assert resolve_settings({}, {}, cfg).settings.batch_size == 8
