"""API keys mapped to tenants, and what each tenant may do with which namespace.

Isolation rule, enforced here and nowhere else: a tenant reads and writes its own namespace and reads the
shared one (``"shared"``). Roles, all off unless the keys file grants them:

- ``publish``: the server may compute chunks from this tenant's texts into ``shared`` (``warm`` or
  ``generate`` with ``"shared": true``). An entry already in ``shared`` is never replaced that way;
- ``admin``: binary ``PUT`` into ``shared`` (replacing entries) and ``DELETE`` there;
- ``pin``: ask for chunks to be pinned (never evicted for space), within ``pinned_quota_bytes``.

``quota_bytes`` bounds what the tenant's namespace may hold (the largest count over the store's tiers);
writes past it are refused with 413. Any other namespace is refused whatever key is sent, before the store
is touched, so a refusal says nothing about whether the chunk exists.

Keys file (JSON or TOML), keys in clear or as SHA-256 hex digests (so the file need not hold secrets)::

    {"tenants": [
      {"name": "acme", "keys": ["sk-acme-1"], "publish": true, "quota_bytes": 2000000000},
      {"name": "globex", "key_sha256": ["9f86d0..."], "namespace": "globex-prod", "admin": true, "pin": true}
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

from ragkv.integrations.answers import QuotaExceeded
from ragkv.kvstore import SHARED_NAMESPACE, ConfigError, key_namespace
from ragkv.kvstore.chunk import check_namespace
from ragkv.kvstore.tiers.base import parse_size

OPEN_TENANT = "default"
MAX_KEY_LENGTH = 512


@dataclass(frozen=True)
class Tenant:
    name: str
    namespace: str
    publish: bool = False  # the server may compute chunks from this tenant's texts into the shared namespace
    admin: bool = False  # may PUT blobs into and delete chunks from the shared namespace
    pin: bool = False  # may pin chunks
    quota_bytes: int | None = None  # None: unbounded
    pinned_quota_bytes: int | None = None  # None: unbounded (with the pin role)

    def readable(self) -> frozenset[str]:
        return frozenset({self.namespace, SHARED_NAMESPACE})

    def lookup_order(self) -> tuple[str, ...]:
        """Where chunks are looked up, in order: the tenant's own namespace, then the shared one."""
        return (self.namespace, SHARED_NAMESPACE)

    def can_read(self, key: str) -> bool:
        return key_namespace(key) in self.readable()

    def can_write(self, key: str) -> bool:
        """Binary PUT of a blob: own namespace, or the shared one as an admin."""
        ns = key_namespace(key)
        return ns == self.namespace or (ns == SHARED_NAMESPACE and self.admin)

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
        self._open_tenant = Tenant(OPEN_TENANT, OPEN_TENANT, publish=True, admin=True, pin=True)

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
            allowed = {"name", "namespace", "keys", "key_sha256", "publish", "admin", "pin", "quota_bytes",
                       "pinned_quota_bytes"}
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
            tenant = Tenant(entry["name"], namespace, publish=_flag(entry, "publish"), admin=_flag(entry, "admin"),
                            pin=_flag(entry, "pin"), quota_bytes=_size(entry, "quota_bytes"),
                            pinned_quota_bytes=_size(entry, "pinned_quota_bytes"))
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


class QuotaCheck:
    """Checks writes against a tenant's quotas, from what the store reports the namespace holds."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def check_write(self, tenant: Tenant, namespace: str, nbytes: int, pin: bool = False) -> None:
        """``QuotaExceeded`` if writing ``nbytes`` more into ``namespace`` (pinned or not) breaks a quota. The
        shared namespace counts against nobody's quota (only admins and the server itself write there)."""
        pinned_limit = tenant.pinned_quota_bytes if pin else None
        if namespace != tenant.namespace or (tenant.quota_bytes is None and pinned_limit is None):
            return  # nothing to count against (usage walks the namespace's entries)
        usage = self.store.usage(namespace)
        if tenant.quota_bytes is not None and usage["bytes"] + nbytes > tenant.quota_bytes:
            raise QuotaExceeded(f"tenant {tenant.name!r} holds {usage['bytes']} bytes; {nbytes} more would exceed "
                                f"its quota of {tenant.quota_bytes}")
        if pinned_limit is not None and usage["pinned_bytes"] + nbytes > pinned_limit:
            raise QuotaExceeded(f"tenant {tenant.name!r} has {usage['pinned_bytes']} pinned bytes; {nbytes} more "
                                f"would exceed its pinned quota of {pinned_limit}")

    def room(self, tenant: Tenant, namespace: str) -> int | None:
        """Bytes ``namespace`` may still take under the tenant's quota (None: unbounded)."""
        if namespace != tenant.namespace or tenant.quota_bytes is None:
            return None
        return max(0, tenant.quota_bytes - self.store.usage(namespace)["bytes"])


def _flag(entry: Mapping[str, Any], name: str) -> bool:
    value = entry.get(name, False)
    if type(value) is not bool:
        raise ConfigError(f"tenant field {name!r} must be true or false, got {value!r}")
    return value


def _size(entry: Mapping[str, Any], name: str) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"tenant field {name!r} must be a size, got {value!r}")
    try:
        return parse_size(value)
    except ConfigError as exc:
        raise ConfigError(f"tenant field {name!r}: {exc}") from None


__all__ = ["OPEN_TENANT", "QuotaCheck", "Tenant", "TenantRegistry"]
