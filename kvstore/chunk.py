"""The chunk-KV data model: ``ChunkKV`` = one tensor ``[layers, 2, kv_heads, tokens, head_dim]`` + ``ChunkMeta``."""
from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ragkv.kvstore.errors import ConfigError, CorruptEntry

SHARED_NAMESPACE = "shared"
MAX_TOKEN_ID = (1 << 31) - 1  # token ids are hashed as int32
IMPORTANCE_VERSION = 1  # the layout of ``ChunkMeta.importance`` in a header; other versions read as absent
MAX_IMPORTANCE = 255
_NAMESPACE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_namespace(namespace: str) -> str:
    """Namespaces name tenants; they appear in Redis keys and paths, so keep them to a safe alphabet."""
    if (not isinstance(namespace, str) or not 1 <= len(namespace) <= 64 or not set(namespace) <= _NAMESPACE_CHARS
            or set(namespace) == {"."}):
        raise ConfigError(f"namespace must be 1-64 characters of [A-Za-z0-9._-], not only dots; got {namespace!r}")
    return namespace


@dataclass(frozen=True)
class ModelFingerprint:
    """A stable digest of what makes KV valid: model config, weights dtype, tokenizer vocabulary.

    KV from one model is never served to another: the fingerprint is part of every chunk key.
    """

    digest: str

    @classmethod
    def from_parts(
        cls, config: Mapping[str, Any], dtype: str, vocabulary: Mapping[str, int] | Sequence[str] | None = None,
    ) -> ModelFingerprint:
        h = hashlib.blake2b(digest_size=16)
        # Drop keys that vary without changing the KV (names, paths, versions of the writer).
        ignored = {"_name_or_path", "transformers_version", "name_or_path", "_commit_hash"}
        clean = {k: v for k, v in config.items() if k not in ignored}
        h.update(json.dumps(clean, sort_keys=True, default=str).encode())
        h.update(b"\x00dtype\x00" + dtype.encode())
        if vocabulary is not None:
            items = sorted(vocabulary.items()) if isinstance(vocabulary, Mapping) else list(enumerate(vocabulary))
            h.update(b"\x00vocab\x00" + json.dumps(items).encode())
        return cls(h.hexdigest())

    def __str__(self) -> str:
        return self.digest


@dataclass(frozen=True)
class ChunkMeta:
    """What a chunk's KV was computed from and where.

    ``position`` is the absolute position of the chunk's first token when its KV was computed;
    ``rope`` says whether keys carry rotary position embedding (post-RoPE keys).
    """

    fingerprint: str
    token_ids: tuple[int, ...]
    position: int = 0
    dtype: str = "float16"
    rope: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Optional per-token importance, 0-255 (one per token id; () when not stored): what a selection rule may
    # rank tokens by without computing anything (``ragkv.middleware.importance``).
    importance: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = {
            "fingerprint": self.fingerprint,
            "token_ids": list(self.token_ids),
            "position": self.position,
            "dtype": self.dtype,
            "rope": self.rope,
            "extra": dict(self.extra),
        }
        if self.importance:
            d["importance"] = {"version": IMPORTANCE_VERSION, "scores": list(self.importance)}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChunkMeta:
        """Strict inverse of ``to_dict`` (every field of its exact type and in range); ``CorruptEntry`` if not."""
        from ragkv.kvstore.header_schema import parse_meta

        try:
            return parse_meta(dict(d) if isinstance(d, Mapping) else d)
        except (TypeError, ValueError) as exc:
            raise CorruptEntry(f"invalid chunk metadata: {exc}") from exc


@dataclass(frozen=True, eq=False)
class ChunkKV:
    """One chunk's KV cache. ``kv``: [layers, 2, kv_heads, tokens, head_dim] (index 0 keys, 1 values)."""

    kv: torch.Tensor
    meta: ChunkMeta

    def __post_init__(self) -> None:
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise ConfigError(f"ChunkKV.kv must be [layers, 2, kv_heads, tokens, head_dim], got {tuple(self.kv.shape)}")
        if self.kv.shape[3] != len(self.meta.token_ids):
            raise ConfigError(
                f"ChunkKV has {self.kv.shape[3]} tokens of KV but {len(self.meta.token_ids)} token ids"
            )

    @property
    def num_layers(self) -> int:
        return self.kv.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def keys(self) -> torch.Tensor:
        return self.kv[:, 0]  # [L, H, T, D]

    @property
    def values(self) -> torch.Tensor:
        return self.kv[:, 1]  # [L, H, T, D]

    def to(self, device: str | torch.device) -> ChunkKV:
        return ChunkKV(self.kv.to(device), self.meta)

    def equals(self, other: ChunkKV) -> bool:
        return self.meta == other.meta and self.kv.shape == other.kv.shape and bool(
            torch.equal(self.kv.cpu(), other.kv.cpu())
        )


DEFAULT_NAMESPACE = "default"


def chunk_key(fingerprint: ModelFingerprint | str, namespace: str, token_ids: Sequence[int]) -> str:
    """Content key of a chunk: ``"<namespace>:<hex>"`` where hex = blake2b(fingerprint, namespace, int32 LE ids).

    Independent of where the chunk appears in a prompt; never Python's per-process ``hash()``. The namespace
    is spelled out in front so tiers can prefix and isolate by tenant without a lookup.
    """
    check_namespace(namespace)
    ids = list(token_ids)
    if not all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in ids):
        try:
            ids = [operator.index(t) for t in ids]
        except TypeError:
            raise ConfigError("token ids must be integers") from None
        if not all(0 <= t <= MAX_TOKEN_ID for t in ids):
            raise ConfigError(f"token ids must be integers in [0, {MAX_TOKEN_ID}]")
    h = hashlib.blake2b(digest_size=20)
    h.update(str(fingerprint).encode() + b"\x00")
    h.update(namespace.encode() + b"\x00")
    h.update(torch.tensor(ids, dtype=torch.int32).numpy().astype("<i4").tobytes())
    return f"{namespace}:{h.hexdigest()}"


_KEY_BODY_CHARS = _NAMESPACE_CHARS


def check_key(key: str) -> str:
    """Store keys are ``"<namespace>:<name>"``; both parts of [A-Za-z0-9._-], name up to 128 characters."""
    if isinstance(key, str) and key.count(":") == 1:
        namespace, name = key.split(":")
        if (namespace and len(namespace) <= 64 and set(namespace) <= _NAMESPACE_CHARS and set(namespace) != {"."}
                and name and len(name) <= 128 and set(name) <= _KEY_BODY_CHARS and set(name) != {"."}):
            return key
    raise ConfigError(f"store keys are '<namespace>:<name>' of [A-Za-z0-9._-], got {key!r}")


def key_namespace(key: str) -> str:
    return check_key(key).split(":", 1)[0]
