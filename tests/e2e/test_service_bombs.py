"""Decompression bombs against a real ``ragkv serve`` process, whose peak memory (VmHWM) is read from /proc.

Once, a 131 KB blob PUT to ``/v1/chunks/...`` drove the server to a 12.7 GB peak and a 33 KB blob left a
1 GiB file in the disk tier: the PUT path decoded every blob and re-encoded it for each tier, and a header
could claim 2^32 elements. Now a blob may claim no more KV than the largest chunk the served model makes,
the claim is checked before anything is allocated, and a PUT stores the blob as it came, never decoded.
"""
from __future__ import annotations

import json
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_process import ragkv_command, stop

from ragkv.kvstore import read_header
from ragkv.kvstore.container import MAGIC
from ragkv.kvstore.tiers.disk_files import name_hash

OCTET = {"content-type": "application/octet-stream"}
PEAK_BOUND_BYTES = 64 << 20  # the server's peak may grow by at most this over the whole attack


def forge(header: dict[str, Any], payload: bytes) -> bytes:
    hdr = json.dumps(header).encode()
    body = struct.pack("<4sHHIQ", MAGIC, 1, 0, len(hdr), len(payload)) + hdr + payload
    return body + struct.pack("<I", zlib.crc32(body))


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc")
    disk = tmp_path_factory.mktemp("bomb-disk")
    proc = subprocess.Popen([*ragkv_command(), "serve", "--model", "toy", "--port", "0", "--no-sample",
                             "--store", f"host:64MB,disk:{disk}:1GB"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = None
    deadline = time.monotonic() + 180
    assert proc.stdout is not None
    for line in proc.stdout:
        if "is serving on" in line:
            url = line.split("is serving on ", 1)[1].split()[0]
            break
        if time.monotonic() > deadline:
            break
    try:
        assert url is not None, "ragkv serve did not start"
        yield {"url": url, "pid": proc.pid, "disk": disk}
    finally:
        stop(proc)


def test_crafted_headers_never_make_the_server_allocate(server: dict[str, Any]) -> None:
    with httpx.Client(base_url=server["url"], timeout=60) as client:
        text = "k1 v2 ; a chunk to learn the model's geometry from"
        key = client.post("/v1/warm", json={"texts": [text]}).json()["keys"][0]
        genuine = client.get(f"/v1/chunks/{key}").content
        header = read_header(genuine)
        client.post("/v1/generate", json={"query": "Q k1 ?", "documents": [text], "max_new_tokens": 2})
        baseline = peak_rss(server["pid"])
        layers, _, heads, _, dim = header.shape
        meta = {"fingerprint": header.meta.fingerprint, "token_ids": list(header.meta.token_ids), "position": 1,
                "dtype": header.meta.dtype, "rope": True, "extra": {}}
        huge = [layers, 2, heads, 1 << 26, dim]
        bombs = {
            # claims 2^26 tokens of KV behind a few bytes of arithmetic-coded payload
            "cachegen huge shape": forge({"codec": "cachegen", "params": {}, "shape": huge, "dtype": header.dtype,
                                          "meta": {**meta, "token_ids": [1] * 8}}, b"\x00" * 4096),
            "raw claims 2^32 elements": forge({"codec": "raw", "params": {}, "shape": [1 << 10, 2, 1 << 6, 1 << 10, 32],
                                               "dtype": "float32", "meta": {**meta, "token_ids": []}}, b""),
            # exactly the model's geometry and content key, with a zstd frame claiming 1 GiB per layer
            "zstd frame bomb": forge({"key": key, "codec": "zstd", "params": {}, "shape": list(header.shape),
                                      "dtype": header.dtype, "meta": meta},
                                     _zstd_bomb_payload(layers)),
        }
        statuses = {}
        for name, blob in bombs.items():
            with ThreadPoolExecutor(4) as pool:  # four uploads at once, as the upload slots allow
                results = list(pool.map(lambda b: client.put(f"/v1/chunks/{key}", content=b, headers=OCTET).status_code,
                                        [blob] * 4))
            statuses[name] = set(results)
        assert statuses["cachegen huge shape"] == {422} and statuses["raw claims 2^32 elements"] == {422}
        assert statuses["zstd frame bomb"] <= {201}  # well-formed as far as a PUT looks: stored, not decoded
        # reading it back is a miss (the frame does not match the shape), recomputed from the tokens
        answer = client.post("/v1/generate", json={"query": "Q k1 ?", "documents": [text], "max_new_tokens": 2})
        assert answer.status_code == 200
        # a bomb planted directly in the disk tier is a miss too, and is deleted
        h = name_hash("planted")
        planted = Path(server["disk"]) / "default" / h[0:2] / h[2:4] / "planted.kv"
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_bytes(bombs["cachegen huge shape"])
        assert client.head("/v1/chunks/default:planted").status_code == 404
        assert client.get("/v1/chunks/default:planted").status_code == 404
        assert not planted.exists()
        growth = peak_rss(server["pid"]) - baseline
        assert growth < PEAK_BOUND_BYTES, f"peak memory grew by {growth / 2**20:.0f} MiB"
        assert sum(f.stat().st_size for f in Path(server["disk"]).rglob("*") if f.is_file()) < 16 << 20


def _zstd_bomb_payload(layers: int) -> bytes:
    """A layer table over ``layers`` zstd frames of a few KB, each inflating to 256 MiB of zeros."""
    import zstandard

    frame = zstandard.ZstdCompressor(level=3).compress(bytes(256 << 20))
    offsets = [len(frame) * i for i in range(layers + 1)]
    return struct.pack(f"<{layers + 1}Q", *offsets) + frame * layers
