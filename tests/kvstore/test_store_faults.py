"""Faults the store must absorb without a caller exception, a hang past its timeouts, or a torn entry:
a full disk (a size-capped writer: ``RLIMIT_FSIZE`` in a child process) and a slow Redis (``DEBUG SLEEP``).
Killed and restarted Redis, a paused Redis and SIGKILLed disk writers are in test_redis_faults.py and
test_disk_faults.py."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kv_samples import make_chunk
from redis_servers import RedisServer, require_binaries, resp_command

from ragkv.kvstore import RedisConfig
from ragkv.kvstore.tiers import make_tier

FULL_DISK_SCRIPT = r"""
import json, os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the cap fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (48 << 10, 48 << 10))
sys.path.insert(0, sys.argv[2])
from kv_samples import make_chunk
from ragkv.kvstore import TieredStore
out = {}
with TieredStore(f"host,disk:{sys.argv[1]}") as store:
    small, big = make_chunk(1, tokens=16), make_chunk(2, tokens=1024)
    store.put("t1:small", small)
    store.put("t1:big", big)  # 64 KB of KV: over the cap, the disk write fails
    disk = store.tiers[1]
    out["small_on_disk"] = disk.get("t1:small") is not None and disk.get("t1:small").equals(small)
    out["big_on_disk"] = disk.get("t1:big") is not None
    out["big_served"] = store.get("t1:big") is not None and store.get("t1:big").equals(big)
    out["disk_errors"] = disk.stats.snapshot()["errors"]
    out["files"] = sorted(p.name for p in __import__("pathlib").Path(sys.argv[1]).rglob("*") if p.is_file())
print(json.dumps(out))
"""


def test_a_full_disk_drops_writes_and_tears_nothing(tmp_path: Path) -> None:
    support = Path(__file__).resolve().parents[1] / "support"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path / "kv"), str(support)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["small_on_disk"] and not out["big_on_disk"]  # the failed write left nothing behind
    assert out["big_served"]  # still served from host memory
    assert out["disk_errors"] >= 1
    assert all(name.endswith(".kv") for name in out["files"]) and len(out["files"]) == 1  # no temp file left


@pytest.mark.redis
def test_a_slow_redis_costs_at_most_its_timeout(tmp_path: Path) -> None:
    require_binaries("redis-server")
    server = RedisServer(tmp_path / "slow", extra_args=["--enable-debug-command", "yes"]).start()
    tier = make_tier(RedisConfig(url=server.url, socket_timeout_s=0.3, breaker_failures=2,
                                 breaker_backoff_base_s=0.2, breaker_backoff_cap_s=0.2))
    try:
        chunk = make_chunk(3)
        tier.put("t1:slow", chunk)
        sleeper = threading.Thread(target=lambda: resp_command(server.port, "DEBUG", "SLEEP", "2", timeout_s=10))
        sleeper.start()
        time.sleep(0.1)
        timings = []
        for _ in range(6):
            start = time.perf_counter()
            assert tier.get("t1:slow") is None  # the server is asleep: a miss, not an exception
            tier.put("t1:other", chunk)  # a write is dropped the same way
            timings.append(time.perf_counter() - start)
        assert max(timings) < 2 * 0.3 + 0.3  # never the full 2 s sleep
        sleeper.join()
        time.sleep(0.3)  # past the breaker's back-off
        got = tier.get("t1:slow")
        assert got is not None and got.equals(chunk)  # nothing was torn by the interrupted calls
    finally:
        tier.close()
        server.stop()
