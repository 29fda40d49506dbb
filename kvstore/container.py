"""The container format: everything that leaves process memory is one self-describing, checksummed blob.

Layout (little-endian)::

    magic     4 bytes  b"RGKV"
    version   u16      1
    flags     u16      0
    hdr_len   u32      length of the JSON header
    pay_len   u64      length of the codec payload
    header    hdr_len  UTF-8 JSON: key, codec, params, shape, dtype, meta, expires_at
    payload   pay_len  the codec's bytes
    crc32     u32      over everything before it

The header names the store key the entry was written under, so the checksum binds key, model fingerprint,
token ids and KV together: a blob copied under another key is refused. Decoding validates magic, version,
sizes and the checksum, then the header strictly (``ragkv.kvstore.header_schema``, including the reader's
``EntryLimits``), before it allocates anything; any fault raises ``CorruptEntry``. Nothing here unpickles.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import replace

from ragkv.codecs import Codec, CodecError, get_codec
from ragkv.codecs.base import DTYPE_NAMES, dtype_from_name
from ragkv.kvstore.chunk import ChunkKV, check_key
from ragkv.kvstore.errors import CorruptEntry
from ragkv.kvstore.header_schema import EntryHeader, EntryLimits, parse_header

MAGIC = b"RGKV"
VERSION = 1
_PREFIX = struct.Struct("<4sHHIQ")  # magic, version, flags, header length, payload length
_CRC = struct.Struct("<I")
MAX_HEADER_BYTES = 16 << 20  # token ids of a long chunk fit easily; anything larger is hostile
OVERHEAD_BYTES = _PREFIX.size + _CRC.size
PAYLOAD_ALIGNMENT = 64
DEFAULT_LIMITS = EntryLimits()


def encode_entry(chunk: ChunkKV, codec: Codec, expires_at: float | None = None, key: str | None = None) -> bytes:
    """ChunkKV -> blob, with ``codec`` for the payload; ``key`` is the store key it is written under."""
    meta = chunk.meta
    payload = codec.encode(chunk.kv, position=meta.position if meta.rope else None)
    header = {
        "key": None if key is None else check_key(key),
        "codec": codec.name,
        "params": codec.payload_params(chunk.kv),
        "shape": list(chunk.kv.shape),
        "dtype": DTYPE_NAMES[chunk.kv.dtype],
        "meta": chunk.meta.to_dict(),
        "expires_at": expires_at,
    }
    return _frame(_aligned_header(header), payload)


def _frame(hdr: bytes, payload: bytes | memoryview) -> bytes:
    prefix = _PREFIX.pack(MAGIC, VERSION, 0, len(hdr), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(hdr, zlib.crc32(prefix)))
    return b"".join((prefix, hdr, payload, _CRC.pack(crc)))


def _aligned_header(header: dict[str, object]) -> bytes:
    """JSON header padded with spaces so the payload starts on a 64-byte boundary of the blob.

    Codec payloads begin with an 8-byte-per-entry layer table, so the tensor bytes of a ``raw`` payload land
    8-byte aligned and can be viewed in place (zero-copy) instead of copied into a fresh tensor.
    """
    hdr = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    pad = -(_PREFIX.size + len(hdr)) % PAYLOAD_ALIGNMENT
    return hdr + b" " * pad


def _split(blob: bytes | bytearray | memoryview) -> tuple[memoryview, memoryview]:
    """Validate framing and checksum; return (header bytes, payload bytes) as views."""
    view = memoryview(blob)
    if len(view) < OVERHEAD_BYTES:
        raise CorruptEntry(f"blob of {len(view)} bytes is shorter than the container overhead")
    magic, version, flags, hdr_len, pay_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptEntry("not a ragkv entry (bad magic)")
    if version != VERSION:
        raise CorruptEntry(f"container version {version} is not supported (this ragkv reads {VERSION})")
    if flags != 0:
        raise CorruptEntry(f"unknown container flags {flags:#x}")
    if hdr_len > MAX_HEADER_BYTES:
        raise CorruptEntry(f"header length {hdr_len} exceeds {MAX_HEADER_BYTES}")
    if _PREFIX.size + hdr_len + pay_len + _CRC.size != len(view):
        raise CorruptEntry(
            f"blob is {len(view)} bytes but its prefix declares {_PREFIX.size + hdr_len + pay_len + _CRC.size}"
        )
    body_end = len(view) - _CRC.size
    (stored_crc,) = _CRC.unpack_from(view, body_end)
    if zlib.crc32(view[:body_end]) != stored_crc:
        raise CorruptEntry("checksum mismatch")
    hdr = view[_PREFIX.size:_PREFIX.size + hdr_len]
    payload = view[_PREFIX.size + hdr_len:body_end]
    return hdr, payload


def _checked_header(hdr: memoryview, limits: EntryLimits | None, key: str | None) -> EntryHeader:
    header = parse_header(bytes(hdr), limits or DEFAULT_LIMITS)
    if key is not None and header.key is not None and header.key != key:
        raise CorruptEntry(f"entry was written under key {header.key!r}, not {key!r}")
    return header


def read_header(blob: bytes | bytearray | memoryview, limits: EntryLimits | None = None,
                key: str | None = None) -> EntryHeader:
    """Validate a blob (checksum, header, ``limits``; and, given ``key``, that it was written under it) and
    return its header without decoding the payload."""
    hdr, _ = _split(blob)
    return _checked_header(hdr, limits, key)


def read_entry(blob: bytes | bytearray | memoryview, limits: EntryLimits | None = None,
               key: str | None = None) -> tuple[EntryHeader, memoryview]:
    """Validate a blob once (as ``read_header``); return its header and a view of the codec payload, for
    callers that decode it themselves (e.g. layer by layer with ``Codec.decode_layers``)."""
    hdr, payload = _split(blob)
    return _checked_header(hdr, limits, key), payload


def decode_entry(blob: bytes | bytearray | memoryview, limits: EntryLimits | None = None,
                 key: str | None = None) -> tuple[EntryHeader, ChunkKV]:
    """Blob -> (header, ChunkKV). Raises ``CorruptEntry`` on anything wrong."""
    header, payload = read_entry(blob, limits, key)
    try:
        codec = get_codec(header.codec, header.params)
        kv = codec.decode(payload, header.shape, dtype_from_name(header.dtype))
    except CodecError as exc:
        raise CorruptEntry(f"payload does not decode with codec {header.codec!r}: {exc}") from exc
    return header, ChunkKV(kv, header.meta)


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()  # ``rewrite_header``: leave the blob's expiry as it is


def rewrite_header(blob: bytes | bytearray | memoryview, *, key: str | None, limits: EntryLimits | None = None,
                   expires_at: float | None | _Keep = KEEP) -> tuple[EntryHeader, bytes]:
    """Validate ``blob`` once (as ``read_header``) and return its header with the blob bound to ``key`` (which it
    must carry already, or carry none) and given ``expires_at`` (``KEEP``: as it is). The payload is copied
    only when the header changes."""
    hdr, payload = _split(blob)
    header = _checked_header(hdr, limits, key)
    new_expiry = header.expires_at if isinstance(expires_at, _Keep) else expires_at
    new_key = header.key if key is None else key
    if new_expiry == header.expires_at and new_key == header.key:
        return header, bytes(blob)
    d = json.loads(bytes(hdr))
    d["expires_at"], d["key"] = new_expiry, new_key
    return replace(header, expires_at=new_expiry, key=new_key), _frame(_aligned_header(d), payload)


__all__ = [
    "KEEP",
    "MAGIC",
    "OVERHEAD_BYTES",
    "VERSION",
    "EntryHeader",
    "EntryLimits",
    "decode_entry",
    "encode_entry",
    "read_entry",
    "read_header",
    "rewrite_header",
]
