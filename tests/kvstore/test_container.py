"""Container format: round trips, and every kind of damage is a CorruptEntry before anything is allocated."""
from __future__ import annotations

import json
import random
import struct
import zlib

import pytest
import torch

from ragkv.codecs import get_codec
from ragkv.kvstore import ChunkKV, ChunkMeta, CorruptEntry, decode_entry, encode_entry, read_header
from ragkv.kvstore.container import MAGIC, read_entry, rewrite_header


def chunk(tokens: int = 12, dtype: torch.dtype = torch.float16) -> ChunkKV:
    g = torch.Generator().manual_seed(tokens)
    kv = torch.randn(3, 2, 2, tokens, 8, generator=g).to(dtype)  # kv: [L, 2, H, T, D]
    return ChunkKV(kv, ChunkMeta("fp", tuple(range(tokens)), position=5, dtype="float16", extra={"doc": "a"}))


def forge(header: dict, payload: bytes) -> bytes:
    """A blob with a valid checksum around an arbitrary header, as a hostile writer could make."""
    hdr = json.dumps(header).encode()
    prefix = struct.pack("<4sHHIQ", MAGIC, 1, 0, len(hdr), len(payload))
    body = prefix + hdr + payload
    return body + struct.pack("<I", zlib.crc32(body))


def test_round_trip_and_header() -> None:
    c = chunk()
    blob = encode_entry(c, get_codec("raw"), expires_at=123.5)
    header, back = decode_entry(blob)
    assert back.equals(c)
    assert header.codec == "raw" and header.shape == tuple(c.kv.shape) and header.expires_at == 123.5
    assert read_header(blob).meta == c.meta
    header, payload = read_entry(blob)
    layers = get_codec("raw").decode_layers(payload, header.shape, torch.float16, [2, 0])
    assert torch.equal(layers, c.kv[[2, 0]])


def test_encoding_is_deterministic() -> None:
    assert encode_entry(chunk(), get_codec("raw")) == encode_entry(chunk(), get_codec("raw"))


def test_every_single_bit_flip_and_truncation_is_detected() -> None:
    blob = encode_entry(chunk(tokens=4), get_codec("raw"))
    rng = random.Random(0)
    for pos in range(len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(CorruptEntry):
            decode_entry(bytes(bad))
    for cut in range(len(blob)):
        with pytest.raises(CorruptEntry):
            decode_entry(blob[:cut])
    with pytest.raises(CorruptEntry):
        decode_entry(blob + b"\x00")


def test_garbage_and_wrong_magic() -> None:
    for junk in (b"", b"RGKV", b"\x00" * 100, bytes(random.Random(1).randbytes(5000)), b"PK\x03\x04" + b"x" * 64):
        with pytest.raises(CorruptEntry):
            decode_entry(junk)


@pytest.mark.parametrize("mutate", [
    lambda h: h.update(shape=[2, 2, 2, 10**9, 128]),       # absurd declared size
    lambda h: h.update(shape=[2, 3, 2, 4, 8]),             # not [L, 2, H, T, D]
    lambda h: h.update(shape="big"),
    lambda h: h.update(dtype="float64"),
    lambda h: h.update(codec="pickle"),
    lambda h: h.update(meta={"token_ids": "x"}),
    lambda h: h["meta"].update(token_ids=[1, 2]),          # token ids disagree with the shape
    lambda h: h.update(expires_at="soon"),
    lambda h: h.update(params={"evil": 1}),
])
def test_hostile_headers_with_valid_checksums(mutate) -> None:
    good = encode_entry(chunk(tokens=4), get_codec("raw"))
    header = json.loads(good[20:20 + struct.unpack_from("<I", good, 8)[0]])
    payload = good[20 + struct.unpack_from("<I", good, 8)[0]:-4]
    mutate(header)
    with pytest.raises(CorruptEntry):
        decode_entry(forge(header, payload))


def test_payload_size_must_match_shape() -> None:
    good = encode_entry(chunk(tokens=4), get_codec("raw"))
    hdr_len = struct.unpack_from("<I", good, 8)[0]
    header = json.loads(good[20:20 + hdr_len])
    with pytest.raises(CorruptEntry):
        decode_entry(forge(header, good[20 + hdr_len:-4][:-2]))


def test_oversized_header_length_is_refused_before_reading() -> None:
    blob = struct.pack("<4sHHIQ", MAGIC, 1, 0, 0xFFFFFFFF, 0) + b"\x00" * 4
    with pytest.raises(CorruptEntry, match="header length"):
        decode_entry(blob)


def test_newer_version_is_refused() -> None:
    blob = bytearray(encode_entry(chunk(tokens=2), get_codec("raw")))
    blob[4] = 9
    with pytest.raises(CorruptEntry, match="version"):
        decode_entry(bytes(blob))


def test_rewrite_header_changes_expiry_and_binds_a_key() -> None:
    c = chunk()
    blob = encode_entry(c, get_codec("raw"))
    returned, later = rewrite_header(blob, key=None, expires_at=99.0)
    header, back = decode_entry(later)
    assert header == returned and header.expires_at == 99.0 and back.equals(c) and header.key is None
    assert decode_entry(rewrite_header(later, key=None, expires_at=None)[1])[0].expires_at is None
    assert rewrite_header(later, key=None) == (header, later)  # nothing to change: the same bytes
    bound = rewrite_header(blob, key="ns:a")[1]
    assert decode_entry(bound, key="ns:a")[0].key == "ns:a"
    with pytest.raises(CorruptEntry, match="written under key"):
        decode_entry(bound, key="ns:b")
    with pytest.raises(CorruptEntry, match="written under key"):
        rewrite_header(bound, key="other:a")


def test_nothing_on_the_read_path_unpickles() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for folder in ("kvstore", "codecs", "middleware", "integrations"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            assert "pickle.load" not in text and "torch.load(" not in text, path


def test_read_entry_gives_the_validated_payload() -> None:
    from ragkv.kvstore.container import read_entry

    c = chunk()
    codec = get_codec("raw")
    blob = encode_entry(c, codec)
    header, payload = read_entry(blob)
    assert header.meta == c.meta
    assert torch.equal(codec.decode_layers(payload, header.shape, c.kv.dtype, [1]), c.kv[[1]])
    bad = bytearray(blob)
    bad[-10] ^= 1
    with pytest.raises(CorruptEntry):
        read_entry(bytes(bad))
