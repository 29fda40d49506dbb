"""The ``ragkv`` command line. Subcommands: ``demo`` (a store round trip), ``stats`` (what a store holds).

The service, warm, ask and bench subcommands arrive with the integrations issue; until then ``demo`` is the
main job the README's run command starts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import torch

from ragkv.kvstore import ChunkKV, ChunkMeta, RagKVError, TieredStore, chunk_key


def _open(spec: str | None) -> TieredStore:
    return TieredStore(spec)


def cmd_demo(args: argparse.Namespace) -> int:
    """Write a few chunk-shaped tensors, read them back through every tier, print what happened."""
    with _open(args.store) as store:
        print(f"store: {store}")
        for name, tier in zip(store.names, store.tiers):
            path = getattr(tier.config, "path", "") or getattr(tier.config, "url", "")
            cap = tier.config.capacity_bytes
            print(f"  {name:<8} codec={tier.codec.name:<8} capacity={cap if cap is not None else 'unbounded'} {path}")
        g = torch.Generator().manual_seed(0)
        keys = []
        start = time.perf_counter()
        for i in range(args.chunks):
            ids = tuple(range(i * 1000, i * 1000 + args.tokens))
            # kv: [layers, 2, kv_heads, tokens, head_dim], the shape of a small model's chunk cache
            kv = torch.randn(4, 2, 2, args.tokens, 64, generator=g).to(torch.float16)
            chunk = ChunkKV(kv, ChunkMeta(fingerprint="demo-model", token_ids=ids, position=1))
            key = chunk_key("demo-model", "demo", ids)
            store.put(key, chunk)
            keys.append((key, chunk))
        store.flush()
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        ok = all(got is not None and torch.equal(got.kv, c.kv)
                 for got, (_, c) in zip(store.get_many([k for k, _ in keys]), keys))
        get_s = time.perf_counter() - start
        mb = sum(c.nbytes for _, c in keys) / 1e6
        print(f"put {len(keys)} chunks ({mb:.1f} MB) in {put_s * 1e3:.1f} ms; "
              f"read back {'exactly' if ok else 'WITH ERRORS'} in {get_s * 1e3:.1f} ms")
        for key, _ in keys[:3]:
            print(f"  {key} in {store.locate(key)}")
        if not args.keep:
            store.delete_many([k for k, _ in keys])
        return 0 if ok else 1


def cmd_stats(args: argparse.Namespace) -> int:
    with _open(args.store) as store:
        stats = store.stats()
        for name, tier in zip(store.names, store.tiers):
            stats["tiers"][name]["entries"] = sum(1 for _ in tier.keys())
        print(json.dumps(stats, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragkv", description="KV-cache store and middleware for RAG")
    parser.add_argument("--store", default=None,
                        help="store spec, e.g. 'host:4GB,disk:/var/cache/ragkv:50GB,redis://127.0.0.1:6379' "
                             "or a .json/.toml config file (default: $RAGKV_STORE, else host + disk under the "
                             "user cache dir)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write and read back a few chunks through the store")
    demo.add_argument("--chunks", type=int, default=8)
    demo.add_argument("--tokens", type=int, default=256)
    demo.add_argument("--keep", action="store_true", help="leave the demo chunks in the store")
    demo.set_defaults(func=cmd_demo)
    stats = sub.add_parser("stats", help="print the store's tiers, entries and statistics as JSON")
    stats.set_defaults(func=cmd_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RagKVError as exc:
        print(f"ragkv: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
