"""``compress``: keep what the query attends to, prune or drop the rest of the cached chunks.

Token mode (SnapKV-style, training-free): the query tokens are the observation window. The cached chunks
are assembled as in ``reuse`` and the query is computed over them; at the scoring layers (default: all)
each chunk token's score is the softmax attention it receives, summed over the window, 1-D max-pooled
along the tokens (kernel 7), per query head; the per-head scores are normalised and pooled (averaged over
heads and scoring layers) into one score per token, and the top ``keep_ratio`` (or ``budget_tokens``) of the
chunk tokens are kept; with ``whole_words`` (the default) each token scores its word's best, so a
number's digits or a name's pieces are kept or dropped together (the budget may be exceeded by the end of
the last word). One token set serves every layer and head, so the result is an ordinary
``DynamicCache``. Kept tokens keep their positions (gaps stay, as in SnapKV): ``next_position`` is the
prompt length even though the cache is shorter. By default the query's K/V and logits are those computed
over the whole context (SnapKV); ``recompute_query=True`` recomputes the query over the pruned cache.

Chunk mode: the top ``keep_chunks`` chunks by query attention mass (``chunk_score="attention"``) or by the
request's ``chunk_scores`` (``"retriever"``) stay at full fidelity; the others keep ``other_keep_ratio`` of
their tokens by score, or are dropped entirely when it is 0. Dropping by retriever score needs no scoring
pass, and the dropped chunks are never loaded.

On the real model ``compress`` keeps far fewer answers than ``blend`` (``bench/RESULTS.md``, fidelity), so
``auto`` never chooses it: it is for callers who trade answers for a smaller cache on purpose.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.adapter import RowMask
from ragkv.middleware.assembly import CHUNK, PREFIX, QUERY, AssembledPrompt, StaticFeed
from ragkv.middleware.context import ChunkInfo, PreparedContext, PrepareRequest
from ragkv.middleware.selective import selective_prefill
from ragkv.middleware.strategies import CachedChunksStrategy, register_strategy

MODES = ("tokens", "chunks")
CHUNK_SCORES = ("attention", "retriever")


@dataclass(frozen=True)
class CompressConfig:
    mode: str = "tokens"
    keep_ratio: float = 0.5  # tokens mode: fraction of chunk tokens kept
    budget_tokens: int | None = None  # tokens mode: absolute budget (overrides keep_ratio)
    score_layers: tuple[int, ...] | None = None  # layers whose attention scores tokens (None: all)
    pool_kernel: int = 7
    keep_chunks: int = 2  # chunks mode: chunks kept at full fidelity
    chunk_score: str = "attention"
    other_keep_ratio: float = 0.0  # chunks mode: fraction of tokens kept from the other chunks (0: drop them)
    recompute_query: bool = False
    # keep or drop whole words (a number's digits, a name's pieces) together: a word scores its best token
    whole_words: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.chunk_score not in CHUNK_SCORES:
            raise ConfigError(f"chunk_score must be one of {CHUNK_SCORES}, got {self.chunk_score!r}")
        for name in ("keep_ratio", "other_keep_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.budget_tokens is not None and self.budget_tokens < 0:
            raise ConfigError(f"budget_tokens must be >= 0, got {self.budget_tokens}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ConfigError(f"pool_kernel must be a positive odd number, got {self.pool_kernel}")
        if self.keep_chunks < 0:
            raise ConfigError(f"keep_chunks must be >= 0, got {self.keep_chunks}")


class _TokenScorer:
    """Observer for selective_prefill: pooled per-head attention of the query window over chunk rows."""

    def __init__(self, adapter: Any, chunk_rows: torch.Tensor, layers: set[int], kernel: int) -> None:
        self.adapter = adapter
        self.chunk_rows = chunk_rows.to(adapter.device)
        self.layers = layers
        self.kernel = kernel
        self.scores = torch.zeros(chunk_rows.numel(), dtype=torch.float32)
        self.count = 0

    def __call__(self, layer: int, q: torch.Tensor, rows: torch.Tensor, kv_layer: torch.Tensor,
                 mask: RowMask) -> None:
        if layer not in self.layers or self.chunk_rows.numel() == 0:
            return
        probs = self.adapter.attention_probs(layer, q, kv_layer[0], mask)  # [1, Hq, Q, N]
        per_head = probs[0].sum(dim=1)[:, self.chunk_rows]  # [Hq, C]: summed over the window
        pooled = F.max_pool1d(per_head[None], self.kernel, stride=1, padding=self.kernel // 2)[0]  # [Hq, C]
        pooled = pooled / pooled.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        self.scores += pooled.mean(dim=0).cpu()
        self.count += 1


@register_strategy
class CompressStrategy(CachedChunksStrategy):
    name = "compress"
    config_class = CompressConfig

    def __init__(self, engine: Any, config: Any = None) -> None:
        super().__init__(engine, config)
        self._texts: dict[int, str] = {}
        self._word_level: bool | None = None  # a word-level tokenizer: every token is a word

    def prepare(self, request: PrepareRequest) -> PreparedContext:
        c = self.config
        if c.mode == "chunks" and c.chunk_score == "retriever":
            if request.chunk_scores is None:
                raise ConfigError("compress with chunk_score='retriever' needs PrepareRequest.chunk_scores")
            if c.other_keep_ratio == 0.0:
                return self._drop_by_retriever(request)
        prompt, feed, infos, prefix_hit, timings = self._gather(request)
        chunk_rows = prompt.rows([CHUNK])
        layers = set(range(self.adapter.num_layers)) if c.score_layers is None else set(c.score_layers)
        scorer = _TokenScorer(self.adapter, chunk_rows, layers, c.pool_kernel)
        out, timings["compute"] = self._run(prompt, feed, always=prompt.rows([QUERY]), observe=scorer)
        keep = self._choose(prompt, request, chunk_rows, scorer.scores)  # kept chunk rows (slots)
        start = time.perf_counter()
        slots = torch.unique(torch.cat((prompt.rows([PREFIX]), keep, prompt.rows([QUERY]))))
        pruned = out.kv[:, :, :, :, slots].contiguous()  # [L, 2, 1, H, M, D]
        logits = out.logits
        if c.recompute_query:
            ids = torch.tensor(prompt.input_ids)[slots]
            query_slots = torch.nonzero(slots >= prompt.query.start).squeeze(1)
            again = selective_prefill(self.adapter, ids, slots.clone(), StaticFeed(pruned).fill, always=query_slots)
            pruned, logits = again.kv, again.logits
        timings["prune"] = time.perf_counter() - start
        kept_set = keep.tolist()
        by_index = {s.index: s for s in prompt.chunks}
        for info in infos:
            s = by_index.get(info.index)  # None: left out by its abstract
            info.kept_tokens = 0 if s is None else sum(1 for r in kept_set if s.start <= r < s.end)
        out.logits = logits
        details = {"mode": c.mode, "kept_tokens": int(keep.numel()), "chunk_tokens": int(chunk_rows.numel()),
                   "cache_tokens": int(slots.numel())}
        return self._finish(prompt, out, infos, prefix_hit, feed, timings, details, kv=pruned,
                            next_position=prompt.length)

    def _choose(self, prompt: AssembledPrompt, request: PrepareRequest, chunk_rows: torch.Tensor,
                scores: torch.Tensor) -> torch.Tensor:
        c = self.config
        n = chunk_rows.numel()
        if c.whole_words:
            scores = self._word_scores(prompt, chunk_rows, scores)
        if c.mode == "tokens":
            budget = c.budget_tokens if c.budget_tokens is not None else round(c.keep_ratio * n)
            budget = min(budget, n)
            if budget >= n:
                return chunk_rows
            chosen = torch.topk(scores, budget).indices
            if c.whole_words:  # finish the last word begun: words are kept or dropped whole
                chosen = torch.nonzero(scores >= scores[chosen].min()).squeeze(1)
            return chunk_rows[chosen.sort().values]
        # chunks mode: rank chunks, keep the top ones whole, prune the others by token score
        offsets, ranked = {}, []
        pos = 0
        for s in prompt.chunks:
            offsets[s.index] = (pos, pos + s.length)
            pos += s.length
        if c.chunk_score == "retriever":
            assert request.chunk_scores is not None
            chunk_value = {s.index: float(request.chunk_scores[s.index]) for s in prompt.chunks}
        else:
            chunk_value = {i: float(scores[a:b].sum()) for i, (a, b) in offsets.items()}
        ranked = sorted(chunk_value, key=lambda i: -chunk_value[i])
        full = set(ranked[:c.keep_chunks])
        parts = []
        for s in prompt.chunks:
            a, b = offsets[s.index]
            if s.index in full:
                parts.append(torch.arange(a, b))
            elif c.other_keep_ratio > 0:
                k = round(c.other_keep_ratio * s.length)
                if k:
                    parts.append(a + torch.topk(scores[a:b], k).indices)
        local = torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)
        return chunk_rows[local]

    def _word_scores(self, prompt: AssembledPrompt, chunk_rows: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Every token takes its word's best score, so that ranking keeps or drops words whole. A word starts at
        a token whose text starts with whitespace, unless the token before is whitespace alone (SmolLM2 writes
        " 1941" as " ", "1", "9", "4", "1"); with a word-level tokenizer every token is a word."""
        ids = [prompt.input_ids[int(r)] for r in chunk_rows]
        if len(ids) > 1 and self._word_level is None:  # does decoding put a space between tokens itself?
            self._word_level = self._text(ids[:2]) != self._text(ids[:1]) + self._text(ids[1:2])
        texts = [self._token_text(i) for i in ids]
        words = torch.zeros(len(ids), dtype=torch.long)
        word = 0
        for j in range(1, len(ids)):
            starts = self._word_level or (texts[j][:1].isspace() and not texts[j - 1].isspace())
            contiguous = int(chunk_rows[j]) == int(chunk_rows[j - 1]) + 1
            word += starts or not contiguous
            words[j] = word
        best = torch.full((word + 1,), float("-inf")).scatter_reduce(0, words, scores, reduce="amax")
        return best[words]

    def _text(self, ids: list[int]) -> str:
        return self.adapter.decode(ids) if self.adapter.tokenizer is not None else " " * len(ids)

    def _token_text(self, token_id: int) -> str:
        """A token's text (cached; a model without a tokenizer: every token is a word)."""
        if token_id not in self._texts:
            self._texts[token_id] = self._text([token_id])
        return self._texts[token_id]

    def _drop_by_retriever(self, request: PrepareRequest) -> PreparedContext:
        """Keep only the top chunks by retriever score; the others are neither loaded nor placed."""
        assert request.chunk_scores is not None
        order = sorted(range(len(request.chunks)), key=lambda i: -float(request.chunk_scores[i]))  # type: ignore
        kept = sorted(order[:self.config.keep_chunks])
        prompt = self.engine.assemble(request, chunk_indices=kept)
        prompt, feed, infos, prefix_hit, timings = self._gather(request, prompt=prompt)
        out, timings["compute"] = self._run(prompt, feed, always=prompt.rows([QUERY]))
        full_prompt = self.engine.assemble(request)
        for s in full_prompt.chunks:
            if s.index not in kept:
                infos.append(ChunkInfo(index=s.index, key=s.key or "", num_tokens=s.length, position=-1, hit=False,
                                       source="dropped", kept_tokens=0))
        infos.sort(key=lambda i: i.index)
        details = {"mode": "chunks", "dropped": [i for i in range(len(request.chunks)) if i not in kept]}
        return self._finish(prompt, out, infos, prefix_hit, feed, timings, details)


__all__ = ["CompressConfig", "CompressStrategy"]
