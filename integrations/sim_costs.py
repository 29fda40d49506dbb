"""Measure the simulator's costs (``SimCosts``) on this machine, for one model, with the real engine and tiers.

- ``fixed_s`` and ``prompt_s_per_token``: the TTFT of answers (``RagRuntime.answer``, the service's path: the
  default strategy, the scheduler, the first token) whose chunks all sit in host memory, at several prompt
  lengths, fitted by least squares (seconds = fixed + per_token * tokens);
- ``compute_s_per_token``: what missing documents add to such answers' TTFT (computed alone, their importance,
  stored in host memory), per missing token;
- per slow tier kind of the spec (disk in a temporary folder, Redis at the spec's URL), with the spec's codec:
  ``store.get`` of stored chunks of two sizes, fitted the same way (latency + seconds per decoded byte), and
  ``store.put`` of them (seconds per decoded byte, latency spread over the mean size): what storing a miss
  costs;
- per codec of the spec: the encoded size over the decoded size of the same chunks (``size_ratio``).

The samples are the bundled sample corpus's documents; medians of ``repeats`` runs after one warm-up.
Why measured here rather than read from the store, TTFT and codec benches' JSON: those benches run other model
shapes (the TTFT bench a Qwen-0.5B-shaped random model), and the costs are the served model's.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from ragkv.integrations.simulator import SimCosts, modelled_tiers
from ragkv.kvstore import TieredStore
from ragkv.kvstore.container import encode_entry


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line, both clamped at 0."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    slope = max(slope, 0.0)
    return max(my - slope * mx, 0.0), slope


def _slow_tier_spec(kind: str, config: Any, folder: str) -> str | None:
    options = f"codec={config.codec}" + "".join(f"&codec.{k}={v}" for k, v in dict(config.codec_params).items())
    if kind == "disk":
        return f"disk:{folder}?{options}"
    if kind == "redis":
        return f"{config.url}?{options}"
    return None


def measure_costs(runtime: Any, spec: str, texts: Sequence[str], repeats: int = 3) -> SimCosts:
    """``SimCosts`` for ``runtime``'s model (a ``RagRuntime`` over a host-memory store) and the tier kinds of
    ``spec``, from ``texts`` (at least 4 documents, warmed into the runtime's store)."""
    from ragkv.integrations.answers import AnswerRequest, Document, GenerationOptions
    from ragkv.kvstore.config import parse_spec

    if len(texts) < 4:
        raise ValueError("measuring costs needs at least 4 sample documents")
    engine = runtime.engine
    adapter = engine.adapter
    chunks = engine.cacher.compute([engine.cacher.tokens(t) for t in texts[:4]])
    kv_bytes_per_token = chunks[0].nbytes // chunks[0].num_tokens

    def ask(documents: Sequence[str]) -> Any:
        return runtime.answer(AnswerRequest(query="What do these documents say?",
                                            documents=[Document(text=t) for t in documents],
                                            generation=GenerationOptions(max_new_tokens=1)))

    runtime.warm(list(texts), "default")
    lengths, seconds = [], []
    for n in sorted({2, max(2, len(texts) // 2), len(texts)}):
        lengths.append(float(ask(texts[:n]).prompt_tokens))  # also the warm-up
        seconds.append(statistics.median(ask(texts[:n]).ttft_s for _ in range(repeats)))
    fixed_s, prompt_s_per_token = _fit(lengths, seconds)

    # a miss, as the answer path pays it (computed alone, with its importance, stored in host memory): the TTFT
    # above the all-hit line, per missing token; the documents are made new by a numbered ending
    missing_s, missing_tokens = 0.0, 0
    for r in range(max(2, repeats)):
        for k in (1, 2):
            documents = [f"{t} (note {r}-{k}-{i})" if i < k else t for i, t in enumerate(texts[:4])]
            answer = ask(documents)
            missing_s += answer.ttft_s - (fixed_s + prompt_s_per_token * answer.prompt_tokens)
            missing_tokens += sum(d.tokens for d in answer.documents if not d.hit)
    compute_s_per_token = max(missing_s, 0.0) / max(missing_tokens, 1)

    load_s_per_byte: dict[str, float] = {"host": 0.0, "device": 0.0}
    latency: dict[str, float] = {}
    write_s_per_byte: dict[str, float] = {}
    size_ratio: dict[str, float] = {}
    configs = parse_spec(spec).tiers
    small, large = min(chunks, key=lambda c: c.nbytes), max(chunks, key=lambda c: c.nbytes)
    for tier, config in zip(modelled_tiers(spec), configs):
        with tempfile.TemporaryDirectory(prefix="ragkv-costs-") as folder:
            slow = _slow_tier_spec(tier.kind, config, folder)
            if slow is None:
                continue
            store = TieredStore(slow)
            try:
                codec = store.tiers[0].codec
                sizes, reads, writes = [], [], []
                for i, chunk in enumerate((small, large)):
                    key = f"simcosts:{tier.kind}{i}"
                    writes.append(_median_time(lambda k=key, c=chunk: store.put(k, c), repeats))
                    sizes.append(float(chunk.nbytes))
                    reads.append(_median_time(lambda k=key: store.get(k), repeats))
                    store.delete(key)
            finally:
                store.close()
        latency[tier.kind], load_s_per_byte[tier.kind] = _fit(sizes, reads)
        write_latency, write_per_byte = _fit(sizes, writes)
        write_s_per_byte[tier.kind] = write_per_byte + write_latency / statistics.fmean(sizes)
        encoded = sum(len(encode_entry(c, codec)) for c in chunks)
        size_ratio[tier.codec] = encoded / sum(c.nbytes for c in chunks)
    return SimCosts(model=str(getattr(adapter, "model_id", None) or "model"), kv_bytes_per_token=kv_bytes_per_token,
                    fixed_s=fixed_s, prompt_s_per_token=prompt_s_per_token, compute_s_per_token=compute_s_per_token,
                    load_s_per_byte=load_s_per_byte, load_latency_s=latency, size_ratio=size_ratio,
                    write_s_per_byte=write_s_per_byte)


__all__ = ["measure_costs"]
