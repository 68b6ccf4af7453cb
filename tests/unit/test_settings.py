import pytest

from services.config import Settings
from services.errors import SettingsError


def test_defaults():
    s = Settings.from_env({})
    assert (s.host, s.port, s.redis_url) == ("127.0.0.1", 8000, None)
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert (s.retention_s, s.keepalive_s, s.retry_ms) == (3600, 15, 1000)
    assert (s.lease_s, s.drain_s, s.broker_grace_s) == (10, 10, 30)
    assert s.default_model == "demo"
    assert s.api_keys == ()
    assert s.models == ["demo"]


def test_values_are_read():
    s = Settings.from_env(
        {
            "TOKENCAST_PORT": "9000",
            "TOKENCAST_API_KEYS": "a, b ,,c",
            "TOKENCAST_KEEPALIVE_SECONDS": "0.5",
            "TOKENCAST_UPSTREAM_BASE_URL": "http://127.0.0.1:1/v1",
            "TOKENCAST_UPSTREAM_MODELS": "qwen,small=llama3.2:1b",
        }
    )
    assert s.port == 9000
    assert s.api_keys == ("a", "b", "c")
    assert s.keepalive_s == 0.5
    assert s.upstream_models == (("qwen", "qwen"), ("small", "llama3.2:1b"))
    assert s.models == ["demo", "qwen", "small"]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TOKENCAST_PORT", "eighty", "TOKENCAST_PORT='eighty' is not a valid int"),
        ("TOKENCAST_PORT", "70000", "TOKENCAST_PORT='70000' must be from 1 to 65535"),
        ("TOKENCAST_RETENTION_SECONDS", "0", "TOKENCAST_RETENTION_SECONDS='0' must be at least 1"),
        ("TOKENCAST_LEASE_SECONDS", "nan", "TOKENCAST_LEASE_SECONDS='nan' must be at least 0.5"),
        ("TOKENCAST_MAX_QUEUED_JOBS", "-5", "TOKENCAST_MAX_QUEUED_JOBS='-5' must be at least 1"),
        ("TOKENCAST_RETRY_MS", "1.5", "TOKENCAST_RETRY_MS='1.5' is not a valid int"),
    ],
)
def test_bad_values_fail_naming_the_variable(name, value, message):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    assert str(info.value) == message


def test_sentinels_are_read():
    s = Settings.from_env(
        {"TOKENCAST_REDIS_SENTINELS": "10.0.0.1:26379, sentinel-b:26380,[::1]:26381"}
    )
    assert s.redis_sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381))
    assert s.redis_sentinel_master == "mymaster"
    assert Settings.from_env({}).redis_sentinels == ()
    named = Settings.from_env({"TOKENCAST_REDIS_SENTINEL_MASTER": "tokencast"})
    assert named.redis_sentinel_master == "tokencast"


@pytest.mark.parametrize("value", ["sentinel-a", "sentinel-a:", ":26379", "a:0", "a:70000", "a:2x"])
def test_bad_sentinel_address_fails_naming_the_variable(value):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"TOKENCAST_REDIS_SENTINELS": f"b:26379,{value}"})
    assert str(info.value) == (
        f"TOKENCAST_REDIS_SENTINELS: {value!r} must be host:port, port from 1 to 65535"
    )


def test_sentinels_and_cluster_exclude_each_other():
    env = {"TOKENCAST_REDIS_SENTINELS": "a:26379", "TOKENCAST_REDIS_CLUSTER": "1"}
    with pytest.raises(SettingsError, match="cannot both be set"):
        Settings.from_env(env)
