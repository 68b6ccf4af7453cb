"""Configuring the upstream backend: its settings and which models it serves."""

import pytest

from services.config import Settings
from services.errors import SettingsError
from worker.backends.demo import DemoBackend
from worker.backends.openai import OpenAIBackend
from worker.main import backends_for


def test_upstream_timeouts_from_the_environment():
    settings = Settings.from_env(
        {
            "TOKENCAST_UPSTREAM_FIRST_TOKEN_TIMEOUT_SECONDS": "90",
            "TOKENCAST_UPSTREAM_IDLE_TIMEOUT_SECONDS": "2.5",
        }
    )
    assert settings.upstream_first_token_timeout_s == 90.0
    assert settings.upstream_idle_timeout_s == 2.5
    defaults = Settings.from_env({})
    assert (defaults.upstream_first_token_timeout_s, defaults.upstream_idle_timeout_s) == (60, 30)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "TOKENCAST_UPSTREAM_IDLE_TIMEOUT_SECONDS",
            "0",
            "TOKENCAST_UPSTREAM_IDLE_TIMEOUT_SECONDS='0' must be at least 0.1",
        ),
        (
            "TOKENCAST_UPSTREAM_FIRST_TOKEN_TIMEOUT_SECONDS",
            "soon",
            "TOKENCAST_UPSTREAM_FIRST_TOKEN_TIMEOUT_SECONDS='soon' is not a valid float",
        ),
    ],
)
def test_bad_upstream_timeout_names_the_variable(variable, value, message):
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({variable: value})
    assert str(raised.value) == message


def test_without_an_upstream_only_demo_is_served():
    backends = backends_for(Settings(upstream_models=(("qwen", "qwen-plus"),)))
    assert list(backends) == ["demo"]


def test_upstream_models_are_served_by_the_openai_backend():
    settings = Settings(
        upstream_base_url="http://127.0.0.1:11434/v1",
        upstream_models=(("llama", "llama3.2:1b"), ("demo", "shadowed"), ("qwen", "qwen-plus")),
    )
    backends = backends_for(settings)
    assert sorted(backends) == ["demo", "llama", "qwen"] == sorted(settings.models)
    assert isinstance(backends["demo"], DemoBackend)  # the upstream cannot take demo's name
    assert isinstance(backends["llama"], OpenAIBackend)
    assert backends["llama"] is backends["qwen"]  # one client, one connection pool


def test_the_upstream_request():
    from services.jobs import JobSpec

    backend = OpenAIBackend(
        Settings(
            upstream_base_url="http://127.0.0.1:8000/v1", upstream_models=(("q", "qwen-plus"),)
        )
    )
    generation = backend.generate(JobSpec(prompt="user: hi", model="q", max_tokens=9))
    # temperature and seed are left to the upstream's defaults when the job sets none.
    assert generation.request == {
        "model": "qwen-plus",
        "messages": [{"role": "user", "content": "user: hi"}],
        "max_tokens": 9,
        "stream": True,
    }
