"""API keys mapped to tenants, and what each tenant may do with which namespace.

Isolation rule, enforced here and nowhere else: a tenant reads and writes its own namespace and reads the
shared one (``"shared"``); it writes to the shared namespace only with ``publish`` and deletes from it only
with ``admin``. Any other namespace is refused whatever key is sent, before the store is touched, so a
refusal says nothing about whether the chunk exists.

Keys file (JSON or TOML), keys in clear or as SHA-256 hex digests (so the file need not hold secrets)::

    {"tenants": [
      {"name": "acme", "keys": ["sk-acme-1"], "publish": true},
      {"name": "globex", "key_sha256": ["9f86d0..."], "namespace": "globex-prod", "admin": true}
    ]}

Without a keys file the service runs open, as one tenant ``default`` (namespace ``default``): meant for a
laptop, so ``ragkv serve`` refuses to listen beyond loopback that way unless told to.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragkv.kvstore import SHARED_NAMESPACE, ConfigError, check_key, key_namespace
from ragkv.kvstore.chunk import check_namespace

OPEN_TENANT = "default"
MAX_KEY_LENGTH = 512


@dataclass(frozen=True)
class Tenant:
    name: str
    namespace: str
    publish: bool = True  # may write chunks to the shared namespace
    admin: bool = False  # may delete chunks from the shared namespace

    def readable(self) -> frozenset[str]:
        return frozenset({self.namespace, SHARED_NAMESPACE})

    def can_read(self, key: str) -> bool:
        return key_namespace(key) in self.readable()

    def can_write(self, key: str) -> bool:
        ns = key_namespace(key)
        return ns == self.namespace or (ns == SHARED_NAMESPACE and self.publish)

    def can_delete(self, key: str) -> bool:
        ns = key_namespace(key)
        return ns == self.namespace or (ns == SHARED_NAMESPACE and self.admin)

    def write_namespace(self, shared: bool) -> str:
        """Where this tenant's warm/generate requests store chunks (``shared`` needs ``publish``)."""
        if not shared:
            return self.namespace
        if not self.publish:
            raise PermissionError(f"tenant {self.name!r} may not publish to the shared namespace")
        return SHARED_NAMESPACE


def _digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


class TenantRegistry:
    """Looks API keys up by their SHA-256 digest (compared in constant time)."""

    def __init__(self, tenants_by_digest: Mapping[str, Tenant] | None = None) -> None:
        self._by_digest = dict(tenants_by_digest or {})
        self.open = tenants_by_digest is None
        self._open_tenant = Tenant(OPEN_TENANT, OPEN_TENANT, publish=True, admin=True)

    @classmethod
    def open_access(cls) -> TenantRegistry:
        return cls(None)

    @classmethod
    def from_file(cls, path: str | Path) -> TenantRegistry:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the API keys file {p}: {exc}") from exc
        try:
            if p.suffix.lower() == ".toml":
                import tomllib  # Python 3.11+; JSON works everywhere

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError both derive from it
            raise ConfigError(f"the API keys file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: "
                              f"{exc}") from exc
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Any) -> TenantRegistry:
        if not isinstance(data, Mapping) or not isinstance(data.get("tenants"), list) or not data["tenants"]:
            raise ConfigError('an API keys file holds {"tenants": [{"name": ..., "keys": [...]}, ...]}')
        by_digest: dict[str, Tenant] = {}
        namespaces: dict[str, str] = {}
        for entry in data["tenants"]:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
                raise ConfigError(f"every tenant needs a name, got {entry!r}")
            allowed = {"name", "namespace", "keys", "key_sha256", "publish", "admin"}
            extra = sorted(set(entry) - allowed)
            if extra:
                raise ConfigError(f"unknown tenant fields {extra}; allowed: {sorted(allowed)}")
            namespace = check_namespace(str(entry.get("namespace", entry["name"])))
            if namespace == SHARED_NAMESPACE:
                raise ConfigError(f"tenant {entry['name']!r} cannot own the shared namespace")
            if namespace in namespaces:
                raise ConfigError(f"tenants {namespaces[namespace]!r} and {entry['name']!r} share namespace "
                                  f"{namespace!r}; every tenant needs its own")
            namespaces[namespace] = entry["name"]
            tenant = Tenant(entry["name"], namespace, publish=bool(entry.get("publish", True)),
                            admin=bool(entry.get("admin", False)))
            digests = [_digest(k) for k in _strings(entry, "keys")]
            for d in _strings(entry, "key_sha256"):
                if len(d) != 64 or any(c not in "0123456789abcdef" for c in d.lower()):
                    raise ConfigError(f"key_sha256 entries are 64 hex digits, got {d!r}")
                digests.append(d.lower())
            if not digests:
                raise ConfigError(f"tenant {entry['name']!r} has no keys")
            for d in digests:
                if d in by_digest:
                    raise ConfigError("one API key is listed for two tenants")
                by_digest[d] = tenant
        return cls(by_digest)

    def authenticate(self, api_key: str | None) -> Tenant | None:
        """The tenant of ``api_key``, or None (missing or unknown key). Open registries need no key."""
        if self.open:
            return self._open_tenant
        if not api_key or len(api_key) > MAX_KEY_LENGTH:
            return None
        digest = _digest(api_key)
        found = None
        for known, tenant in self._by_digest.items():  # no early exit: timing does not depend on the match
            if hmac.compare_digest(known, digest):
                found = tenant
        return found

    def __len__(self) -> int:
        return len({t.name for t in self._by_digest.values()}) if not self.open else 1


def _strings(entry: Mapping[str, Any], name: str) -> list[str]:
    value = entry.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"tenant field {name!r} must be a list of non-empty strings")
    return list(value)


def parse_key(key: str) -> str:
    """Validate a store key from a request (``ConfigError`` -> HTTP 422)."""
    return check_key(key)


__all__ = ["OPEN_TENANT", "Tenant", "TenantRegistry", "parse_key"]
