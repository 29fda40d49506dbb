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
    queue_s: float = 0.0  # waited for the model before prepare started (the scheduler's queue)

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


class SequenceDecoder:
    """One request's decoding state, independent of how its model steps are run (alone or in a batch).

    ``step(logits)`` samples the next token from the logits of the last step and returns the events it
    releases; then either ``done`` is set (``reason`` says why) or the caller runs the model on ``token`` at
    ``position`` and calls ``advanced()``. ``text``, ``generated`` and ``ttft`` make the result.
    """

    def __init__(self, adapter: ModelAdapter, prepared: PreparedContext, config: GenerationConfig,
                 t0: float) -> None:
        self.adapter = adapter
        self.config = config
        self.t0 = t0
        self.sampler = _Sampler(config)
        self.stop_ids = set(config.stop_token_ids if config.stop_token_ids is not None else adapter.eos_token_ids)
        self.sequence = list(prepared.input_ids)
        self.generated: list[int] = []
        self.position = prepared.next_position  # where ``token`` goes when the model runs on it
        self.token = -1
        self.text = ""
        self.emitted = 0  # characters of text released
        self.reason = "length"
        self.done = False
        self.ttft: float | None = None

    def _event(self, token: int, piece: str) -> TokenEvent:
        return TokenEvent(len(self.generated) - (token >= 0), token, piece, time.perf_counter() - self.t0)

    def _finish(self, reason: str, events: list[TokenEvent]) -> list[TokenEvent]:
        """Stop with ``reason``; release any held-back text."""
        self.reason, self.done = reason, True
        if len(self.text) > self.emitted and self.generated:
            events.append(self._event(-1, self.text[self.emitted:]))
        return events

    def step(self, logits: torch.Tensor) -> list[TokenEvent]:
        """logits [V] float32 of the last position -> the events this token releases."""
        token = self.sampler(logits, self.sequence)
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.t0
        if token in self.stop_ids:
            return self._finish("stop_token", [])
        self.generated.append(token)
        self.sequence.append(token)
        self.token = token
        text = self.adapter.decode(self.generated) if self.adapter.tokenizer is not None else ""
        stops = self.config.stop_strings
        stop_at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if stop_at >= 0:
            stop = next(s for s in stops if text.find(s) == stop_at)
            final = text[:stop_at + (len(stop) if self.config.include_stop_string else 0)]
            event = self._event(token, final[self.emitted:])
            self.text, self.emitted, self.reason, self.done = final, len(final), "stop_string", True
            return [event]
        safe = releasable(text, self.emitted, stops)
        piece = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        self.text = text
        events = [self._event(token, piece)]
        if len(self.generated) == self.config.max_new_tokens:
            return self._finish("length", events)
        try:
            self.adapter.check_length(self.position + 1)
        except ContextTooLong:
            return self._finish("context_limit", events)
        return events

    def advanced(self) -> None:
        """The model ran on ``token`` at ``position``: the next token goes one position later."""
        self.position += 1


def _events(adapter: ModelAdapter, prepared: PreparedContext, decoder: SequenceDecoder) -> Iterator[TokenEvent]:
    """``decoder``'s events, each model step run alone with the model's own forward on the prepared cache."""
    logits = prepared.logits
    while True:
        yield from decoder.step(logits)
        if decoder.done:
            return
        with torch.no_grad():
            out = adapter.model(input_ids=torch.tensor([[decoder.token]], device=adapter.device),
                                cache=prepared.cache,
                                position_ids=torch.tensor([[decoder.position]], device=adapter.device), use_cache=True)
        logits = out.logits[0, -1].float()
        decoder.advanced()


def result_of(decoder: SequenceDecoder, prepared: PreparedContext, prepare_s: float, total_s: float
              ) -> GenerationResult:
    """The ``GenerationResult`` of a finished decoder."""
    return GenerationResult(text=decoder.text, token_ids=list(decoder.generated), finish_reason=decoder.reason,
                            ttft_s=decoder.ttft if decoder.ttft is not None else total_s, total_s=total_s,
                            prepare_s=prepare_s, strategy=prepared.strategy, chunks=list(prepared.chunks))


def generate(adapter: ModelAdapter, prepared: PreparedContext, config: GenerationConfig = GenerationConfig(),
             on_token: Callable[[TokenEvent], None] | None = None) -> GenerationResult:
    """Decode from ``prepared``; ``on_token`` receives every token (and any text it releases) as it comes."""
    prepare_s = float(prepared.timings.get("total", 0.0))
    t0 = time.perf_counter() - prepare_s  # clock starts when prepare started
    decoder = SequenceDecoder(adapter, prepared, config, t0)
    for event in _events(adapter, prepared, decoder):
        if on_token is not None:
            on_token(event)
    return result_of(decoder, prepared, prepare_s, time.perf_counter() - t0)


def stream(adapter: ModelAdapter, prepared: PreparedContext, config: GenerationConfig = GenerationConfig()
           ) -> Iterator[str]:
    """Yield the generated text piece by piece (never a piece of a stop string)."""
    prepare_s = float(prepared.timings.get("total", 0.0))
    decoder = SequenceDecoder(adapter, prepared, config, time.perf_counter() - prepare_s)
    for event in _events(adapter, prepared, decoder):
        if event.text:
            yield event.text


__all__ = ["GenerationConfig", "GenerationResult", "SequenceDecoder", "TokenEvent", "generate", "releasable", "result_of",
           "stream"]
