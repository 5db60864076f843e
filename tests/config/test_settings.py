"""One settings object: environment over settings file over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from inferq.config import DEFAULT_REDIS_URL, Settings


def test_defaults_bind_to_loopback_and_use_a_local_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERQ_REDIS_URL", raising=False)
    settings = Settings()
    assert settings.api_host == settings.flower_host == "127.0.0.1"
    assert settings.redis_url is None and settings.redis_url_or_default == DEFAULT_REDIS_URL


def test_the_settings_file_is_read_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings_file = tmp_path / "inferq.toml"
    settings_file.write_text('redis_url = "redis://:pw-4711@db:6379/2"\nresult_ttl_s = 60\napi_port = 9000\n')
    monkeypatch.setenv("INFERQ_SETTINGS_FILE", str(settings_file))
    monkeypatch.setenv("INFERQ_API_PORT", "9100")
    settings = Settings()
    assert settings.redis_url_or_default == "redis://:pw-4711@db:6379/2"
    assert "pw-4711" not in repr(settings)  # the password never reaches a log through the settings
    assert settings.result_ttl_s == 60 and settings.api_port == 9100


def test_bad_values_are_refused_with_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_RESULT_TTL_S", "-5")
    with pytest.raises(ValidationError, match="result_ttl_s"):
        Settings()


def test_relative_weights_resolve_under_the_models_dir(tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path)
    assert settings.resolve_weights("a.safetensors") == tmp_path / "a.safetensors"
    assert settings.resolve_weights("/abs/b.pt2") == Path("/abs/b.pt2")
