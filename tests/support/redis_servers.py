"""Real Redis servers for tests (a pytest plugin): one server, a 3-master cluster, and RedisTier factories.

Mocks hide exactly the failures users hit (a refused connect, a hung server, a cluster redirect), so the
tests start Debian's ``redis-server`` on free loopback ports, in temporary directories, with persistence
off, and stop every process by pid. Nothing leaks: fixtures stop what they start, an ``atexit`` hook kills
whatever is left, and on Linux each server also dies with the test process (``PR_SET_PDEATHSIG``).

Fixtures:
    redis_server        one server for the whole session, FLUSHALLed (and revived if a test killed it)
    redis_url           ``redis://127.0.0.1:PORT/0`` of ``redis_server``
    fresh_redis_server  a server of the test's own, for tests that kill, pause or restart it
    redis_cluster       a session-wide cluster of three masters, ``.url`` = ``redis+cluster://...``;
                        emptied (and revived) after every test that used it
    redis_cluster_url   ``redis_cluster.url``, emptied first
    make_redis_tier     ``make_redis_tier(url, **RedisConfig overrides) -> RedisTier``; deletes its keys
                        and closes it at teardown

Without ``redis-server`` (or ``redis-cli``, for the cluster) on PATH these fixtures fail, unless
``RAGKV_ALLOW_SKIP_REDIS=1`` is set, in which case they skip: CI must never silently skip Redis.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
REDIS_SERVER = "redis-server"
REDIS_CLI = "redis-cli"
START_TIMEOUT_S = 10.0
CLUSTER_TIMEOUT_S = 20.0
ALLOW_SKIP_ENV = "RAGKV_ALLOW_SKIP_REDIS"

# pid -> process for every server still running: the atexit safety net if a fixture never tears down.
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


@atexit.register
def _kill_leftovers() -> None:
    for pid, proc in list(_LIVE.items()):
        if proc.poll() is None:
            os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=5)
        _LIVE.pop(pid, None)


def _die_with_parent() -> None:
    """Runs in the child before exec: a SIGKILLed test run must not leave servers behind."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def require_binaries(*names: str) -> None:
    """Fail (or, with RAGKV_ALLOW_SKIP_REDIS=1, skip) when a Redis binary is missing from PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    message = (f"{', '.join(missing)} not found on PATH; install Redis (Debian: apt-get install "
               f"redis-server) or set {ALLOW_SKIP_ENV}=1 to skip the Redis tests")
    if os.environ.get(ALLOW_SKIP_ENV) == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def free_port() -> int:
    """A port nothing listens on right now (bind to 0, read it, close). Racy by nature: callers retry."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# -- a tiny RESP client, so the fixtures need no redis-py ------------------------------------------------
def _read_reply(stream: Any) -> Any:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed mid-reply")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RuntimeError(f"redis error: {body.decode()}")
    if kind == b":":
        return int(body)
    if kind == b"$":
        n = int(body)
        return None if n < 0 else stream.read(n + 2)[:-2]
    if kind == b"*":
        n = int(body)
        return None if n < 0 else [_read_reply(stream) for _ in range(n)]
    raise RuntimeError(f"unexpected RESP reply {line!r}")


def resp_command(port: int, *args: str | bytes, timeout_s: float = 2.0) -> Any:
    """Send one command to 127.0.0.1:port and return its reply (str, int, bytes, list or None)."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        with sock.makefile("rb") as stream:
            return _read_reply(stream)


def _redis_major_version() -> int:
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True, check=True).stdout
    version = out.split("v=", 1)[1].split()[0]
    return int(version.split(".")[0])


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, persistence off, in its own directory.

    ``start()`` picks a free port (retrying on a collision); ``restart()`` comes back on the same port, so
    clients see an outage and a recovery, not a move.
    """

    def __init__(self, workdir: Path, cluster: bool = False, extra_args: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self.extra_args = list(extra_args)
        self.host = HOST
        self.port = 0
        self.bus_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _argv(self, port: int, bus_port: int) -> list[str]:
        argv = [REDIS_SERVER, "--port", str(port), "--bind", HOST, "--dir", str(self.workdir),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", ""]
        if self.cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                     "--cluster-node-timeout", "2000"]
            if bus_port:
                argv += ["--cluster-port", str(bus_port)]
        return argv + self.extra_args

    def _pick_ports(self) -> tuple[int, int]:
        port = free_port()
        if not self.cluster:
            return port, 0
        if _redis_major_version() >= 7:
            return port, free_port()  # --cluster-port: the bus port need not be port + 10000
        while port + 10000 > 65535:  # older servers put the bus on port + 10000
            port = free_port()
        return port, 0

    def start(self) -> RedisServer:
        if self.running:
            return self
        same_port = self.port != 0
        last_error = ""
        for _attempt in range(8):
            port, bus_port = (self.port, self.bus_port) if same_port else self._pick_ports()
            log_path = self.workdir / f"redis-{port}.log"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    self._argv(port, bus_port), stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, cwd=self.workdir,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - fixtures run in the main thread
                )
            _LIVE[proc.pid] = proc
            if self._wait_ready(proc, port):
                self._proc, self.port, self.bus_port = proc, port, bus_port
                return self
            self._reap(proc)
            last_error = log_path.read_text(errors="replace")[-2000:]
            time.sleep(0.1 if same_port else 0.0)  # a restart waits for the old socket to go
        raise RuntimeError(f"redis-server did not start; last log:\n{last_error}")

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[bytes], port: int) -> bool:
        """Ready = answers PING and is *our* process (not another one that won the port race)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                info = resp_command(port, "INFO", "server", timeout_s=0.5)
            except (OSError, ConnectionError, RuntimeError):
                time.sleep(0.02)
                continue
            return f"process_id:{proc.pid}\r\n".encode() in info
        return False

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _LIVE.pop(proc.pid, None)

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, clients see resets and refused connects."""
        if self._proc is not None:
            self._reap(self._proc)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung server)."""
        if self.running and self._proc is not None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running and self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def stop(self) -> None:
        """SIGTERM by pid (after SIGCONT, in case it is paused), SIGKILL if it lingers."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        _LIVE.pop(proc.pid, None)

    def command(self, *args: str | bytes) -> Any:
        return resp_command(self.port, *args)

    def flushall(self) -> None:
        self.command("FLUSHALL")


class RedisClusterServers:
    """Three cluster-enabled masters joined with ``redis-cli --cluster create``, no replicas."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [RedisServer(Path(workdir) / f"node{i}", cluster=True) for i in range(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterServers:
        try:
            for node in self.nodes:
                node.start()
            create = [REDIS_CLI, "--cluster", "create", *(f"{n.host}:{n.port}" for n in self.nodes),
                      "--cluster-replicas", "0", "--cluster-yes"]
            done = subprocess.run(create, capture_output=True, text=True, timeout=CLUSTER_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self) -> None:
        """Until every node reports cluster_state:ok with all 16384 slots and every master known."""
        deadline = time.monotonic() + CLUSTER_TIMEOUT_S
        want = [b"cluster_state:ok", b"cluster_slots_ok:16384", b"cluster_known_nodes:%d" % len(self.nodes)]
        info = b""
        while time.monotonic() < deadline:
            infos = [node.command("CLUSTER", "INFO") for node in self.nodes]
            if all(all(w in node_info for w in want) for node_info in infos):
                return
            info = infos[0]
            time.sleep(0.05)
        raise RuntimeError(f"cluster never reached cluster_state:ok; last CLUSTER INFO:\n{info.decode()}")

    def flushall(self) -> None:
        for node in self.nodes:
            node.flushall()

    def revive(self) -> None:
        """Restart any master a test killed or paused (same port and nodes file: it rejoins)."""
        dead = [node for node in self.nodes if not node.running]
        for node in self.nodes:
            node.resume()
        for node in dead:
            node.start()
        if dead:
            self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def raw_redis_client(url: str) -> Any:
    """A plain redis-py client (no ragkv in between) for ``redis://`` or ``redis+cluster://`` urls:
    tests use it to look at, or tamper with, what the tier stored. It does not retry, so a dead server
    fails fast instead of backing off for seconds."""
    import redis
    import redis.backoff
    import redis.cluster
    import redis.retry

    from ragkv.kvstore.tiers.redis_client import parse_redis_url

    address = parse_redis_url(url)
    if address.cluster:
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in address.nodes], socket_timeout=5.0,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 1))
    host, port = address.nodes[0]
    return redis.Redis(host=host, port=port, db=address.db, socket_timeout=5.0,
                       retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))


def delete_prefixed(url: str, prefix: str) -> int:
    """Delete every key starting with ``prefix`` (every master of a cluster); 0 if the server is down."""
    import redis.cluster
    import redis.exceptions

    try:
        client = raw_redis_client(url)
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException):
        return 0
    try:
        if isinstance(client, redis.cluster.RedisCluster):
            keys = list(client.scan_iter(match=prefix + "*", count=1000,
                                         target_nodes=redis.cluster.RedisCluster.PRIMARIES))
        else:
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)  # one key per command: keys of a cluster live in different slots
        pipe.execute()
        return len(keys)
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException):
        return 0  # a test that killed its server leaves nothing to clean
    finally:
        client.close()


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require_binaries(REDIS_SERVER)
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_session_server: RedisServer) -> RedisServer:
    """The session's server, empty. Revived first if an earlier test killed or paused it."""
    server = redis_session_server
    if server.running:
        server.resume()
    else:
        server.start()
    server.flushall()
    return server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def fresh_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own: kill, pause and restart it freely."""
    require_binaries(REDIS_SERVER)
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


_SESSION_CLUSTER: list[RedisClusterServers] = []  # the one ``redis_cluster``, once started


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """Started once per session (about two seconds); emptied after every test that used it."""
    require_binaries(REDIS_SERVER, REDIS_CLI)
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    _SESSION_CLUSTER.append(cluster)
    yield cluster
    _SESSION_CLUSTER.clear()
    cluster.stop()


@pytest.fixture(autouse=True)
def _empty_redis_cluster_after_use(request: pytest.FixtureRequest) -> Iterator[None]:
    """Like ``redis_url``, a test that uses ``redis_cluster`` must not see the previous test's keys.

    Autouse and torn down last, so it runs after the test's own fixtures have closed their stores
    (a write-back store writes its queue on close).
    """
    yield
    if _SESSION_CLUSTER and "redis_cluster" in request.fixturenames:
        cluster = _SESSION_CLUSTER[0]
        cluster.revive()
        cluster.flushall()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServers) -> str:
    """The session cluster's url, after emptying every master (the cluster outlives each test)."""
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture
def make_redis_tier() -> Iterator[Callable[..., Any]]:
    """``make_redis_tier(url, **overrides)`` builds a RedisTier; at teardown its keys go and it closes."""
    from ragkv.kvstore.tiers.redis_tier import RedisConfig, RedisTier

    made: list[RedisTier] = []

    def build(url: str, **overrides: Any) -> RedisTier:
        tier = RedisTier(RedisConfig(url=url, **overrides))
        made.append(tier)
        return tier

    yield build
    for tier in made:
        tier.close()
        delete_prefixed(tier.config.url, tier.config.key_prefix)
