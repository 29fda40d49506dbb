"""Hostile headers: every strictness rule of the header schema, through the container and through a tier.

Each case once raised out of ``get`` (OverflowError, RecursionError), or was silently accepted with the
wrong meaning (``"rope": "no"`` as true, ``position: 1.7`` as 1, token ids of 10^40, ``expires_at`` NaN).
Now each is a ``CorruptEntry``, which a tier answers as a miss and deletes.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from kv_samples import make_chunk

from ragkv.codecs import get_codec
from ragkv.kvstore import CorruptEntry, TieredStore, decode_entry, encode_entry, read_header
from ragkv.kvstore.container import MAGIC
from ragkv.kvstore.header_schema import EntryLimits

KEY = "t1:" + "a" * 40


def forge(header: dict[str, Any] | str, payload: bytes) -> bytes:
    """A blob with a valid checksum around an arbitrary header, as a hostile writer could make."""
    hdr = (header if isinstance(header, str) else json.dumps(header)).encode()
    prefix = struct.pack("<4sHHIQ", MAGIC, 1, 0, len(hdr), len(payload))
    body = prefix + hdr + payload
    return body + struct.pack("<I", zlib.crc32(body))


def good_parts() -> tuple[dict[str, Any], bytes]:
    blob = encode_entry(make_chunk(1, tokens=4), get_codec("raw"), key=KEY)
    (hdr_len, pay_len) = struct.unpack_from("<IQ", blob, 8)
    header = json.loads(blob[20:20 + hdr_len])
    return header, blob[20 + hdr_len:20 + hdr_len + pay_len]


def edited(path: str, value: Any) -> bytes:
    header, payload = good_parts()
    target = header
    *parents, last = path.split(".")
    for p in parents:
        target = target[p]
    target[last] = value
    return forge(header, payload)


def raw_json(path: str, literal: str) -> bytes:
    """Splice a JSON literal that Python's json.dumps would not write (Infinity, NaN, deep nesting)."""
    header, payload = good_parts()
    marker = "__HOSTILE__"
    target = header
    *parents, last = path.split(".")
    for p in parents:
        target = target[p]
    target[last] = marker
    return forge(json.dumps(header).replace(f'"{marker}"', literal), payload)


HOSTILE = {
    "position Infinity": raw_json("meta.position", "Infinity"),
    "position NaN": raw_json("meta.position", "NaN"),
    "expires_at NaN": raw_json("expires_at", "NaN"),
    "expires_at -Infinity": raw_json("expires_at", "-Infinity"),
    "deeply nested extra": raw_json("meta.extra", "[" * 5000 + "]" * 5000),
    "nested params": edited("params", {"a": {"b": 1}}),
    "rope as a string": edited("meta.rope", "no"),
    "rope as an integer": edited("meta.rope", 0),
    "fractional position": edited("meta.position", 1.7),
    "boolean position": edited("meta.position", True),
    "negative position": edited("meta.position", -1),
    "huge position": edited("meta.position", 10**40),
    "huge token id": edited("meta.token_ids", [10**40, 1, 2, 3]),
    "negative token id": edited("meta.token_ids", [-1, 1, 2, 3]),
    "float token id": edited("meta.token_ids", [1.0, 1, 2, 3]),
    "boolean shape": edited("shape", [True, 2, 2, 4, 8]),
    "huge shape": edited("shape", [2, 2, 2, 10**40, 8]),
    "fingerprint null": edited("meta.fingerprint", None),
    "key of another tenant": edited("key", "other:" + "a" * 40),
    "key not a key": edited("key", "../../etc"),
    "codec not a string": edited("codec", ["raw"]),
    "importance not an object": edited("meta.importance", [1, 2, 3, 4]),
    "importance without a version": edited("meta.importance", {"scores": [1, 2, 3, 4]}),
    "importance of the wrong length": edited("meta.importance", {"version": 1, "scores": [1, 2, 3]}),
    "importance over 255": edited("meta.importance", {"version": 1, "scores": [1, 2, 3, 256]}),
    "importance as floats": edited("meta.importance", {"version": 1, "scores": [1.0, 2, 3, 4]}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_header_is_corrupt_entry(name: str) -> None:
    with pytest.raises(CorruptEntry):
        decode_entry(HOSTILE[name], key=KEY)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_in_the_disk_tier_is_a_miss_and_deleted(tmp_path: Path, name: str) -> None:
    with TieredStore(f"host,disk:{tmp_path}") as store:
        disk = store.tiers[1]
        path = Path(disk.path_for(KEY))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(HOSTILE[name])
        assert store.get(KEY) is None
        assert not path.exists()  # deleted, so the next reader does not trip over it again
        assert store.get(KEY) is None and store.get_blob(KEY) is None


def test_declared_shape_over_the_limit_is_refused_before_allocating() -> None:
    header, payload = good_parts()
    header["shape"] = [1000, 2, 64, 4, 128]
    header["meta"]["token_ids"] = [1, 2, 3, 4]
    blob = forge(header, payload)
    with pytest.raises(CorruptEntry, match="over this store's limit"):
        read_header(blob, EntryLimits(max_elements=1 << 20))
    ok = encode_entry(make_chunk(1, tokens=4), get_codec("raw"))
    assert read_header(ok, EntryLimits(max_elements=2 * 2 * 2 * 4 * 8)).shape == (2, 2, 2, 4, 8)
    with pytest.raises(CorruptEntry):
        read_header(ok, EntryLimits(max_elements=2 * 2 * 2 * 4 * 8 - 1))


def test_store_limit_narrows_to_what_the_model_makes(tmp_path: Path) -> None:
    with TieredStore(f"host,disk:{tmp_path}") as store:
        chunk = make_chunk(2, tokens=8)
        store.put(KEY, chunk)
        store.tiers[0].delete(KEY)
        store.limit_entries(chunk.kv.numel() - 1)
        assert store.get(KEY) is None  # the stored entry now claims more than allowed: a miss
        assert store.stats()["max_entry_elements"] == chunk.kv.numel() - 1


def test_writers_never_emit_non_standard_json() -> None:
    chunk = make_chunk(3)
    with pytest.raises(ValueError):
        encode_entry(chunk, get_codec("raw"), expires_at=float("nan"))
    assert torch.equal(decode_entry(encode_entry(chunk, get_codec("raw"), key=KEY), key=KEY)[1].kv, chunk.kv)
