"""Middleware errors: subclasses of the one root in ``ragkv.kvstore.errors``.

An unsupported model is a configuration problem (the user handed us a model we cannot drive exactly), so
``UnsupportedModel`` derives from ``ConfigError``; ``ModelMismatch`` stays reserved for KV computed by one
model being offered to another.
"""
from __future__ import annotations

from ragkv.kvstore.errors import ConfigError, RagKVError


class UnsupportedModel(ConfigError):
    """The model's architecture, RoPE variant or attention pattern cannot be driven exactly by the adapter.

    The message names what is supported.
    """


class ContextTooLong(ConfigError):
    """The assembled prompt (plus generation) exceeds what the adapter can compute exactly for this model."""


class Overloaded(RagKVError):
    """Too many model requests are already waiting; retry later (HTTP 429 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


__all__ = ["ContextTooLong", "Overloaded", "UnsupportedModel"]
