"""Tests for nydusd.config: the normalised model, parsing of v1/v2 configs, validation errors."""

from __future__ import annotations

from nydusd.config import BackendConfig, ConfigV2, RegistryConfig


def test_model_defaults_match_upstream() -> None:
    cfg = ConfigV2(backend=BackendConfig(type="registry", registry=RegistryConfig(host="h", repo="r")))
    assert cfg.version == 2
    assert cfg.backend is not None and cfg.backend.sub.timeout == 5
    assert cfg.cache.prefetch.threads == 8
