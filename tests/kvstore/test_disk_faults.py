"""The disk tier under faults: flipped bits, truncation, garbage, a writer killed mid-write, two processes.

Every fault must be detected (a miss, never a wrong tensor), and the damaged file deleted.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from disk_writer_proc import check_chunk, store_key  # tests/support, on pytest's pythonpath

from ragkv.kvstore import ChunkKV, ChunkMeta, encode_entry, read_header
from ragkv.kvstore.tiers.disk import TMP_SUFFIX, DiskConfig, DiskTier

HELPER = Path(__file__).resolve().parents[1] / "support" / "disk_writer_proc.py"


def make_chunk(seed: int, tokens: int = 24) -> ChunkKV:
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(3, 2, 2, tokens, 32, generator=gen).to(torch.bfloat16)  # kv: [L, 2, H, T, D]
    return ChunkKV(kv, ChunkMeta("fp-faults", tuple(range(tokens)), dtype="bfloat16"))


def open_tier(path: Path) -> DiskTier:
    return DiskTier(DiskConfig(path=str(path), fsync=False))


KEY = "faults:" + "ab" * 20


def test_random_bit_flips_are_all_detected(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    blob = encode_entry(make_chunk(1), tier.codec)
    path = Path(tier.path_for(KEY))
    rng = random.Random(1234)
    trials = 100
    for trial in range(trials):
        tier.put_blob(KEY, blob)
        data = bytearray(path.read_bytes())
        for bit in rng.sample(range(len(data) * 8), rng.randint(1, 8)):  # distinct bits: flips never cancel
            data[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(data))
        got = tier.get(KEY) if trial % 2 == 0 else tier.get_blob(KEY)
        assert got is None, f"trial {trial}: a corrupted entry was served"
        assert not path.exists(), f"trial {trial}: the corrupted file was not deleted"
    stats = tier.stats.snapshot()
    assert stats["corrupt"] == trials and stats["hits"] == 0 and stats["errors"] == 0
    assert tier.used_bytes() == 0 and list(tier.keys()) == []


def test_truncation_at_random_lengths_is_detected(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    blob = encode_entry(make_chunk(2), tier.codec)
    path = Path(tier.path_for(KEY))
    rng = random.Random(99)
    lengths = [0, 1, len(blob) - 1] + [rng.randrange(len(blob)) for _ in range(97)]
    for trial, length in enumerate(lengths):
        tier.put_blob(KEY, blob)
        os.truncate(path, length)
        got = tier.get(KEY) if trial % 2 == 0 else tier.get_blob(KEY)
        assert got is None and not path.exists(), f"truncation to {length} bytes went unnoticed"
    assert tier.stats.snapshot()["corrupt"] == len(lengths)


def test_garbage_and_appended_bytes_are_detected(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    blob = encode_entry(make_chunk(3), tier.codec)
    rng = random.Random(7)
    path = Path(tier.path_for(KEY))
    bad_files = [os.urandom(rng.randrange(1, 5000)) for _ in range(20)] + [blob + b"\x00", blob[:4] + blob]
    for bad in bad_files:
        tier.put_blob(KEY, blob)
        path.write_bytes(bad)
        assert tier.get(KEY) is None and not path.exists()
    assert tier.stats.snapshot()["corrupt"] == len(bad_files)


def test_corrupt_entry_found_at_startup_is_removed_on_read(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    tier.put(KEY, make_chunk(4))
    path = Path(tier.path_for(KEY))
    path.write_bytes(path.read_bytes()[:-3])
    reopened = open_tier(tmp_path)
    assert list(reopened.keys()) == [KEY]  # the scan does not read files: only get finds the damage
    assert reopened.get(KEY) is None and not path.exists()
    assert list(reopened.keys()) == [] and reopened.used_bytes() == 0


def test_writer_killed_mid_write_leaves_no_partial_entry(tmp_path: Path) -> None:
    """SIGKILL a process writing 8 MB entries with fsync at random moments, five times; reopen: every visible
    entry decodes to a value that was written, and the killed writers' temp files are not entries."""
    rng = random.Random(5)
    store = tmp_path / "store"
    helper = subprocess.Popen(
        [sys.executable, str(HELPER), "writer", str(store), "--keys", "3", "--layers", "16", "--tokens", "1024"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # 16 * 2 * 2 * 1024 * 64 * 2 B = 8 MiB
    assert helper.stdin is not None and helper.stdout is not None
    try:
        for _ in range(5):
            helper.stdin.write("fork\n")
            helper.stdin.flush()
            pid = int(helper.stdout.readline())  # the writer has stored its first entry and goes on writing
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(pid, signal.SIGKILL)
            assert helper.stdout.readline().strip() == f"exit {-signal.SIGKILL}"
        helper.stdin.close()
        assert helper.wait(timeout=60) == 0
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    tier = open_tier(store)
    keys = sorted(tier.keys())
    assert keys and set(keys) <= {store_key(i) for i in range(3)}
    for entry in store.rglob("*.kv"):
        read_header(entry.read_bytes())  # no partial file is visible under an entry name
    for k in keys:
        chunk = tier.get(k)
        assert chunk is not None and check_chunk(k, chunk)
    stats = tier.stats.snapshot()
    assert stats["corrupt"] == 0 and stats["hits"] == len(keys)
    leftovers = [p for p in store.rglob("*") if p.is_file() and not p.name.endswith(".kv")]
    assert all(p.name.endswith(TMP_SUFFIX) for p in leftovers)  # at most the killed writers' temp files


def test_two_processes_sharing_a_directory(tmp_path: Path) -> None:
    """Two processes get, put and delete the same few keys at once (with eviction running in both): no corrupt
    read, and every hit is exactly a value one of them wrote for that key."""
    store = tmp_path / "shared"
    capacity = 3 * len(encode_entry(ChunkKV(torch.zeros(4, 2, 2, 32, 64, dtype=torch.float16),
                                            ChunkMeta("x", tuple(range(32)))), open_tier(store).codec))
    run = subprocess.run(
        [sys.executable, str(HELPER), "mixed", str(store), "--procs", "2", "--keys", "8", "--ops", "300",
         "--capacity", str(capacity)],
        capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    reports = [json.loads(line) for line in run.stdout.splitlines()]
    assert sorted(r["writer"] for r in reports) == [0, 1]
    for report in reports:
        assert report["bad"] == 0 and report["corrupt"] == 0 and report["errors"] == 0, report
        assert report["gets"] > 100 and report["puts"] > 80
    assert sum(r["foreign_hits"] for r in reports) > 0  # they did read each other's writes
    assert sum(r["evictions"] for r in reports) > 0
    tier = open_tier(store)
    for k in list(tier.keys()):
        chunk = tier.get(k)
        assert chunk is None or check_chunk(k, chunk)
    assert tier.stats.snapshot()["corrupt"] == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_concurrent_threads_in_one_process(tmp_path: Path, seed: int) -> None:
    """Threads of one process share a tier: temp names are per thread, so writes never collide."""
    from concurrent.futures import ThreadPoolExecutor

    tier = DiskTier(DiskConfig(path=str(tmp_path), fsync=False,
                               capacity_bytes=4 * len(encode_entry(make_chunk(0), open_tier(tmp_path).codec))))
    chunks = [make_chunk(i) for i in range(6)]

    def work(worker: int) -> int:
        rng = random.Random(seed * 100 + worker)
        wrong = 0
        for _ in range(150):
            i = rng.randrange(6)
            if rng.random() < 0.5:
                tier.put(f"t:{i:02d}", chunks[i])
            else:
                got = tier.get(f"t:{i:02d}")
                wrong += got is not None and not got.equals(chunks[i])
        return wrong

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(work, range(4))) == 0
    stats = tier.stats.snapshot()
    assert stats["corrupt"] == 0 and stats["errors"] == 0
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(TMP_SUFFIX)]
