"""Request traces for the cache-sizing simulator (``ragkv.integrations.simulator``).

A trace is JSON lines, one request per line, in arrival order:

    {"t": 0.25, "namespace": "default", "query_tokens": 24, "chunks": [["a1b2…", 180], ["c3d4…", 95]]}

``t`` is the arrival time in seconds from the trace's start; ``chunks`` are the request's documents, each a
chunk id and its token count. An id is a whole store key (``"shared:ab12…"``, as a service records them) or a
name of the key alphabet that the request's ``namespace`` is put in front of (as the generator writes them).

Two sources:
- ``zipf_trace``: synthetic traffic, chunk popularity Zipf-distributed (a few chunks recur often, most rarely);
- ``TraceRecorder``: what a service really answered (``ragkv serve --record-trace FILE``).

Reading is strict: a malformed line is a ``ConfigError`` naming the line, never a guess.
"""
from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ragkv.integrations.corpus import json_lines
from ragkv.kvstore import ConfigError
from ragkv.kvstore.chunk import check_key, check_namespace

MAX_TRACE_CHUNK_TOKENS = 1 << 20
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class TraceRequest:
    t: float
    chunks: tuple[tuple[str, int], ...]  # (chunk id, tokens)
    query_tokens: int = 16
    namespace: str = "default"

    def to_json(self) -> str:
        return json.dumps({"t": round(self.t, 6), "namespace": self.namespace, "query_tokens": self.query_tokens,
                           "chunks": [[c, n] for c, n in self.chunks]})


def _request_from(value: Any, line: int) -> TraceRequest:
    where = f"trace line {line}"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: not a JSON object")
    t, chunks, query = value.get("t"), value.get("chunks"), value.get("query_tokens", 16)
    if type(t) not in (int, float) or not 0 <= t < 1e9:
        raise ConfigError(f"{where}: 't' must be seconds >= 0")
    if type(query) is not int or not 0 <= query <= MAX_TRACE_CHUNK_TOKENS:
        raise ConfigError(f"{where}: 'query_tokens' must be a non-negative integer")
    if not isinstance(chunks, list) or not chunks:
        raise ConfigError(f"{where}: 'chunks' must be a non-empty list of [id, tokens]")
    parsed = []
    for item in chunks:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str) or not _valid_id(item[0])
                or type(item[1]) is not int or not 1 <= item[1] <= MAX_TRACE_CHUNK_TOKENS):
            raise ConfigError(f"{where}: each chunk must be [a store key or a name of [A-Za-z0-9._-], tokens >= 1]")
        parsed.append((item[0], item[1]))
    try:
        namespace = check_namespace(value.get("namespace", "default"))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return TraceRequest(float(t), tuple(parsed), query, namespace)


def _valid_id(chunk_id: str) -> bool:
    if ":" in chunk_id:
        try:
            check_key(chunk_id)
        except ConfigError:
            return False
        return True
    return 1 <= len(chunk_id) <= 128 and set(chunk_id) <= _ID_CHARS


def store_key(request: TraceRequest, chunk_id: str) -> str:
    """The store key a trace chunk stands for."""
    return chunk_id if ":" in chunk_id else f"{request.namespace}:{chunk_id}"


def read_trace(path: str | Path) -> list[TraceRequest]:
    """A trace file's requests, sorted by arrival."""
    requests = [_request_from(value, number) for number, value in json_lines(path)]
    if not requests:
        raise ConfigError(f"{path}: the trace holds no request")
    return sorted(requests, key=lambda r: r.t)


def write_trace(requests: Iterable[TraceRequest], out: IO[str]) -> None:
    for r in requests:
        out.write(r.to_json() + "\n")


def zipf_trace(requests: int, chunks: int, per_request: int = 4, alpha: float = 1.0, rate_per_s: float = 1.0,
               tokens: tuple[int, int] = (60, 250), query_tokens: int = 16, seed: int = 0,
               sizes: Sequence[int] | None = None) -> list[TraceRequest]:
    """``requests`` Poisson arrivals at ``rate_per_s``, each retrieving ``per_request`` distinct chunks of a
    ``chunks``-chunk corpus drawn with Zipf(``alpha``) popularity; chunk ``i`` is ``c<i>``, its size
    ``sizes[i]`` or uniform in ``tokens``."""
    if requests < 1 or chunks < per_request or per_request < 1 or alpha < 0 or rate_per_s <= 0:
        raise ConfigError("zipf_trace needs requests >= 1, chunks >= per_request >= 1, alpha >= 0, rate > 0")
    if sizes is not None and (len(sizes) != chunks or min(sizes) < 1):
        raise ConfigError("zipf_trace needs one positive size per chunk")
    rng = random.Random(seed)
    sizes = list(sizes) if sizes is not None else [rng.randint(*tokens) for _ in range(chunks)]
    weights = [1.0 / (rank + 1) ** alpha for rank in range(chunks)]
    order = list(range(chunks))
    rng.shuffle(order)  # popularity rank is not the id order
    out, t = [], 0.0
    for _ in range(requests):
        t += rng.expovariate(rate_per_s)
        picked: list[int] = []
        while len(picked) < per_request:
            rank = rng.choices(range(chunks), weights)[0]
            if order[rank] not in picked:
                picked.append(order[rank])
        out.append(TraceRequest(round(t, 6), tuple((f"c{i}", sizes[i]) for i in picked), query_tokens))
    return out


class TraceRecorder:
    """Appends each answered request to a trace file (thread-safe; times from the recorder's start)."""

    def __init__(self, path: str | Path, clock: Any = None) -> None:
        import time

        self._clock = clock or time.monotonic
        self._start = self._clock()
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by ``close``

    def record(self, namespace: str, chunks: Sequence[tuple[str, int]], query_tokens: int) -> None:
        """One answered request: the store keys of its documents with their token counts."""
        if not chunks:
            return
        request = TraceRequest(self._clock() - self._start, tuple(chunks), query_tokens, namespace)
        with self._lock:
            self._file.write(request.to_json() + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


__all__ = ["TraceRecorder", "TraceRequest", "read_trace", "store_key", "write_trace", "zipf_trace"]
