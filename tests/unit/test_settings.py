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
