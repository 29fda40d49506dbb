"""One error root and few subclasses. A miss is ``None``, never an exception."""
from __future__ import annotations


class RagKVError(Exception):
    """Root of every error ragkv raises on purpose."""


class ConfigError(RagKVError, ValueError):
    """Invalid configuration or spec string; the message names the allowed values."""


class CorruptEntry(RagKVError):
    """A stored or received blob failed validation (magic, version, sizes, checksum, codec)."""


class TierUnavailable(RagKVError):
    """A backend (Redis, a disk) cannot be reached; tiers turn this into a miss for readers."""


class ModelMismatch(RagKVError):
    """KV computed by one model was offered to another (fingerprints differ)."""


class StoreClosed(RagKVError):
    """An operation on a store after ``close``."""


class StoreWriteError(RagKVError):
    """A put failed in a tier; the store removed what it had written, so no tier holds the new value."""
