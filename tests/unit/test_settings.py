from __future__ import annotations

import pytest
from pydantic import ValidationError

from guardfleet.redis_conn import broker_options, parse_sentinels
from guardfleet.settings import DEMO_MODEL, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("GUARDFLEET_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir("/")  # no stray .env file


def test_defaults_are_valid_and_use_the_demo_model() -> None:
    settings = Settings()
    assert settings.model == DEMO_MODEL
    assert settings.api_keys == []
    assert settings.redis_url == "redis://localhost:6379/0"


def test_operator_facing_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDFLEET_REDIS_URL", "redis://queue:6380/2")
    monkeypatch.setenv("GUARDFLEET_MODEL", "nvidia/Nemotron-Content-Safety-Reasoning-4B")
    monkeypatch.setenv("GUARDFLEET_DEVICE", "cuda:3")
    monkeypatch.setenv("GUARDFLEET_API_KEYS", " key-one, key-two ,,")
    settings = Settings()
    assert settings.redis_url == "redis://queue:6380/2"
    assert settings.model == "nvidia/Nemotron-Content-Safety-Reasoning-4B"
    assert settings.device == "cuda:3"
    assert settings.api_keys == ["key-one", "key-two"]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("GUARDFLEET_REDIS_URL", "http://localhost", "redis://"),
        ("GUARDFLEET_DEVICE", "gpu0", "cuda:N"),
        ("GUARDFLEET_DEVICE", "cuda:x", "cuda:N"),
        ("GUARDFLEET_MAX_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("GUARDFLEET_SCORE_THRESHOLD", "1.5", "less than or equal to 1"),
        ("GUARDFLEET_HEARTBEAT_INTERVAL_S", "30", "shorter than heartbeat_ttl_s"),
        ("GUARDFLEET_DTYPE", "int8", "bfloat16"),
        ("GUARDFLEET_MAX_QUEUED_BULK", "10", "no batch could fit"),
        ("GUARDFLEET_BROKER_URL", "amqp://localhost", "redis://"),
        ("GUARDFLEET_BROKER_URL", "sentinel://a:1", "GUARDFLEET_BROKER_SENTINEL_MASTER"),
        ("GUARDFLEET_REDIS_URL", "", "must not be empty"),
    ],
)
def test_bad_values_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_every_setting_is_documented_in_the_readme() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [
        f"GUARDFLEET_{name.upper()}"
        for name in Settings.model_fields
        if f"`GUARDFLEET_{name.upper()}`" not in readme
    ]
    assert missing == []


def test_a_sentinel_url_names_every_sentinel_and_needs_a_master_name() -> None:
    url = "sentinel://:s3cret@10.0.0.1:26379;sentinel://10.0.0.2/3"
    assert parse_sentinels(url) == ([("10.0.0.1", 26379), ("10.0.0.2", 26379)], 3, "s3cret")
    settings = Settings(redis_url=url, redis_sentinel_master="guardfleet")
    assert broker_options(settings)["master_name"] == "guardfleet"
    assert broker_options(Settings()) == {}
    with pytest.raises(ValidationError, match="GUARDFLEET_REDIS_SENTINEL_MASTER"):
        Settings(redis_url=url)
    with pytest.raises(ValidationError, match="sentinel://host:port"):
        Settings(redis_url="sentinel://a:1;redis://b:2/0", redis_sentinel_master="m")


def test_the_broker_is_the_store_unless_configured_apart() -> None:
    one = Settings(redis_url="redis://store:6379/0")
    assert (one.broker, one.separate_broker) == ("redis://store:6379/0", False)
    assert (
        Settings(redis_url="redis://store/0", broker_url="redis://store/0").separate_broker is False
    )
    apart = Settings(redis_url="redis://store:6379/0", broker_url="redis://broker:6379/0")
    assert (apart.broker, apart.separate_broker) == ("redis://broker:6379/0", True)
    assert Settings(redis_url="redis://store/0", broker_url="redis://store/1").separate_broker
    # One set of sentinels watching two masters: the names tell store and broker apart.
    url = "sentinel://10.0.0.1:26379/0"
    both = Settings(redis_url=url, redis_sentinel_master="store", broker_url=url)
    assert (both.separate_broker, broker_options(both)["master_name"]) == (False, "store")
    two = Settings(
        redis_url=url, redis_sentinel_master="store", broker_url=url, broker_sentinel_master="mq"
    )
    assert (two.separate_broker, broker_options(two)["master_name"]) == (True, "mq")


def test_a_cluster_store_needs_a_broker_apart_and_database_0() -> None:
    broker = "redis://broker:6379/0"
    assert Settings(redis_url="redis://node1:7000", redis_cluster=True, broker_url=broker)
    with pytest.raises(ValidationError, match="needs GUARDFLEET_BROKER_URL"):
        Settings(redis_url="redis://node1:7000", redis_cluster=True)
    with pytest.raises(ValidationError, match="database 0 only"):
        Settings(redis_url="redis://node1:7000/3", redis_cluster=True, broker_url=broker)
    with pytest.raises(ValidationError, match="redis:// or rediss://"):
        Settings(
            redis_url="sentinel://s1:26379",
            redis_sentinel_master="m",
            redis_cluster=True,
            broker_url=broker,
        )
