import difflib
from dataclasses import replace
from pathlib import Path

import pytest

from services.cli import main
from services.config import Settings, declared_settings, settings_table
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


def test_log_format_and_flags_take_any_case():
    s = Settings.from_env({"TOKENCAST_LOG_FORMAT": "JSON", "TOKENCAST_TRUST_PROXY": "Yes"})
    assert (s.log_format, s.trust_proxy) == ("json", True)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TOKENCAST_LOG_FORMAT": "xml"},
            "TOKENCAST_LOG_FORMAT='xml' must be one of: text, json",
        ),
        ({"TOKENCAST_LOG_PROMPTS": "On"}, "TOKENCAST_LOG_PROMPTS='on' must be 1 or 0"),
        (
            {"TOKENCAST_UPSTREAM_BASE_URL": "http://u/v1", "TOKENCAST_UPSTREAM_MODELS": "=x"},
            "TOKENCAST_UPSTREAM_MODELS: '=x' has no model name before '='",
        ),
        # Settings that contradict each other.
        (
            {"TOKENCAST_UPSTREAM_MODELS": "qwen"},
            "TOKENCAST_UPSTREAM_MODELS is set but TOKENCAST_UPSTREAM_BASE_URL is not: name the "
            "model server's /v1 URL in TOKENCAST_UPSTREAM_BASE_URL, or unset "
            "TOKENCAST_UPSTREAM_MODELS",
        ),
        (
            {"TOKENCAST_UPSTREAM_API_KEY": "sk-1"},
            "TOKENCAST_UPSTREAM_API_KEY is set but TOKENCAST_UPSTREAM_BASE_URL is not: name the "
            "model server's /v1 URL in TOKENCAST_UPSTREAM_BASE_URL, or unset "
            "TOKENCAST_UPSTREAM_API_KEY",
        ),
        (
            {"TOKENCAST_UPSTREAM_BASE_URL": "http://127.0.0.1:1/v1"},
            "TOKENCAST_UPSTREAM_BASE_URL is set but TOKENCAST_UPSTREAM_MODELS is not: "
            "list the models to offer from it, or unset both",
        ),
        (
            {"TOKENCAST_DEFAULT_MODEL": "qwen"},
            "TOKENCAST_DEFAULT_MODEL='qwen' is not a model "
            "(demo or one of TOKENCAST_UPSTREAM_MODELS): demo",
        ),
    ],
)
def test_bad_or_contradictory_settings_stop_start_up_with_a_message(env, message):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value) == message


def test_the_command_stops_before_starting_on_contradictory_settings(monkeypatch, capsys):
    monkeypatch.delenv("TOKENCAST_UPSTREAM_BASE_URL", raising=False)
    monkeypatch.setenv("TOKENCAST_UPSTREAM_MODELS", "qwen")
    assert main(["worker"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("tokencast: bad setting: TOKENCAST_UPSTREAM_MODELS is set but ")
    assert "TOKENCAST_UPSTREAM_BASE_URL is not" in message


def test_blank_values_keep_the_defaults():
    blank = {spec.env: "  " for _field, spec, _kind in declared_settings()}
    s = Settings.from_env(blank)
    node_id = s.node_id
    assert len(node_id) == 12
    assert s == replace(Settings(), node_id=node_id)


def test_an_upstream_model_may_be_the_default():
    s = Settings.from_env(
        {
            "TOKENCAST_UPSTREAM_BASE_URL": "http://127.0.0.1:1/v1",
            "TOKENCAST_UPSTREAM_MODELS": "qwen",
            "TOKENCAST_DEFAULT_MODEL": "qwen",
        }
    )
    assert (s.default_model, s.models) == ("qwen", ["demo", "qwen"])


# The README's Configuration table is settings_table(); after changing a
# setting, write it again with
#
#     .venv/bin/python tests/unit/test_settings.py

README = Path(__file__).resolve().parents[2] / "README.md"
TABLE_HEADER = "| variable | default |"


def readme_table(text: str) -> tuple[int, int]:
    """Where the Configuration table is in ``text``: its first and past-last line."""
    lines = text.splitlines()
    start = lines.index("## Configuration")
    start += next(i for i, line in enumerate(lines[start:]) if line.startswith(TABLE_HEADER))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return start, end


def table_difference(text: str) -> str:
    """A unified diff from the README's table to the declared one; empty when equal."""
    start, end = readme_table(text)
    found = text.splitlines(keepends=True)[start:end]
    expected = settings_table().splitlines(keepends=True)
    return "".join(difflib.unified_diff(found, expected, "README.md", "declared settings"))


def test_readme_table_is_the_declared_settings():
    difference = table_difference(README.read_text())
    assert not difference, (
        "README.md's settings table differs from services/config.py; write it again with "
        f"`.venv/bin/python tests/unit/test_settings.py`:\n{difference}"
    )


def test_the_table_check_sees_a_setting_the_readme_lacks_or_misstates():
    text = README.read_text()
    row = "| `TOKENCAST_MAX_STREAMS` | `10000` |"
    assert row in text
    assert "-| `TOKENCAST_MAX_STREAMS` | `5000` |" in table_difference(
        text.replace(row, "| `TOKENCAST_MAX_STREAMS` | `5000` |")
    )
    without = "".join(line for line in text.splitlines(True) if not line.startswith(row))
    assert f"+{row}" in table_difference(without)


def write_readme_table() -> None:
    text = README.read_text()
    start, end = readme_table(text)
    lines = text.splitlines(keepends=True)
    README.write_text("".join([*lines[:start], settings_table(), *lines[end:]]))


if __name__ == "__main__":
    write_readme_table()


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
