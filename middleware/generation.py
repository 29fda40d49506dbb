"""Generation from a ``PreparedContext`` with the model's own forward (one token at a time, its cache).

The first token comes from the prepared logits (no forward pass), so TTFT = prepare time + one sampling
step. Each later token runs ``model(input_ids, cache=cache, position_ids=...)``: positions are
given explicitly because a compressed cache is shorter than the prompt. Sampling uses transformers' own
logits warpers (temperature, top-k, top-p). Stop conditions: EOS / ``stop_token_ids``, ``stop_strings``
(text is held back while it could still be the start of a stop string, so a streamed stop string never
leaks), and ``max_new_tokens``. Streamed text holds back a trailing U+FFFD until the next token completes the
multi-byte character whose first bytes it stands for, so pieces are whole characters. Streaming: a per-token callback, or the ``stream`` iterator of text pieces.

A prepared cache is extended in place by generation: generate from a ``PreparedContext`` once.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.context import ChunkInfo, PreparedContext
from ragkv.middleware.errors import ContextTooLong

MIN_SAMPLING_TEMPERATURE = 1e-4
INCOMPLETE_CHARACTER = "\ufffd"  # what decoding the first bytes of a multi-byte UTF-8 character gives


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS ids
    include_stop_string: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if self.do_sample and self.temperature < MIN_SAMPLING_TEMPERATURE:
            # far below this the scaled logits overflow to inf and sampling fails; it is greedy in all but name
            raise ConfigError(f"sampling temperature must be >= {MIN_SAMPLING_TEMPERATURE} "
                              f"(use do_sample=False for greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop_strings, str) or any(not s for s in self.stop_strings):
            raise ConfigError("stop_strings must be a tuple of non-empty strings")


@dataclass
class TokenEvent:
    """One generated token, as streamed: its id and the text it released (may be empty while held back)."""

    index: int
    token_id: int
    text: str
    seconds: float  # since the start of prepare


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop_token" | "stop_string" | "length" | "context_limit"
    ttft_s: float  # prepare + first token
    total_s: float
    prepare_s: float
    strategy: str
    chunks: list[ChunkInfo] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float | None:
        decode = self.total_s - self.ttft_s
        return (len(self.token_ids) - 1) / decode if len(self.token_ids) > 1 and decode > 0 else None


class _Sampler:
    def __init__(self, config: GenerationConfig) -> None:
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.config = config
        self.warpers = LogitsProcessorList()
        if config.do_sample:
            if config.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k is not None:
                self.warpers.append(TopKLogitsWarper(config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(config.top_p))
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, sequence: list[int]) -> int:
        """logits [V] float32 -> next token id."""
        if not self.config.do_sample:
            return int(torch.argmax(logits))
        scores = self.warpers(torch.tensor([sequence]), logits[None].float().cpu())
        probs = torch.softmax(scores, dim=-1)[0].cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


def releasable(text: str, emitted: int, stops: tuple[str, ...] = ()) -> int:
    """How much of the decoded ``text`` may be streamed now: not a suffix that could start a stop string, and
    not a trailing U+FFFD (the first bytes of a multi-byte character whose other bytes are still to come)."""
    safe = len(text) - _held_back(text, stops)
    while safe > emitted and text[safe - 1] == INCOMPLETE_CHARACTER:
        safe -= 1
    return safe


def _events(adapter: ModelAdapter, prepared: PreparedContext, config: GenerationConfig, t0: float,
            outcome: dict[str, Any]) -> Iterator[TokenEvent]:
    sampler = _Sampler(config)
    stop_ids = set(config.stop_token_ids if config.stop_token_ids is not None else adapter.eos_token_ids)
    sequence = list(prepared.input_ids)
    generated: list[int] = []
    emitted = 0  # characters of text released
    logits = prepared.logits
    position = prepared.next_position
    outcome.update(reason="length", text="", ids=generated)
    for step in range(config.max_new_tokens):
        token = sampler(logits, sequence)
        if step == 0:
            outcome["ttft"] = time.perf_counter() - t0
        if token in stop_ids:
            outcome["reason"] = "stop_token"
            break
        generated.append(token)
        sequence.append(token)
        text = adapter.decode(generated) if adapter.tokenizer is not None else ""
        stop_at = min((i for i in (text.find(s) for s in config.stop_strings) if i >= 0), default=-1)
        if stop_at >= 0:
            stop = next(s for s in config.stop_strings if text.find(s) == stop_at)
            final = text[:stop_at + (len(stop) if config.include_stop_string else 0)]
            outcome.update(reason="stop_string", text=final)
            yield TokenEvent(step, token, final[emitted:], time.perf_counter() - t0)
            return
        safe = releasable(text, emitted, config.stop_strings)
        piece = text[emitted:safe] if safe > emitted else ""
        emitted = max(emitted, safe)
        outcome["text"] = text
        yield TokenEvent(step, token, piece, time.perf_counter() - t0)
        if step + 1 == config.max_new_tokens:
            break
        try:
            adapter.check_length(position + 1)
        except ContextTooLong:
            outcome["reason"] = "context_limit"
            break
        with torch.no_grad():
            out = adapter.model(input_ids=torch.tensor([[token]], device=adapter.device),
                                cache=prepared.cache,
                                position_ids=torch.tensor([[position]], device=adapter.device), use_cache=True)
        logits = out.logits[0, -1].float()
        position += 1
    # finished by a stop token, the length limit or the context limit: release any held-back text
    text = outcome["text"]
    if len(text) > emitted and generated:
        yield TokenEvent(len(generated), -1, text[emitted:], time.perf_counter() - t0)


def generate(adapter: ModelAdapter, prepared: PreparedContext, config: GenerationConfig = GenerationConfig(),
             on_token: Callable[[TokenEvent], None] | None = None) -> GenerationResult:
    """Decode from ``prepared``; ``on_token`` receives every token (and any text it releases) as it comes."""
    prepare_s = float(prepared.timings.get("total", 0.0))
    t0 = time.perf_counter() - prepare_s  # clock starts when prepare started
    outcome: dict[str, Any] = {}
    for event in _events(adapter, prepared, config, t0, outcome):
        if on_token is not None:
            on_token(event)
    total = time.perf_counter() - t0
    return GenerationResult(text=outcome["text"], token_ids=list(outcome["ids"]), finish_reason=outcome["reason"],
                            ttft_s=outcome.get("ttft", total), total_s=total, prepare_s=prepare_s,
                            strategy=prepared.strategy, chunks=list(prepared.chunks))


def stream(adapter: ModelAdapter, prepared: PreparedContext, config: GenerationConfig = GenerationConfig()
           ) -> Iterator[str]:
    """Yield the generated text piece by piece (never a piece of a stop string)."""
    prepare_s = float(prepared.timings.get("total", 0.0))
    outcome: dict[str, Any] = {}
    for event in _events(adapter, prepared, config, time.perf_counter() - prepare_s, outcome):
        if event.text:
            yield event.text


__all__ = ["GenerationConfig", "GenerationResult", "TokenEvent", "generate", "releasable", "stream"]
