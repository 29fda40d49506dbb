"""The small base every tier derives from, its config base, and the tier registry.

A tier maps store keys (``"<namespace>:<name>"``) to chunks. Fast tiers (host, device) hold decoded
tensors; slow tiers (disk, redis) hold encoded container blobs with the codec they are configured with.
Every tier speaks both: ``get``/``put`` with ``ChunkKV`` and ``get_blob``/``put_blob`` with container
blobs, so the store can move a blob between slow tiers without decoding it. A miss is ``None``.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ragkv.codecs import Codec, CodecError, get_codec
from ragkv.codecs.transform_basis import add_basis_source
from ragkv.kvstore.artefacts import read_artefact, write_artefact
from ragkv.kvstore.async_api import AsyncStoreAPI
from ragkv.kvstore.chunk import ChunkKV, check_key
from ragkv.kvstore.container import decode_entry, encode_entry
from ragkv.kvstore.errors import ConfigError, CorruptEntry
from ragkv.kvstore.header_schema import EntryLimits
from ragkv.kvstore.stats import TierStats

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """'4GB' -> 4_000_000_000, '512MiB' -> 536870912, 1024 -> 1024, None/'' -> None (unbounded)."""
    if text is None or text == "":
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"size must be >= 0, got {text}")
        return text
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    if unit not in _UNITS:
        raise ConfigError(f"invalid size {text!r}; use a number with one of {sorted(u for u in _UNITS if u)}")
    try:
        value = float(num)
    except ValueError:
        raise ConfigError(f"invalid size {text!r}") from None
    if value < 0:
        raise ConfigError(f"size must be >= 0, got {text!r}")
    return int(value * _UNITS[unit])


@dataclass(frozen=True)
class TierConfig:
    """Fields every tier config shares. Subclasses add their own and validate in ``__post_init__``."""

    capacity_bytes: int | None = None  # None = unbounded
    eviction: str = "lru"
    codec: str = "raw"
    codec_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.capacity_bytes is not None and self.capacity_bytes < 0:
            raise ConfigError(f"capacity_bytes must be >= 0 or None, got {self.capacity_bytes}")
        from ragkv.kvstore.policy import POLICIES

        if self.eviction not in POLICIES:
            raise ConfigError(f"unknown eviction policy {self.eviction!r}; allowed: {sorted(POLICIES)}")
        try:
            get_codec(self.codec, dict(self.codec_params))
        except CodecError as exc:
            raise ConfigError(str(exc)) from exc


class Tier(AsyncStoreAPI):
    """Base tier: subclasses implement the single-key operations; batched ones loop by default; the async forms
    (``aget``, ``aput``, ...) run them on worker threads."""

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[TierConfig]] = TierConfig
    holds_encoded: ClassVar[bool] = False
    native_async: ClassVar[bool] = False  # its async forms do their I/O on the event loop (and it has aget_blob)

    def __init__(self, config: TierConfig) -> None:
        if not isinstance(config, self.config_class):
            raise ConfigError(f"tier {self.kind!r} takes {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.codec: Codec = get_codec(config.codec, dict(config.codec_params))
        self.stats = TierStats()
        self.limits = EntryLimits()  # what a blob read here may declare; a TieredStore sets its own
        self._pinned: set[str] = set()
        self._lock = threading.RLock()
        self._artefacts: dict[str, bytes] = {}
        add_basis_source(self.get_artefact)  # transform-coded entries read here find their basis here

    @property
    def name(self) -> str:
        return self.kind

    # -- single-key operations (subclasses) ------------------------------------------------------------
    def get(self, key: str) -> ChunkKV | None:
        raise NotImplementedError

    def put(self, key: str, chunk: ChunkKV, ttl_s: float | None = None) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        raise NotImplementedError

    def contains(self, key: str) -> bool:
        raise NotImplementedError

    def keys(self, namespace: str | None = None) -> Iterator[str]:
        raise NotImplementedError

    def used_bytes(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def expiry(self, key: str) -> float | None:
        """When ``key`` expires (epoch seconds), None if never or unknown; tiers holding blobs say it in them."""
        return None

    def namespace_usage(self, namespace: str) -> tuple[int, int]:
        """(bytes, pinned bytes) ``namespace`` holds here; (0, 0) where the tier does not count them."""
        return 0, 0

    # -- blobs: slow tiers override; fast tiers encode/decode on the way ----------------------------------
    def get_blob(self, key: str) -> bytes | None:
        chunk = self.get(key)
        return None if chunk is None else encode_entry(chunk, self.codec, self.expiry(key), key)

    def put_blob(self, key: str, blob: bytes, ttl_s: float | None = None) -> None:
        """Store a container blob (decoded here, within ``limits``). Raises ``CorruptEntry`` if it does not
        validate or was written under another key. Without ``ttl_s`` the header's expiry is kept."""
        header, chunk = decode_entry(blob, self.limits, key)
        if ttl_s is None and header.expires_at is not None:
            ttl_s = header.expires_at - time.time()
            if ttl_s <= 0:
                self.delete(key)
                return
        self.put(key, chunk, ttl_s=ttl_s)

    # -- artefacts (see ``ragkv.kvstore.artefacts``) ----------------------------------------------------------------
    def put_artefact(self, data: bytes) -> str:
        """Keep a content-addressed artefact (e.g. a transform basis); returns its digest."""
        return write_artefact([self], data)

    def get_artefact(self, digest: str) -> bytes | None:
        """An artefact's verified bytes, or None (also when the tier is down)."""
        return read_artefact([self], digest)

    def write_artefact(self, digest: str, data: bytes) -> None:
        """Storage hook: in memory here; slow tiers persist artefacts."""
        with self._lock:
            self._artefacts[digest] = data

    def read_artefact(self, digest: str) -> bytes | None:
        """Storage hook: the stored bytes, unverified, or None."""
        with self._lock:
            return self._artefacts.get(digest)

    # -- pinning: pinned keys are never evicted ---------------------------------------------------------------
    def pin(self, key: str) -> None:
        with self._lock:
            self._pinned.add(check_key(key))

    def unpin(self, key: str) -> None:
        with self._lock:
            self._pinned.discard(key)

    def is_pinned(self, key: str) -> bool:
        return key in self._pinned

    # -- batched operations (loop by default) -----------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[ChunkKV | None]:
        return [self.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[str, ChunkKV]], ttl_s: float | None = None) -> None:
        for k, c in items:
            self.put(k, c, ttl_s=ttl_s)

    def delete_many(self, keys: Iterable[str]) -> int:
        return sum(1 for k in keys if self.delete(k))

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [self.contains(k) for k in keys]

    # -- misc --------------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "tier": self.kind,
            "codec": self.codec.name,
            "capacity_bytes": self.config.capacity_bytes,
            "used_bytes": self.used_bytes(),
            **self.stats.snapshot(),
        }

    def __enter__(self) -> Tier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


MAX_TTL_S = 100 * 365 * 86400.0


def expiry_time(ttl_s: float | None) -> float | None:
    """``ttl_s`` from now as epoch seconds; ``ConfigError`` unless None or a finite number in (0, 100 years]."""
    if ttl_s is None:
        return None
    if (isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s)
            or not 0 < ttl_s <= MAX_TTL_S):
        raise ConfigError(f"ttl_s must be None or a finite number of seconds in (0, {MAX_TTL_S:.0f}], got {ttl_s!r}")
    return time.time() + ttl_s


_TIERS: dict[str, type[Tier]] = {}


def register_tier(cls: type[Tier]) -> type[Tier]:
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    _TIERS[cls.kind] = cls
    return cls


def tier_kinds() -> list[str]:
    return sorted(_TIERS)


def make_tier(config: TierConfig) -> Tier:
    """Build the tier whose config class ``config`` is."""
    for cls in _TIERS.values():
        if type(config) is cls.config_class:
            return cls(config)
    raise ConfigError(f"no tier takes {type(config).__name__}; tiers: {tier_kinds()}")


def tier_class(kind: str) -> type[Tier]:
    try:
        return _TIERS[kind]
    except KeyError:
        raise ConfigError(f"unknown tier {kind!r}; allowed: {tier_kinds()}") from None


__all__ = [
    "CorruptEntry",
    "Tier",
    "TierConfig",
    "expiry_time",
    "make_tier",
    "parse_size",
    "register_tier",
    "tier_class",
    "tier_kinds",
]
