"""Other processes for the disk tier's fault tests: writers to kill mid-write, and mixed readers/writers.

Run as a script (``python disk_writer_proc.py <mode> ...``; POSIX only, it forks); the tests import
``check_chunk`` and ``store_key`` from here so both sides agree on what a valid value is. Every value a writer stores is a
deterministic function of (key index, writer id, sequence number), recorded in ``meta.extra``, so a reader
can tell whether a value it got is exactly one that some writer wrote for that key.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import sys

import torch

from ragkv.kvstore import ChunkKV, ChunkMeta
from ragkv.kvstore.tiers.disk import DiskConfig, DiskTier


def store_key(index: int) -> str:
    return f"proc:{index:04d}"


def make_chunk(index: int, writer: int, seq: int, layers: int, tokens: int) -> ChunkKV:
    """The one value writer ``writer`` stores for key ``index`` at step ``seq``."""
    seed = int.from_bytes(hashlib.blake2b(f"{index}/{writer}/{seq}".encode(), digest_size=8).digest(), "little")
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, 2, tokens, 64, generator=gen).to(torch.float16)  # kv: [L, 2, H, T, D]
    meta = ChunkMeta("disk-proc-test", tuple(range(tokens)), extra={
        "index": index, "writer": writer, "seq": seq, "layers": layers})
    return ChunkKV(kv, meta)


def check_chunk(key: str, chunk: ChunkKV) -> bool:
    """True if ``chunk`` is exactly a value that some writer wrote for ``key``."""
    extra = chunk.meta.extra
    try:
        index, writer, seq, layers = (int(extra[name]) for name in ("index", "writer", "seq", "layers"))
    except (KeyError, TypeError, ValueError):
        return False
    if store_key(index) != key:
        return False
    return chunk.equals(make_chunk(index, writer, seq, layers, chunk.num_tokens))


def run_writer(args: argparse.Namespace) -> None:
    """For each line on stdin, fork a child that writes large entries in a loop until the test kills it.

    Forking from this one process spares each child a torch import (seconds on a loaded machine); nothing
    here has started a thread before the fork. Protocol: the test writes a line, this prints the child's
    pid once the child has stored its first entry, the test SIGKILLs it, this prints ``exit <status>``."""
    chunks = [make_chunk(i, args.writer, 0, args.layers, args.tokens) for i in range(args.keys)]
    for child in itertools.count():
        if not sys.stdin.readline():
            return
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: never returns
            os.close(ready_r)
            try:
                tier = DiskTier(DiskConfig(path=args.path, fsync=True))
                for seq in itertools.count():
                    index = (seq + child) % args.keys
                    tier.put(store_key(index), chunks[index])
                    if seq == 0:
                        os.write(ready_w, b"1")
            finally:
                os._exit(1)
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


def _mixed_worker(args: argparse.Namespace, writer: int) -> dict[str, int]:
    """Random gets, puts and deletes on a few shared keys; count what the gets saw."""
    rng = random.Random(args.seed * 1000 + writer)
    # No fsync: it only matters for power loss, and what two processes see of each other is the page cache.
    tier = DiskTier(DiskConfig(path=args.path, fsync=False, capacity_bytes=args.capacity or None,
                               rescan_interval_s=0.0))
    report = {"writer": writer, "gets": 0, "hits": 0, "foreign_hits": 0, "bad": 0, "puts": 0, "deletes": 0}
    for seq in range(args.ops):
        index = rng.randrange(args.keys)
        key = store_key(index)
        op = rng.random()
        if op < 0.5:
            chunk = tier.get(key)
            report["gets"] += 1
            if chunk is not None:
                report["hits"] += 1
                report["foreign_hits"] += chunk.meta.extra.get("writer") != writer
                if not check_chunk(key, chunk):
                    report["bad"] += 1
        elif op < 0.9:
            tokens = rng.choice((8, 16, 32))
            tier.put(key, make_chunk(index, writer, seq, args.layers, tokens))
            report["puts"] += 1
        else:
            tier.delete(key)
            report["deletes"] += 1
    stats = tier.stats.snapshot()
    report.update(corrupt=stats["corrupt"], errors=stats["errors"], evictions=stats["evictions"])
    tier.close()
    return report


def run_mixed(args: argparse.Namespace) -> None:
    """Fork ``--procs`` processes that run ``_mixed_worker`` at the same time; each prints one JSON line."""
    pids = []
    for writer in range(args.procs):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                line = json.dumps(_mixed_worker(args, writer)) + "\n"
                os.write(sys.stdout.fileno(), line.encode())  # one short write: lines never interleave
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    failed = [pid for pid in pids if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0]
    sys.exit(1 if failed else 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["writer", "mixed"])
    parser.add_argument("path")
    parser.add_argument("--writer", type=int, default=0)
    parser.add_argument("--keys", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity", type=int, default=0)
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    (run_writer if args.mode == "writer" else run_mixed)(args)


if __name__ == "__main__":
    main()
