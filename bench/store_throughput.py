"""Store throughput: get/put per tier for 1, 8 and 32 MB values, each beside its raw baseline in the same run.

Baselines: memcpy into a preallocated buffer (host); a raw cold read of a file of the same size with its pages
dropped from the page cache (disk); a raw redis-py GET/SET with the same client set-up (Redis).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from harness import RedisProcess, Report, median, parse_args, time_call

from ragkv.codecs import get_codec
from ragkv.kvstore import ChunkKV, ChunkMeta, DiskConfig, HostConfig, RedisConfig, chunk_key, encode_entry
from ragkv.kvstore.tiers import make_tier
from ragkv.kvstore.tiers.redis_client import close_client, import_redis, make_client

MB = 1 << 20


def make_value(size_mb: int, seed: int) -> ChunkKV:
    tokens = size_mb * 64  # [8, 2, 8, T, 64] fp16 = 16 KiB per token
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(8, 2, 8, tokens, 64, generator=g).to(torch.float16)  # kv: [L, 2, H, T, D]
    return ChunkKV(kv, ChunkMeta("bench-model", tuple(range(seed, seed + tokens)), position=1))


def drop_page_cache(path: str) -> bool:
    """Evict one file's pages (posix_fadvise DONTNEED after fsync). True if the platform allows it."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds


def bench_host(size_mb: int, reps: int) -> dict[str, float]:
    tier = make_tier(HostConfig())
    value = make_value(size_mb, 1)
    key = chunk_key("bench-model", "bench", value.meta.token_ids)
    dst = torch.empty_like(value.kv)
    dst.copy_(value.kv)  # fault the destination in once: the baseline copies into preallocated memory
    memcpy = median(time_call(lambda: dst.copy_(value.kv), repeat=reps))
    put = median(time_call(lambda: tier.put(key, value), repeat=reps))
    get_ref = median(time_call(lambda: tier.get(key), repeat=reps))
    get_copy = median(time_call(lambda: dst.copy_(tier.get(key).kv), repeat=reps))
    tier.close()
    n = value.nbytes
    return {"memcpy": mbps(n, memcpy), "put": mbps(n, put), "get_zero_copy": mbps(n, get_ref),
            "get_copy_into": mbps(n, get_copy)}


def bench_disk(size_mb: int, reps: int, root: Path) -> tuple[dict[str, float], bool]:
    tier = make_tier(DiskConfig(path=str(root / f"disk{size_mb}"), fsync=True))
    values = [make_value(size_mb, 100 + i) for i in range(reps)]
    keys = [chunk_key("bench-model", "bench", v.meta.token_ids) for v in values]
    blobs = [encode_entry(v, tier.codec) for v in values]
    raw_paths = [root / f"raw{size_mb}_{i}.bin" for i in range(reps)]
    n = values[0].nbytes

    def raw_write(i: int) -> None:
        with open(raw_paths[i], "wb") as f:
            f.write(blobs[i])
            f.flush()
            os.fsync(f.fileno())

    write_s = [time_call(lambda i=i: raw_write(i), repeat=1, warmup=0)[0] for i in range(reps)]
    put_s = [time_call(lambda i=i: tier.put(keys[i], values[i]), repeat=1, warmup=0)[0] for i in range(reps)]
    buf = bytearray(len(blobs[0]))

    def raw_read(i: int) -> None:
        with open(raw_paths[i], "rb", buffering=0) as f:
            f.readinto(buf)

    cold_ok = all(drop_page_cache(str(p)) for p in raw_paths)
    raw_cold = [time_call(lambda i=i: raw_read(i), repeat=1, warmup=0)[0] for i in range(reps)]
    entry_paths = [str(tier.path_for(k)) for k in keys] if hasattr(tier, "path_for") else []
    cold_ok = cold_ok and bool(entry_paths) and all(drop_page_cache(p) for p in entry_paths)
    get_cold = []
    for k, v in zip(keys, values):
        t = time_call(lambda k=k: tier.get(k), repeat=1, warmup=0)[0]
        get_cold.append(t)
    got = tier.get(keys[0])
    assert got is not None and torch.equal(got.kv, values[0].kv)
    raw_warm = median(time_call(lambda: raw_read(0), repeat=reps))
    get_warm = median(time_call(lambda: tier.get(keys[0]), repeat=reps))
    tier.close()
    return ({"raw_write_fsync": mbps(n, median(write_s)), "put": mbps(n, median(put_s)),
             "raw_cold_read": mbps(n, median(raw_cold)), "get_cold": mbps(n, median(get_cold)),
             "raw_warm_read": mbps(n, raw_warm), "get_warm": mbps(n, get_warm)}, cold_ok)


def bench_redis(size_mb: int, reps: int, url: str) -> dict[str, float]:
    tier = make_tier(RedisConfig(url=url))
    redis = import_redis()
    cfg = tier.config
    raw = make_client(redis, cfg)
    value = make_value(size_mb, 7)
    key = chunk_key("bench-model", "bench", value.meta.token_ids)
    blob = encode_entry(value, get_codec("raw"))
    n = value.nbytes
    raw_set = median(time_call(lambda: raw.set("rawbench", blob), repeat=reps))
    raw_get = median(time_call(lambda: raw.get("rawbench"), repeat=reps))
    put = median(time_call(lambda: tier.put(key, value), repeat=reps))
    get = median(time_call(lambda: tier.get(key), repeat=reps))
    got = tier.get(key)
    assert got is not None and torch.equal(got.kv, value.kv)
    raw.delete("rawbench")
    tier.delete(key)
    close_client(raw, cluster=False)
    tier.close()
    return {"raw_set": mbps(n, raw_set), "put": mbps(n, put), "raw_get": mbps(n, raw_get), "get": mbps(n, get)}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    sizes = [1] if args.quick else [1, 8, 32]
    reps = 2 if args.quick else 7
    report = Report("store_throughput", quick=args.quick, out=args.out)
    report.setup = {"value": "fp16 KV [8, 2, 8, T, 64], raw codec", "sizes_mb": sizes, "repeats": reps,
                    "statistic": "median MB/s (MiB of tensor data per second)"}
    rows_host, rows_disk, rows_redis = [], [], []
    cold_everywhere = True
    with tempfile.TemporaryDirectory(prefix="ragkv-bench-") as tmp, RedisProcess(Path(tmp) / "redis") as server:
        for size in sizes:
            h = bench_host(size, reps)
            rows_host.append([size, h["memcpy"], h["get_zero_copy"], h["get_copy_into"], h["put"],
                              h["get_zero_copy"] / h["memcpy"]])
            d, cold = bench_disk(size, reps, Path(tmp))
            cold_everywhere = cold_everywhere and cold
            rows_disk.append([size, d["raw_cold_read"], d["get_cold"], d["get_cold"] / d["raw_cold_read"],
                              d["raw_warm_read"], d["get_warm"], d["raw_write_fsync"], d["put"]])
            r = bench_redis(size, reps, server.url)
            rows_redis.append([size, r["raw_get"], r["get"], r["get"] / r["raw_get"], r["raw_set"], r["put"]])
            if size == 8 or (args.quick and size == sizes[-1]):
                report.figure("host_get_ratio", h["get_zero_copy"] / h["memcpy"])
                report.figure("disk_cold_get_ratio", d["get_cold"] / d["raw_cold_read"])
                report.figure("redis_get_ratio", r["get"] / r["raw_get"])
    report.table("host tier (MB/s)", ["MB", "memcpy", "get (zero-copy)", "get+copy", "put", "get/memcpy"],
                 rows_host)
    report.table("disk tier (MB/s)", ["MB", "raw cold read", "get cold", "ratio", "raw warm read", "get warm",
                                      "raw write+fsync", "put"], rows_disk)
    report.table("redis tier (MB/s)", ["MB", "raw GET", "get", "ratio", "raw SET", "put"], rows_redis)
    report.setup["page_cache_dropped"] = cold_everywhere
    if not cold_everywhere:
        report.note("the page cache could not be dropped for every file: 'cold' disk reads may be warm")
    report.note("host_get_ratio: host-tier get (the stored tensor, ready for use: zero-copy) over a memcpy of the "
                "same bytes into a preallocated buffer, same sizes, same process; a get that copied into fresh "
                "memory or re-decoded would fall below it")
    report.write()


if __name__ == "__main__":
    main()
