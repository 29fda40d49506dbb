"""Store configuration: one frozen root config composing tier configs, built from code, a file or a spec string.

Spec strings are a comma-separated list of tiers, fastest first::

    host:4GB,disk:/var/cache/ragkv:50GB,redis://127.0.0.1:6379/0
    device:cuda:2GB,host:8GB,redis+cluster://10.0.0.1:7000,10.0.0.2:7000
    disk:/data/kv:100GB?codec=zstd&codec.level=3,redis://cache:6379/0?ttl=86400

Each tier takes options after ``?`` (``codec``, ``codec.<param>``, ``eviction``; disk: ``fsync``; redis:
``ttl``, ``prefix``, ``timeout``). After a ``redis+cluster://`` tier, further ``host:port`` parts are more
seed nodes of the same cluster. Parsing happens here, at the edge; tiers only ever see their dataclasses.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ragkv.kvstore.errors import ConfigError
from ragkv.kvstore.header_schema import DEFAULT_MAX_ENTRY_ELEMENTS, EntryLimits
from ragkv.kvstore.tiers import DiskConfig, HostConfig, TierConfig, tier_class, tier_kinds
from ragkv.kvstore.tiers.base import parse_size

WRITE_POLICIES = ("write-through", "write-back")
DEFAULT_HOST_CAPACITY = "2GB"
DEFAULT_DISK_CAPACITY = "20GB"
ENV_SPEC = "RAGKV_STORE"



@dataclass(frozen=True)
class StoreConfig:
    """The root config: tiers fastest first, and how the store moves entries between them."""

    tiers: tuple[TierConfig, ...]
    write_policy: str = "write-through"
    write_queue_size: int = 256
    prefetch_workers: int = 4
    promote: bool = True
    max_entry_elements: int = DEFAULT_MAX_ENTRY_ELEMENTS  # what one blob may declare (decompression bombs)

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ConfigError("a store needs at least one tier")
        if not all(isinstance(t, TierConfig) for t in self.tiers):
            raise ConfigError("StoreConfig.tiers must hold TierConfig objects (HostConfig, DiskConfig, ...)")
        if self.write_policy not in WRITE_POLICIES:
            raise ConfigError(f"write_policy must be one of {WRITE_POLICIES}, got {self.write_policy!r}")
        if self.write_queue_size < 1:
            raise ConfigError(f"write_queue_size must be >= 1, got {self.write_queue_size}")
        if self.prefetch_workers < 1:
            raise ConfigError(f"prefetch_workers must be >= 1, got {self.prefetch_workers}")
        EntryLimits(self.max_entry_elements)  # ConfigError unless a positive integer

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoreConfig:
        """From the structure of a JSON/TOML config file: store options plus a ``tiers`` list of tables."""
        if not isinstance(data, Mapping):
            raise ConfigError("a store config must be a mapping")
        data = dict(data)
        raw_tiers = data.pop("tiers", None)
        if not isinstance(raw_tiers, list) or not raw_tiers:
            raise ConfigError("a store config needs a non-empty 'tiers' list")
        known = {f.name for f in fields(cls)} - {"tiers"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown store options {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(tiers=tuple(tier_config_from_dict(t) for t in raw_tiers), **data)


def tier_config_from_dict(data: Mapping[str, Any]) -> TierConfig:
    if not isinstance(data, Mapping) or "kind" not in data:
        raise ConfigError(f"each tier needs a 'kind' (one of {tier_kinds()}), got {data!r}")
    data = dict(data)
    kind = data.pop("kind")
    cls = tier_class(kind).config_class  # ConfigError naming the registered kinds
    if "capacity" in data:
        data["capacity_bytes"] = parse_size(data.pop("capacity"))
    allowed = {f.name for f in fields(cls)}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"unknown options {sorted(unknown)} for tier {kind!r}; allowed: {sorted(allowed)}")
    return cls(**data)


def load_config(path: str | os.PathLike[str]) -> StoreConfig:
    """Read a store config from a ``.json`` or ``.toml`` file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read store config {p}: {exc}") from exc
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"store config {p} does not parse: {exc}") from exc
    return StoreConfig.from_dict(data)


def default_cache_dir() -> Path:
    env = os.environ.get("RAGKV_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ragkv")) / "kv"


def default_config() -> StoreConfig:
    """The embedded default: host memory in front of a disk directory under the user cache dir."""
    return StoreConfig(tiers=(
        HostConfig(capacity_bytes=parse_size(DEFAULT_HOST_CAPACITY)),
        DiskConfig(path=str(default_cache_dir()), capacity_bytes=parse_size(DEFAULT_DISK_CAPACITY)),
    ))


_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$")
_CODEC_OPTION = "codec."


def parse_spec(spec: str, **store_options: Any) -> StoreConfig:
    """Parse a spec string (see the module docstring) into a StoreConfig."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("empty store spec; example: 'host:4GB,disk:/var/cache/ragkv:50GB'")
    parts = [p.strip() for p in spec.split(",")]
    tiers: list[TierConfig] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if part.startswith(("redis+cluster://", "rediss+cluster://")):
            # Gather following seed nodes of the same cluster.
            url, _, query = part.partition("?")
            nodes = [url]
            while i + 1 < len(parts) and _HOST_PORT.match(parts[i + 1].partition("?")[0]):
                node, _, q = parts[i + 1].partition("?")
                nodes.append(node)
                query = query or q
                i += 1
            part = ",".join(nodes) + (f"?{query}" if query else "")
        tiers.append(_parse_tier(part))
        i += 1
    return StoreConfig(tiers=tuple(tiers), **store_options)


def _parse_options(query: str) -> tuple[dict[str, Any], dict[str, Any]]:
    options: dict[str, Any] = {}
    codec_params: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        parsed = _scalar(value)
        if name.startswith(_CODEC_OPTION):
            codec_params[name[len(_CODEC_OPTION):]] = parsed
        else:
            options[name] = parsed
    return options, codec_params


def _scalar(value: str) -> Any:
    low = value.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value


_OPTION_FIELDS = {
    "codec": "codec", "eviction": "eviction", "fsync": "fsync", "ttl": "default_ttl_s", "prefix": "key_prefix",
    "timeout": "socket_timeout_s", "connect_timeout": "connect_timeout_s",
}


def _apply_options(kind: str, base: dict[str, Any], options: dict[str, Any], codec_params: dict[str, Any]) -> TierConfig:
    cls = tier_class(kind).config_class
    allowed = {f.name for f in fields(cls)}
    for name, value in options.items():
        target = _OPTION_FIELDS.get(name, name)
        if target not in allowed:
            valid = sorted(k for k, v in _OPTION_FIELDS.items() if v in allowed)
            raise ConfigError(f"unknown option {name!r} for tier {kind!r}; allowed: {valid} and codec.<param>")
        base[target] = value
    if codec_params:
        base["codec_params"] = codec_params
    return cls(**base)


def _parse_tier(part: str) -> TierConfig:
    if part.startswith(("redis://", "rediss://", "redis+cluster://", "rediss+cluster://", "unix://")):
        scheme_rest = urlsplit(part.replace(",", "\x00"))  # keep cluster seeds intact through urlsplit
        options, codec_params = _parse_options(scheme_rest.query)
        url = urlunsplit(scheme_rest._replace(query="")).replace("\x00", ",")
        return _apply_options("redis", {"url": url}, options, codec_params)
    body, _, query = part.partition("?")
    options, codec_params = _parse_options(query)
    kind, _, rest = body.partition(":")
    if kind == "host":
        base: dict[str, Any] = {"capacity_bytes": parse_size(rest) if rest else None}
    elif kind == "device":
        device, size = rest, None
        head, _, tail = rest.rpartition(":")
        if head and _is_size(tail):
            device, size = head, tail
        elif rest and _is_size(rest):
            device, size = "", rest
        base = {"capacity_bytes": parse_size(size)}
        if device:
            base["device"] = device
    elif kind == "disk":
        path, size = rest, None
        head, _, tail = rest.rpartition(":")
        if head and _is_size(tail):
            path, size = head, tail
        if not path:
            raise ConfigError(f"disk tier needs a path: 'disk:/path[:SIZE]', got {part!r}")
        base = {"path": os.path.expanduser(path), "capacity_bytes": parse_size(size)}
    else:
        raise ConfigError(
            f"unknown tier {part!r}; use host[:SIZE], device[:DEVICE][:SIZE], disk:PATH[:SIZE], "
            "redis://HOST:PORT[/DB] or redis+cluster://HOST:PORT[,HOST:PORT...]"
        )
    return _apply_options(kind, base, options, codec_params)


def _is_size(text: str) -> bool:
    try:
        parse_size(text)
    except ConfigError:
        return False
    return bool(text)


def resolve_config(config: StoreConfig | str | os.PathLike[str] | None) -> StoreConfig:
    """None -> $RAGKV_STORE or the embedded default; a str -> a spec or a config file path; a StoreConfig as is."""
    if config is None:
        env = os.environ.get(ENV_SPEC)
        return parse_spec(env) if env else default_config()
    if isinstance(config, StoreConfig):
        return config
    text = os.fspath(config)
    if text.endswith((".json", ".toml")) and Path(text).is_file():
        return load_config(text)
    return parse_spec(text)


__all__ = [
    "WRITE_POLICIES",
    "StoreConfig",
    "default_cache_dir",
    "default_config",
    "load_config",
    "parse_spec",
    "resolve_config",
    "tier_config_from_dict",
]
