"""Content-addressed artefacts: model-wide blobs the codecs need beside the chunks (a ``transform`` basis).

An artefact is named by the SHA-256 of its bytes, so a copy is checked by hashing it and any tier's good
copy is as good as another's. Every tier keeps artefacts apart from chunks: they belong to no tenant
namespace (tenants cannot name, read, overwrite, pin or evict them through the chunk API), count against
no capacity and are never evicted; fast tiers keep them in memory, the disk tier under ``+artefacts/``
and Redis under ``<prefix>+artefact:<digest>`` ('+' is outside the namespace alphabet, so neither can
collide with a tenant's entries). A read refuses anything over ``MAX_ARTEFACT_BYTES`` before reading it.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ragkv.codecs.transform_basis import MAX_BASIS_BYTES
from ragkv.kvstore.errors import ConfigError, TierUnavailable

if TYPE_CHECKING:
    from ragkv.kvstore.tiers.base import Tier

_log = logging.getLogger(__name__)
MAX_ARTEFACT_BYTES = MAX_BASIS_BYTES
ARTEFACT_DIR = "+artefacts"
ARTEFACT_KEY = "+artefact:"
_HEX = frozenset("0123456789abcdef")


def check_digest(digest: str) -> str:
    """An artefact's name: 64 lowercase hex characters (a SHA-256)."""
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
        raise ConfigError(f"an artefact digest is 64 lowercase hex characters, got {digest!r}")
    return digest


def artefact_digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def write_artefact(tiers: Sequence[Tier], data: bytes) -> str:
    """Write ``data`` to every tier that is up; returns its digest. ``ConfigError`` when it is too large,
    ``TierUnavailable`` when no tier took it."""
    data = bytes(data)
    if len(data) > MAX_ARTEFACT_BYTES:
        raise ConfigError(f"an artefact of {len(data)} bytes is over the limit {MAX_ARTEFACT_BYTES}")
    digest = artefact_digest(data)
    written = 0
    for tier in tiers:
        try:
            tier.write_artefact(digest, data)
            written += 1
        except TierUnavailable as exc:
            _log.warning("artefact %s… not written to %s: %s", digest[:16], tier.name, exc)
    if not written:
        raise TierUnavailable(f"no tier took artefact {digest[:16]}…")
    return digest


def read_artefact(tiers: Sequence[Tier], digest: str) -> bytes | None:
    """The artefact's bytes from the fastest tier with a good copy (copied up into the faster tiers that
    lacked it), or None. A copy whose hash differs is skipped; a tier that is down is a miss."""
    check_digest(digest)
    for i, tier in enumerate(tiers):
        try:
            data = tier.read_artefact(digest)
        except TierUnavailable as exc:
            _log.debug("artefact read from %s skipped: %s", tier.name, exc)
            continue
        if data is None:
            continue
        if artefact_digest(data) != digest:
            _log.warning("tier %s holds a corrupt copy of artefact %s…", tier.name, digest[:16])
            continue
        for faster in tiers[:i]:
            try:
                faster.write_artefact(digest, data)
            except TierUnavailable as exc:
                _log.debug("artefact not copied up to %s: %s", faster.name, exc)
        return data
    return None


__all__ = ["ARTEFACT_DIR", "ARTEFACT_KEY", "MAX_ARTEFACT_BYTES", "artefact_digest", "check_digest",
           "read_artefact", "write_artefact"]
