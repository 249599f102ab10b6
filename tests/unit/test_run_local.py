"""`make up` keeps a key-less stack that may call loopback off the network unless told."""

from __future__ import annotations

import pytest

from ops.run_local import bind_host, exposure_warning, service_commands


def test_the_api_and_flower_listen_on_loopback_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GUARDFLEET_BIND_HOST", raising=False)
    commands = service_commands("python", "redis://localhost:6379/0", bind_host())
    api = commands["api"]
    assert api[api.index("--host") + 1] == "127.0.0.1"
    assert "--address=127.0.0.1" in commands["flower"]
    assert exposure_warning(bind_host(), []) is None


def test_another_address_is_an_explicit_choice_and_warned_about_without_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GUARDFLEET_BIND_HOST", "0.0.0.0")
    commands = service_commands("python", "redis://localhost:6379/0", bind_host())
    assert "--address=0.0.0.0" in commands["flower"]
    assert "0.0.0.0" in commands["api"]
    assert "GUARDFLEET_API_KEYS" in (exposure_warning("0.0.0.0", []) or "")
    assert exposure_warning("0.0.0.0", ["k1"]) is None
