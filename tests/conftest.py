"""Shared fixtures. Support modules live in tests/support (on pytest's pythonpath), each owning its servers."""
from __future__ import annotations

pytest_plugins = ["redis_servers", "real_model"]
