"""Hub error diagnosis: an access denial is recognised by its HTTP status or its words, not by digits in a name."""

from __future__ import annotations

import pytest
import requests

from midiva.sources import hub_error

DATASET, CONFIG = "Metacreation/GigaMIDI", "v2.0.0"


def _http_error(status: int, message: str) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(message, response=response)


@pytest.mark.parametrize(
    "err",
    [
        _http_error(403, "Client Error for url https://huggingface.co/api/datasets/x"),
        _http_error(401, "any text"),
        OSError("401 Client Error: Unauthorized for url: https://huggingface.co/api/datasets/x"),
        OSError("Cannot access gated repo for url https://huggingface.co/datasets/x/resolve/main/a.parquet"),
        ValueError(
            "Dataset 'Metacreation/GigaMIDI' is a gated dataset on the Hub. You must be authenticated to access it."
        ),
    ],
    ids=["status-403", "status-401", "401-client-error", "gated-repo", "must-be-authenticated"],
)
def test_access_denials_are_recognised(err: Exception) -> None:
    assert "was denied" in str(hub_error(err, DATASET, CONFIG))


@pytest.mark.parametrize(
    "err",
    [
        OSError("cannot read 'train/song_401.mid': truncated file"),
        ValueError("parquet file 'part-403.parquet' is damaged"),
        OSError("aggregated.mid: unexpected end of file"),
        _http_error(404, "401 Client Error quoted in a 404 page"),  # the status on the exception decides
    ],
    ids=["401-in-a-file-name", "403-in-a-file-name", "gated-inside-a-word", "status-404"],
)
def test_digits_or_words_inside_names_are_not_access_denials(err: Exception) -> None:
    message = str(hub_error(err, DATASET, CONFIG))
    assert "was denied" not in message and "HF_TOKEN" not in message


def test_only_a_missing_config_reads_as_one() -> None:
    from midiva.sources import hub_error

    missing = ValueError("BuilderConfig 'v9' not found. Available: ['v1.0.0', 'v2.0.0']")
    assert "has no config 'v9'" in str(hub_error(missing, "Metacreation/GigaMIDI", "v9"))
    named = ValueError("Unknown config name: 'v9'")
    assert "has no config 'v9'" in str(hub_error(named, "Metacreation/GigaMIDI", "v9"))
    unrelated = OSError("cannot read 'my_config_backup.mid': permission denied")
    message = str(hub_error(unrelated, "Metacreation/GigaMIDI", "v1.0.0"))
    assert "has no config" not in message and "OSError" in message
