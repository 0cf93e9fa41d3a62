"""Configuration from the environment: documented defaults, parsing, clear errors."""

from __future__ import annotations

import pytest

from segmentation.models import DEFAULT_MODEL_ID
from segmentation.settings import Settings


def test_defaults(monkeypatch):
    for name in (
        "SAMHQ_MODEL",
        "SAMHQ_MODELS",
        "SAMHQ_API_KEYS",
        "SAMHQ_CACHE_MB",
        "SAMHQ_COMPILE",
        "SAMHQ_PRELOAD_EXAMPLES",
        "SAMHQ_THREADS",
        "SAMHQ_MAX_WORK_MP",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert settings.model == DEFAULT_MODEL_ID and settings.served_models == (DEFAULT_MODEL_ID,)
    assert (settings.max_pixels, settings.max_objects, settings.max_points, settings.max_body_mb) == (
        40_000_000,
        255,
        64,
        32,
    )
    assert settings.api_keys == () and settings.preload_examples and not settings.compile
    assert settings.max_work_mp == 1000
    assert settings.threads == 0


def test_environment_is_parsed(monkeypatch):
    monkeypatch.setenv("SAMHQ_MODEL", "facebook/sam-vit-base")
    monkeypatch.setenv("SAMHQ_MODELS", " syscv-community/sam-hq-vit-base , ")
    monkeypatch.setenv("SAMHQ_API_KEYS", "a,b")
    monkeypatch.setenv("SAMHQ_CACHE_MB", "256")
    monkeypatch.setenv("SAMHQ_PRELOAD_EXAMPLES", "false")
    monkeypatch.setenv("SAMHQ_COMPILE", "1")
    monkeypatch.setenv("SAMHQ_THREADS", "3")
    settings = Settings.from_env()
    assert settings.threads == 3
    assert settings.served_models == ("facebook/sam-vit-base", "syscv-community/sam-hq-vit-base")
    assert settings.api_keys == ("a", "b") and settings.cache_mb == 256
    assert not settings.preload_examples and settings.compile
    assert "api_keys" not in repr(settings), "keys must never reach logs through the settings' repr"


def test_a_malformed_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("SAMHQ_MAX_PIXELS", "forty million")
    with pytest.raises(ValueError, match="SAMHQ_MAX_PIXELS must be a number"):
        Settings.from_env()
