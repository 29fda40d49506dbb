"""Prefill→decode hand-off through the store (DistServe / semi-PD): one process prepares a prompt, another decodes.

``publish(engine, prepared, namespace)`` stores a prepared context as a normal chunk entry under
``<namespace>:handoff-<32 hex>``: checksummed, encoded with the store's codecs, in the request's namespace (so
another tenant can neither read nor take it), with a TTL (600 s by default). The entry holds the KV of every
prompt token but the last; the last token's id goes in the header. ``resume(engine, key)`` reads it back (a
miss is ``HandoffMissing``; another model's entry is ``ModelMismatch``), rebuilds the cache and runs the last
prompt token through the model as its first decode step: that gives the logits the first token is sampled
from, so no logits travel. The entry is deleted once this process has checked it can resume it (a handle is
used once; two resumes racing on one handle can both read it: the store has no atomic get-and-delete).

Why the last token is recomputed rather than its logits stored: the logits are a vocabulary-sized float vector
(196 KB for SmolLM2) that no chunk container holds, while the last token's row is one decode step that the
decode side runs anyway. The row computed there attends over the same cached rows as the prefill's own, so
greedy decoding gives the same tokens (tested across processes).

A compressed context (``compress``: a cache shorter than the prompt) is refused: its rows are not the prompt's
tokens in order. Sampling options (temperature, seed, stop strings) are given to the decode side, per request.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import torch

from ragkv.kvstore.chunk import ChunkKV, ChunkMeta, check_key, check_namespace, key_namespace
from ragkv.kvstore.errors import ConfigError, CorruptEntry, ModelMismatch, RagKVError
from ragkv.middleware.context import PreparedContext

HANDOFF_PREFIX = "handoff-"
HANDOFF_KIND = "handoff"
HANDOFF_VERSION = 1
DEFAULT_HANDOFF_TTL_S = 600.0


class HandoffMissing(RagKVError):
    """No hand-off entry under this key: never published, already resumed, expired, or evicted."""


@dataclass(frozen=True)
class Handoff:
    """What ``publish`` returns: the key another process resumes from, and what it holds."""

    key: str
    prompt_tokens: int
    strategy: str
    stored_bytes: int  # the decoded KV's size

    def to_dict(self) -> dict[str, Any]:
        return {"handle": self.key, "prompt_tokens": self.prompt_tokens, "strategy": self.strategy,
                "stored_bytes": self.stored_bytes}


def is_handoff_key(key: str) -> bool:
    return check_key(key).split(":", 1)[1].startswith(HANDOFF_PREFIX)


def cache_kv(cache: Any) -> torch.Tensor:
    """A one-sequence ``DynamicCache`` -> kv [L, 2, H, T, D]."""
    return torch.stack([torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers])


def publish(engine: Any, prepared: PreparedContext, namespace: str, ttl_s: float | None = DEFAULT_HANDOFF_TTL_S
            ) -> Handoff:
    """Store ``prepared`` for another process to decode from; generate from ``prepared`` here no more."""
    check_namespace(namespace)
    ids = list(prepared.input_ids)
    if prepared.cache_length != len(ids) or prepared.next_position != len(ids):
        raise ConfigError("a compressed context (cache shorter than the prompt) cannot be handed off; "
                          "prepare it with another strategy")
    if len(ids) < 2:
        raise ConfigError("a hand-off needs a prompt of at least two tokens")
    adapter = engine.adapter
    kv = cache_kv(prepared.cache)[:, :, :, :-1].to("cpu").contiguous()  # the last token is the decode side's
    meta = ChunkMeta(fingerprint=str(adapter.fingerprint), token_ids=tuple(ids[:-1]), position=0,
                     dtype=adapter.dtype_name, rope=True,
                     extra={"kind": HANDOFF_KIND, "version": HANDOFF_VERSION, "last_token": ids[-1],
                            "strategy": prepared.strategy[:64]})
    key = f"{namespace}:{HANDOFF_PREFIX}{secrets.token_hex(16)}"
    engine.store.put(key, ChunkKV(kv, meta), ttl_s=ttl_s)
    return Handoff(key, len(ids), prepared.strategy, kv.numel() * kv.element_size())


@torch.no_grad()
def resume(engine: Any, key: str) -> PreparedContext:
    """The prepared context published under ``key``, ready to generate from; the entry is deleted."""
    if not is_handoff_key(key):
        raise ConfigError(f"{key!r} is not a hand-off key ('<namespace>:{HANDOFF_PREFIX}...')")
    adapter = engine.adapter
    start = time.perf_counter()
    chunk = engine.store.get(key)
    if chunk is None:
        raise HandoffMissing(f"no hand-off under {key}: never published, already resumed, expired or evicted")
    fetched = time.perf_counter()
    meta = chunk.meta
    if meta.fingerprint != str(adapter.fingerprint):
        raise ModelMismatch(f"the hand-off {key} was prepared by another model")
    extra = meta.extra
    last = extra.get("last_token")
    if (extra.get("kind") != HANDOFF_KIND or extra.get("version") != HANDOFF_VERSION or type(last) is not int
            or not 0 <= last < adapter.embed_tokens.num_embeddings or meta.position != 0 or not meta.rope):
        raise CorruptEntry(f"{key} is not a hand-off entry this version can resume")
    length = chunk.num_tokens
    adapter.check_length(length + 1)
    engine.store.delete(key)  # only once this process can resume it: a mis-routed resume leaves it for the right one
    cache = adapter.make_cache(chunk.kv.to(adapter.device, adapter.dtype)[:, :, None])
    out = adapter.model(input_ids=torch.tensor([[last]], device=adapter.device), cache=cache,
                        position_ids=torch.tensor([[length]], device=adapter.device), use_cache=True)
    done = time.perf_counter()
    return PreparedContext(cache=cache, logits=out.logits[0, -1].float(), input_ids=[*meta.token_ids, last],
                           next_position=length + 1, chunks=[], strategy=str(extra.get("strategy", "handoff")),
                           timings={"fetch": fetched - start, "first_step": done - fetched, "total": done - start},
                           details={"handoff": key, "namespace": key_namespace(key)})


__all__ = ["DEFAULT_HANDOFF_TTL_S", "Handoff", "HandoffMissing", "cache_kv", "is_handoff_key", "publish", "resume"]
