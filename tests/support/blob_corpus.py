"""A seeded corpus of hostile container blobs, for every codec: what the fuzz suites feed every read path.

Each entry is (name, blob). Kinds: bit flips anywhere (checksum re-made, so the damage reaches the header
or the payload parser), truncations and appended bytes (checksum re-made), header edits (types, bounds,
NaN/Infinity, nesting, keys) and huge declared dimensions behind tiny payloads.
"""
from __future__ import annotations

import json
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ragkv.codecs import get_codec
from ragkv.kvstore import ChunkKV, ChunkMeta, chunk_key, encode_entry
from ragkv.kvstore.container import MAGIC

CODECS: list[tuple[str, dict[str, Any]]] = [("raw", {}), ("zstd", {}), ("quant", {"bits": 8}), ("quant", {"bits": 4}),
                                            ("cachegen", {})]


@dataclass(frozen=True)
class Geometry:
    """The model the corpus pretends to come from: its fingerprint, KV shape per token, dtype, and how keys
    are made (a service's content keys, or the store's plain ``chunk_key``)."""

    fingerprint: str = "corpus-model"
    namespace: str = "fuzz"
    layers: int = 2
    heads: int = 2
    dim: int = 16
    dtype: torch.dtype = torch.float16
    key_of: Callable[[tuple[int, ...]], str] | None = None

    def key(self, ids: tuple[int, ...]) -> str:
        return self.key_of(ids) if self.key_of is not None else chunk_key(self.fingerprint, self.namespace, ids)


def good_blob(codec: str, params: dict[str, Any], tokens: int = 12, geometry: Geometry = Geometry()
              ) -> tuple[str, bytes]:
    g = torch.Generator().manual_seed(tokens)
    kv = torch.randn(geometry.layers, 2, geometry.heads, tokens, geometry.dim, generator=g).to(geometry.dtype)
    ids = tuple(range(3, 3 + tokens))
    key = geometry.key(ids)
    meta = ChunkMeta(geometry.fingerprint, ids, position=1, dtype=str(geometry.dtype).removeprefix("torch."))
    return key, encode_entry(ChunkKV(kv, meta), get_codec(codec, params), key=key)


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    hdr_len, pay_len = struct.unpack_from("<IQ", blob, 8)
    return json.loads(blob[20:20 + hdr_len]), blob[20 + hdr_len:20 + hdr_len + pay_len]


def frame(header: dict[str, Any] | str, payload: bytes) -> bytes:
    hdr = (header if isinstance(header, str) else json.dumps(header)).encode()
    body = struct.pack("<4sHHIQ", MAGIC, 1, 0, len(hdr), len(payload)) + hdr + payload
    return body + struct.pack("<I", zlib.crc32(body))


def reframe(raw: bytes) -> bytes:
    """Bytes after the prefix re-split by the declared lengths where possible, with a fresh checksum."""
    body = raw[:-4] if len(raw) >= 4 else raw
    return body + struct.pack("<I", zlib.crc32(body))


def hostile_blobs(seed: int = 0, flips: int = 12, geometry: Geometry = Geometry()) -> list[tuple[str, str, bytes]]:
    """(name, key it is read under, blob) for every codec."""
    rng = random.Random(seed)
    out: list[tuple[str, str, bytes]] = []
    for codec, params in CODECS:
        tag = f"{codec}{params.get('bits', '')}"
        key, blob = good_blob(codec, params, geometry=geometry)
        header, payload = split(blob)
        for i in range(flips):
            bad = bytearray(blob)
            pos = rng.randrange(20, len(blob) - 4)
            bad[pos] ^= 1 << rng.randrange(8)
            out.append((f"{tag} flip {i}", key, reframe(bytes(bad))))
        for cut in sorted(rng.sample(range(1, len(payload)), min(6, len(payload) - 1))):
            out.append((f"{tag} payload cut {cut}", key, frame(header, payload[:cut])))
        out.append((f"{tag} payload plus bytes", key, frame(header, payload + b"\x00" * 17)))
        out.append((f"{tag} raw truncation", key, blob[: len(blob) // 2]))
        for name, path, value in [
            ("huge tokens", "shape", [geometry.layers, 2, geometry.heads, 1 << 28, geometry.dim]),
            ("huge layers", "shape", [1 << 20, 2, geometry.heads, 12, geometry.dim]),
            ("zero dim", "shape", [geometry.layers, 2, geometry.heads, 12, 0]),
            ("wrong token count", "shape", [geometry.layers, 2, geometry.heads, 13, geometry.dim]),
            ("bool rope", "meta.rope", "no"),
            ("float position", "meta.position", 1.5),
            ("huge token id", "meta.token_ids", [10**40] * 12),
            ("nested params", "params", {"x": {"y": [1]}}),
            ("unknown codec", "codec", "lzma"),
            ("unknown dtype", "dtype", "int8"),
            ("other key", "key", "victim:" + "0" * 40),
        ]:
            edited = json.loads(json.dumps(header))
            target = edited
            *parents, last = path.split(".")
            for p in parents:
                target = target[p]
            target[last] = value
            out.append((f"{tag} {name}", key, frame(edited, payload)))
        text = json.dumps(header)
        out.append((f"{tag} expires NaN", key, frame(text.replace('"expires_at": null', '"expires_at": NaN'), payload)))
        out.append((f"{tag} position Infinity", key, frame(text.replace('"position": 1', '"position": Infinity'),
                                                           payload)))
        out.append((f"{tag} deep nesting", key, frame(text.replace('"extra": {}', '"extra": ' + "[" * 3000 + "]" * 3000),
                                                      payload)))
    return out


__all__ = ["CODECS", "Geometry", "frame", "good_blob", "hostile_blobs", "split"]
