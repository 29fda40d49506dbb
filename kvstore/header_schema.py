"""Strict reading of a container's JSON header: types, bounds and sizes checked before anything is allocated.

Everything here treats the header as hostile. JSON's non-standard constants (``NaN``, ``Infinity``) are
refused while parsing, nesting is bounded before the parser recurses, every field has one exact type
(``true`` is not a position, ``"no"`` is not a boolean, ``1.7`` is not an integer), integers are bounded,
and the declared KV shape must fit the reader's ``EntryLimits``. Every failure is a ``CorruptEntry``, which
every reader turns into a miss (and deletes the entry).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from ragkv.codecs import CodecError
from ragkv.codecs.base import DTYPES, check_shape
from ragkv.kvstore.chunk import IMPORTANCE_VERSION, MAX_IMPORTANCE, MAX_TOKEN_ID, ChunkMeta, check_key
from ragkv.kvstore.errors import ConfigError, CorruptEntry

# The largest chunk of a common 8B model (32 layers x 2 x 8 KV heads x 4096 tokens x 128) fits; a service
# narrows this to what its own model can make (``TieredStore.limit_entries``).
DEFAULT_MAX_ENTRY_ELEMENTS = 1 << 28
MAX_POSITION = (1 << 31) - 1
MAX_NESTING = 8  # params and extra are flat objects; anything deeper is hostile
MAX_TEXT_FIELD = 256


@dataclass(frozen=True)
class EntryLimits:
    """What a blob may declare. ``max_elements`` bounds the decoded KV (``layers*2*heads*tokens*dim``)."""

    max_elements: int = DEFAULT_MAX_ENTRY_ELEMENTS

    def __post_init__(self) -> None:
        if not isinstance(self.max_elements, int) or isinstance(self.max_elements, bool) or self.max_elements < 1:
            raise ConfigError(f"max_elements must be an integer >= 1, got {self.max_elements!r}")

    def check_elements(self, shape: tuple[int, ...]) -> None:
        n = math.prod(shape)
        if n > self.max_elements:
            raise CorruptEntry(f"declared KV shape {shape} has {n} elements, over this store's limit of "
                               f"{self.max_elements}")


@dataclass(frozen=True)
class EntryHeader:
    codec: str
    params: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str
    meta: ChunkMeta
    expires_at: float | None = None
    key: str | None = None  # the store key the entry was written under (bound by the checksum)

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now if now is not None else time.time()) >= self.expires_at


def refuse_constant(name: str) -> Any:
    """``json.loads(parse_constant=...)``: NaN and Infinity are not JSON numbers."""
    raise ValueError(f"{name} is not a JSON number")


def _check_nesting(text: str) -> None:
    """Bound bracket depth before ``json.loads`` recurses (brackets inside strings count too: conservative).
    A real header has a handful of brackets, so counting them (at C speed) settles it without the scan."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return
    depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise ValueError(f"header nests deeper than {MAX_NESTING} levels")
        elif ch in "]}":
            depth -= 1


def is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _flat_object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{what} is not an object")
    for k, v in value.items():
        if v is not None and type(v) not in (int, float, bool, str):
            raise TypeError(f"{what}.{k} is not a scalar")
        if isinstance(v, str) and len(v) > MAX_TEXT_FIELD:
            raise ValueError(f"{what}.{k} is longer than {MAX_TEXT_FIELD} characters")
    return value


def text_field(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT_FIELD:
        raise TypeError(f"{what} must be a string of 1-{MAX_TEXT_FIELD} characters")
    return value


def parse_meta(d: object) -> ChunkMeta:
    """Chunk metadata from a header's ``meta`` object, every field of its exact type and in range."""
    if not isinstance(d, dict):
        raise TypeError("meta is not an object")
    token_ids = d.get("token_ids")
    if not isinstance(token_ids, list) or (token_ids and (set(map(type, token_ids)) != {int} or min(token_ids) < 0
                                                          or max(token_ids) > MAX_TOKEN_ID)):
        raise TypeError(f"meta.token_ids must be a list of integers in [0, {MAX_TOKEN_ID}]")
    position = d.get("position")
    if not is_int(position, 0, MAX_POSITION):
        raise TypeError(f"meta.position must be an integer in [0, {MAX_POSITION}], got {position!r}")
    rope = d.get("rope")
    if type(rope) is not bool:
        raise TypeError(f"meta.rope must be true or false, got {rope!r}")
    dtype = text_field(d.get("dtype"), "meta.dtype")
    return ChunkMeta(fingerprint=text_field(d.get("fingerprint"), "meta.fingerprint"), token_ids=tuple(token_ids),
                     position=position, dtype=dtype, rope=rope, extra=_flat_object(d.get("extra", {}), "meta.extra"),
                     importance=_importance(d.get("importance"), len(token_ids)))


def _importance(value: object, num_tokens: int) -> tuple[int, ...]:
    """The optional per-token scores: absent (old entries) or of another version (a newer writer) read as none."""
    if value is None:
        return ()
    if not isinstance(value, dict) or not is_int(value.get("version"), 1, 0xFFFF):
        raise TypeError("meta.importance must be an object with an integer version")
    if value["version"] != IMPORTANCE_VERSION:
        return ()
    scores = value.get("scores")
    if (not isinstance(scores, list) or len(scores) != num_tokens
            or (scores and (set(map(type, scores)) != {int} or min(scores) < 0 or max(scores) > MAX_IMPORTANCE))):
        raise TypeError(f"meta.importance.scores must be one integer in [0, {MAX_IMPORTANCE}] per token")
    return tuple(scores)


def parse_header(raw: bytes, limits: EntryLimits) -> EntryHeader:
    """The header's JSON -> ``EntryHeader``; ``CorruptEntry`` naming the first thing wrong."""
    try:
        text = raw.decode("utf-8")
        _check_nesting(text)
        d = json.loads(text, parse_constant=refuse_constant)
        if not isinstance(d, dict):
            raise TypeError("header is not an object")
        shape_list = d.get("shape")
        if not isinstance(shape_list, list) or not all(is_int(s, 0, MAX_POSITION) for s in shape_list):
            raise TypeError("shape must be a list of non-negative integers")
        shape = tuple(shape_list)
        check_shape(shape)
        limits.check_elements(shape)
        dtype = d.get("dtype")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        expires_at = d.get("expires_at")
        if expires_at is not None and (type(expires_at) not in (int, float) or not math.isfinite(expires_at)):
            raise TypeError(f"expires_at must be a finite number or null, got {expires_at!r}")
        key = d.get("key")
        if key is not None:
            try:
                check_key(key)
            except ConfigError as exc:
                raise ValueError(f"key: {exc}") from None
        meta = parse_meta(d.get("meta"))
        if len(meta.token_ids) != shape[3]:
            raise ValueError(f"meta has {len(meta.token_ids)} token ids for {shape[3]} tokens of KV")
        return EntryHeader(text_field(d.get("codec"), "codec"), _flat_object(d.get("params", {}), "params"), shape,
                           dtype, meta, None if expires_at is None else float(expires_at), key)
    except CorruptEntry:
        raise
    except (ValueError, TypeError, KeyError, CodecError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptEntry(f"invalid entry header: {exc}") from exc


__all__ = ["DEFAULT_MAX_ENTRY_ELEMENTS", "EntryHeader", "EntryLimits", "is_int", "parse_header", "parse_meta",
           "refuse_constant", "text_field"]
