"""Chunk data model, fingerprints and content keys."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ragkv.kvstore import (
    ChunkKV,
    ChunkMeta,
    ConfigError,
    ModelFingerprint,
    check_key,
    chunk_key,
    key_namespace,
)


def test_chunk_key_is_stable_across_processes() -> None:
    here = chunk_key("fp1", "tenant", [1, 2, 3, 70000])
    code = "from ragkv.kvstore import chunk_key; print(chunk_key('fp1', 'tenant', [1, 2, 3, 70000]))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert here == there
    assert here.startswith("tenant:") and len(here.split(":")[1]) == 40


def test_chunk_key_depends_on_every_part() -> None:
    base = chunk_key("fp1", "t", [1, 2, 3])
    assert chunk_key("fp2", "t", [1, 2, 3]) != base
    assert chunk_key("fp1", "u", [1, 2, 3]).split(":")[1] != base.split(":")[1]
    assert chunk_key("fp1", "t", [1, 2, 4]) != base
    assert chunk_key("fp1", "t", [3, 2, 1]) != base
    assert chunk_key("fp1", "t", (1, 2, 3)) == base


@pytest.mark.parametrize("namespace", ["", "a b", "x" * 65, "ns:1", "../up", ".", ".."])
def test_bad_namespaces(namespace: str) -> None:
    with pytest.raises(ConfigError):
        chunk_key("fp", namespace, [1])


def test_check_key_and_namespace() -> None:
    assert check_key("t1:abc") == "t1:abc"
    assert key_namespace("shared:ff00") == "shared"
    for bad in ("abc", "t1:", ":abc", "t1:a/b", "t1:" + "a" * 129, "..:abc", "t1:..", ".:."):
        with pytest.raises(ConfigError):
            check_key(bad)


def test_fingerprint_ignores_paths_but_not_architecture() -> None:
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "_name_or_path": "/a"}
    a = ModelFingerprint.from_parts(cfg, "float16", {"a": 0, "b": 1})
    assert a == ModelFingerprint.from_parts({**cfg, "_name_or_path": "/b"}, "float16", {"b": 1, "a": 0})
    assert a != ModelFingerprint.from_parts({**cfg, "hidden_size": 65}, "float16", {"a": 0, "b": 1})
    assert a != ModelFingerprint.from_parts(cfg, "bfloat16", {"a": 0, "b": 1})
    assert a != ModelFingerprint.from_parts(cfg, "float16", {"a": 1, "b": 0})


def test_chunk_shape_checks() -> None:
    meta = ChunkMeta("fp", (1, 2, 3))
    with pytest.raises(ConfigError):
        ChunkKV(torch.zeros(2, 3, 1, 3, 4), meta)
    with pytest.raises(ConfigError):
        ChunkKV(torch.zeros(2, 2, 1, 4, 4), meta)
    c = ChunkKV(torch.zeros(2, 2, 1, 3, 4, dtype=torch.float16), meta)
    assert c.num_layers == 2 and c.num_tokens == 3 and c.nbytes == 2 * 2 * 3 * 4 * 2
    assert c.keys.shape == (2, 1, 3, 4)


def test_meta_round_trips_through_dict() -> None:
    meta = ChunkMeta("fp", (5, 6), position=3, dtype="bfloat16", rope=False, extra={"source": "doc1"})
    assert ChunkMeta.from_dict(meta.to_dict()) == meta
