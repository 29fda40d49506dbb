"""ragkv's store: chunk-KV data model, container format, tiers and the TieredStore. Imported as ``ragkv.kvstore``."""
from __future__ import annotations

if not __name__.startswith("ragkv."):
    raise ImportError("import this package as ragkv.kvstore, not as a bare 'kvstore' (see DESIGN.md)")

from ragkv.kvstore.chunk import (
    DEFAULT_NAMESPACE,
    SHARED_NAMESPACE,
    ChunkKV,
    ChunkMeta,
    ModelFingerprint,
    check_key,
    chunk_key,
    key_namespace,
)
from ragkv.kvstore.config import StoreConfig, default_config, load_config, parse_spec
from ragkv.kvstore.container import decode_entry, encode_entry, read_header
from ragkv.kvstore.errors import ConfigError, CorruptEntry, ModelMismatch, RagKVError, TierUnavailable
from ragkv.kvstore.store import TieredStore, open_store
from ragkv.kvstore.tiers import (
    DeviceConfig,
    DiskConfig,
    HostConfig,
    RedisConfig,
    Tier,
    TierConfig,
)

__all__ = [
    "DEFAULT_NAMESPACE",
    "SHARED_NAMESPACE",
    "ChunkKV",
    "ChunkMeta",
    "ConfigError",
    "CorruptEntry",
    "DeviceConfig",
    "DiskConfig",
    "HostConfig",
    "ModelFingerprint",
    "ModelMismatch",
    "RagKVError",
    "RedisConfig",
    "StoreConfig",
    "Tier",
    "TierConfig",
    "TierUnavailable",
    "TieredStore",
    "check_key",
    "chunk_key",
    "decode_entry",
    "default_config",
    "encode_entry",
    "key_namespace",
    "load_config",
    "open_store",
    "parse_spec",
    "read_header",
]
