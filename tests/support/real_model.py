"""Session fixtures for the real default model, SmolLM2-135M-Instruct (converted once into ragkv's models dir).

The first use in a fresh environment converts the wheel's GGUF file (~45 s on 2 cores); later sessions load the
converted folder in seconds. Tests that need answers use this model, not a stand-in.
"""
from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The loaded default model (``LoadedModel``), float32."""
    from ragkv.middleware.model_registry import load_model

    return load_model()


@pytest.fixture(scope="session")
def smollm2_adapter(smollm2: Any) -> Any:
    from ragkv.integrations.models import make_adapter

    return make_adapter(smollm2)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_adapter: Any) -> Any:
    """A ContextEngine on SmolLM2 over a host-tier store (shared: chunks warmed by one test serve the next)."""
    from ragkv.kvstore import TieredStore
    from ragkv.middleware import ContextEngine

    return ContextEngine(smollm2_adapter, TieredStore("host:1GB"))
