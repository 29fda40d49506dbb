"""The container format: everything that leaves process memory is one self-describing, checksummed blob.

Layout (little-endian)::

    magic     4 bytes  b"RGKV"
    version   u16      1
    flags     u16      0
    hdr_len   u32      length of the JSON header
    pay_len   u64      length of the codec payload
    header    hdr_len  UTF-8 JSON: codec, params, shape, dtype, meta, expires_at
    payload   pay_len  the codec's bytes
    crc32     u32      over everything before it

Decoding validates magic, version, sizes and the checksum before it parses or allocates anything; any
fault raises ``CorruptEntry``. Nothing here unpickles.
"""
from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from ragkv.codecs import Codec, CodecError, get_codec
from ragkv.codecs.base import DTYPE_NAMES, check_shape, dtype_from_name
from ragkv.kvstore.chunk import ChunkKV, ChunkMeta
from ragkv.kvstore.errors import CorruptEntry

MAGIC = b"RGKV"
VERSION = 1
_PREFIX = struct.Struct("<4sHHIQ")  # magic, version, flags, header length, payload length
_CRC = struct.Struct("<I")
MAX_HEADER_BYTES = 16 << 20  # token ids of a long chunk fit easily; anything larger is hostile
OVERHEAD_BYTES = _PREFIX.size + _CRC.size


@dataclass(frozen=True)
class EntryHeader:
    codec: str
    params: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str
    meta: ChunkMeta
    expires_at: float | None = None

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now if now is not None else time.time()) >= self.expires_at


def encode_entry(chunk: ChunkKV, codec: Codec, expires_at: float | None = None) -> bytes:
    """ChunkKV -> blob, with ``codec`` for the payload."""
    payload = codec.encode(chunk.kv)
    header = {
        "codec": codec.name,
        "params": codec.params.to_dict(),
        "shape": list(chunk.kv.shape),
        "dtype": DTYPE_NAMES[chunk.kv.dtype],
        "meta": chunk.meta.to_dict(),
        "expires_at": expires_at,
    }
    hdr = _aligned_header(header)
    prefix = _PREFIX.pack(MAGIC, VERSION, 0, len(hdr), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(hdr, zlib.crc32(prefix)))
    return b"".join((prefix, hdr, payload, _CRC.pack(crc)))


PAYLOAD_ALIGNMENT = 64


def _aligned_header(header: dict[str, Any]) -> bytes:
    """JSON header padded with spaces so the payload starts on a 64-byte boundary of the blob.

    Codec payloads begin with an 8-byte-per-entry layer table, so the tensor bytes of a ``raw`` payload land
    8-byte aligned and can be viewed in place (zero-copy) instead of copied into a fresh tensor.
    """
    hdr = json.dumps(header, separators=(",", ":")).encode()
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


def _parse_header(hdr: memoryview) -> EntryHeader:
    try:
        d = json.loads(bytes(hdr))
        if not isinstance(d, dict):
            raise TypeError("header is not an object")
        shape = tuple(d["shape"])
        check_shape(shape)
        dtype = str(d["dtype"])
        dtype_from_name(dtype)
        params = d.get("params") or {}
        if not isinstance(params, dict):
            raise TypeError("params is not an object")
        expires_at = d.get("expires_at")
        if expires_at is not None and not isinstance(expires_at, (int, float)):
            raise TypeError("expires_at is not a number")
        meta = ChunkMeta.from_dict(d["meta"])
        if len(meta.token_ids) != shape[3]:
            raise ValueError(f"meta has {len(meta.token_ids)} token ids for {shape[3]} tokens of KV")
        return EntryHeader(str(d["codec"]), params, shape, dtype, meta, expires_at)
    except CorruptEntry:
        raise
    except (ValueError, TypeError, KeyError, CodecError, UnicodeDecodeError) as exc:
        raise CorruptEntry(f"invalid entry header: {exc}") from exc


def read_header(blob: bytes | bytearray | memoryview) -> EntryHeader:
    """Validate a blob (checksum included) and return its header without decoding the payload."""
    hdr, _ = _split(blob)
    return _parse_header(hdr)


def read_entry(blob: bytes | bytearray | memoryview) -> tuple[EntryHeader, memoryview]:
    """Validate a blob (checksum included) once; return its header and a view of the codec payload, for
    callers that decode it themselves (e.g. layer by layer with ``Codec.decode_layers``)."""
    hdr, payload = _split(blob)
    return _parse_header(hdr), payload


def decode_entry(blob: bytes | bytearray | memoryview) -> tuple[EntryHeader, ChunkKV]:
    """Blob -> (header, ChunkKV). Raises ``CorruptEntry`` on anything wrong."""
    hdr, payload = _split(blob)
    header = _parse_header(hdr)
    try:
        codec = get_codec(header.codec, header.params)
        kv = codec.decode(payload, header.shape, dtype_from_name(header.dtype))
    except CodecError as exc:
        raise CorruptEntry(f"payload does not decode with codec {header.codec!r}: {exc}") from exc
    return header, ChunkKV(kv, header.meta)


def decode_entry_layers(blob: bytes | bytearray | memoryview, layers: list[int]) -> tuple[EntryHeader, torch.Tensor]:
    """Blob -> (header, kv of just ``layers`` [len(layers), 2, H, T, D]) for layer-wise pipelining."""
    hdr, payload = _split(blob)
    header = _parse_header(hdr)
    try:
        codec = get_codec(header.codec, header.params)
        kv = codec.decode_layers(payload, header.shape, dtype_from_name(header.dtype), layers)
    except CodecError as exc:
        raise CorruptEntry(f"payload does not decode with codec {header.codec!r}: {exc}") from exc
    return header, kv


def with_expiry(blob: bytes | bytearray | memoryview, expires_at: float | None) -> bytes:
    """Return ``blob`` with its header's ``expires_at`` replaced (validates first; the payload is copied once)."""
    hdr, payload = _split(blob)
    d = json.loads(bytes(hdr))
    if d.get("expires_at") == expires_at:
        return bytes(blob)
    d["expires_at"] = expires_at
    new_hdr = _aligned_header(d)
    prefix = _PREFIX.pack(MAGIC, VERSION, 0, len(new_hdr), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(new_hdr, zlib.crc32(prefix)))
    return b"".join((prefix, new_hdr, payload, _CRC.pack(crc)))
