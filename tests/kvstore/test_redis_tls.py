"""The redis tier over TLS (``rediss://``) with an ACL user, against a real ``redis-server --tls-port``.

Certificates are made here with ``openssl``: a CA, a server certificate for 127.0.0.1, a client certificate.
"""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kv_samples import make_chunk
from redis_servers import RedisServer, free_port, require_binaries

from ragkv.kvstore import ConfigError, RedisConfig, TieredStore
from ragkv.kvstore.tiers import make_tier

pytestmark = pytest.mark.redis
USER, PASSWORD = "ragkv-app", "s3cret-Passw0rd"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> dict[str, Path]:
    """CA, server (SAN 127.0.0.1 and localhost) and client key pairs, signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ragkv-test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=ragkv-{name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.ext", "-out", f"{name}.crt", cwd=directory)
    return {n: directory / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, dict[str, Path]]]:
    require_binaries("redis-server")
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificates (Debian: apt install openssl)")
    directory = tmp_path_factory.mktemp("redis-tls")
    certs = make_certificates(directory)
    tls_port = free_port()
    server = RedisServer(directory / "data", extra_args=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(certs["server.crt"]),
        "--tls-key-file", str(certs["server.key"]), "--tls-ca-cert-file", str(certs["ca.crt"]),
        "--tls-auth-clients", "optional",
        "--user", f"{USER}", "on", f">{PASSWORD}", "~ragkv:*", "+@all",
    ]).start()
    try:
        yield server, tls_port, certs
    finally:
        server.stop()


def test_tls_and_acl_user_round_trip(tls_server: tuple[RedisServer, int, dict[str, Path]]) -> None:
    _, port, certs = tls_server
    url = f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0"
    with TieredStore([make_tier(RedisConfig(url=url, tls_ca_file=str(certs["ca.crt"])))]) as store:
        chunk = make_chunk(1)
        store.put("t1:tls", chunk)
        got = store.get("t1:tls")
        assert got is not None and got.equals(chunk)
        assert store.tiers[0].describe()["url"] == f"rediss://{USER}:***@127.0.0.1:{port}/0"
    with_client_cert = RedisConfig(url=url, tls_ca_file=str(certs["ca.crt"]), tls_cert_file=str(certs["client.crt"]),
                                   tls_key_file=str(certs["client.key"]))
    with TieredStore([make_tier(with_client_cert)]) as store:
        assert store.get("t1:tls") is not None


@pytest.mark.parametrize("case", ["wrong password", "plain text to the TLS port", "unknown CA",
                                  "prefix outside the ACL"])
def test_tls_and_acl_failures_are_misses(tls_server: tuple[RedisServer, int, dict[str, Path]], case: str) -> None:
    _, port, certs = tls_server
    ca = str(certs["ca.crt"])
    config = {
        "wrong password": RedisConfig(url=f"rediss://{USER}:nope@127.0.0.1:{port}/0", tls_ca_file=ca),
        "plain text to the TLS port": RedisConfig(url=f"redis://{USER}:{PASSWORD}@127.0.0.1:{port}/0",
                                                  socket_timeout_s=0.5),
        "unknown CA": RedisConfig(url=f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0"),
        "prefix outside the ACL": RedisConfig(url=f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0", tls_ca_file=ca,
                                              key_prefix="other:"),
    }[case]
    tier = make_tier(config)
    try:
        tier.put("t1:x", make_chunk(2))  # refused or unreachable: dropped, never raised
        assert tier.get("t1:x") is None
        assert tier.stats.snapshot()["errors"] >= 1
    finally:
        tier.close()


def test_tls_files_need_a_tls_url(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    with pytest.raises(ConfigError, match="rediss://"):
        RedisConfig(url="redis://127.0.0.1:6379/0", tls_ca_file=str(ca))
    with pytest.raises(ConfigError, match="readable file"):
        RedisConfig(url="rediss://127.0.0.1:6379/0", tls_ca_file=str(tmp_path / "missing.crt"))
    with pytest.raises(ConfigError, match="go together"):
        RedisConfig(url="rediss://127.0.0.1:6379/0", tls_cert_file=str(ca))
