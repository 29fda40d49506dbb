"""``ragkv ask --url`` as a user runs it: the API key from the environment, one-line errors, warm comparisons."""
from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from ragkv.integrations.cli import main as cli_main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_server_that_is_down_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    assert cli_main(["ask", "Q k1 ?", "--doc", "k1 v2 ;", "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ragkv: cannot reach the ragkv service at {url}") and err.count("\n") == 1
    assert "Traceback" not in err


def test_the_api_key_comes_from_the_environment(service: Any, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = ["ask", "Q k1 ?", "--doc", "k1 v2 ;", "--url", service.url, "--max-new-tokens", "1", "--json"]
    monkeypatch.delenv("RAGKV_API_KEY", raising=False)
    assert cli_main(args) == 2
    assert "HTTP 401" in capsys.readouterr().err
    monkeypatch.setenv("RAGKV_API_KEY", service.keys["alice"])
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out)["result"]["documents"]


def test_compare_times_both_warm(service: Any, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RAGKV_API_KEY", service.keys["alice"])
    doc = "k3 v9 ; the k8 v1 ; " * 4
    assert cli_main(["ask", "Q k3 ?", "--doc", doc, "--url", service.url, "--max-new-tokens", "1", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "both warm: one untimed run of each first" in out
    assert "documents: 1 of 1 from the cache" in out  # the untimed run warmed it: the timed one is a hit
