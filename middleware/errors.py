"""Middleware errors: subclasses of the one root in ``ragkv.kvstore.errors``.

An unsupported model is a configuration problem (the user handed us a model we cannot drive exactly), so
``UnsupportedModel`` derives from ``ConfigError``; ``ModelMismatch`` stays reserved for KV computed by one
model being offered to another.
"""
from __future__ import annotations

from ragkv.kvstore.errors import ConfigError


class UnsupportedModel(ConfigError):
    """The model's architecture, RoPE variant or attention pattern cannot be driven exactly by the adapter.

    The message names what is supported.
    """


class ContextTooLong(ConfigError):
    """The assembled prompt (plus generation) exceeds what the adapter can compute exactly for this model."""


__all__ = ["ContextTooLong", "UnsupportedModel"]
