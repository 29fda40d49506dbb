"""``DecodeBatch``: one batched forward per decode step over sequences whose caches differ in length.

Layout (pad-and-mask): one KV buffer ``[L, 2, S, H, N, D]`` with S slots; a sequence's cached tokens sit
left-aligned in its slot at ``[0, n)``. A step writes each sequence's new K/V at its own ``n`` and attends over
``[0, max n + 1)`` with a mask per slot (key ``j`` visible iff ``j <= n``). Positions are per sequence (a
compressed cache is shorter than the positions it covers), so RoPE uses each sequence's own position.
Active sequences fill slots ``0 .. B-1``: a leaving sequence's slot takes the last slot's KV. The buffer grows
by doubling (slots or tokens) and is reused, so a step allocates no KV.

Why not a block table: with a few dozen sequences of a few thousand tokens, the padding this wastes is a small
fraction of one step's cost (the weights are read once per step either way), and SDPA takes the padded
tensors as they are; a paged layout would need its own attention kernel.
"""
from __future__ import annotations

from typing import Any

import torch

from ragkv.middleware.adapter import ModelAdapter


class DecodeBatch:
    """Sequences decoded together, one batched forward per step. ``members`` are opaque (the scheduler's jobs)."""

    def __init__(self, adapter: ModelAdapter, *, slots: int = 4, tokens: int = 256) -> None:
        self.adapter = adapter
        self.kv = self._zeros(slots, tokens)  # [L, 2, S, H, N, D]
        self.lengths: list[int] = []
        self.members: list[Any] = []

    def __len__(self) -> int:
        return len(self.members)

    @property
    def capacity(self) -> tuple[int, int]:
        """(slots, tokens per slot) of the buffer."""
        return self.kv.shape[2], self.kv.shape[4]

    def _zeros(self, slots: int, tokens: int) -> torch.Tensor:
        """A zeroed buffer: padding must be finite, since a masked NaN still poisons attention (0 * NaN)."""
        return self.adapter.new_kv(tokens, batch=slots).zero_()

    def _ensure(self, slots: int, tokens: int) -> None:
        have_slots, have_tokens = self.capacity
        if slots <= have_slots and tokens <= have_tokens:
            return
        while have_slots < slots:
            have_slots *= 2
        while have_tokens < tokens:
            have_tokens *= 2
        grown = self._zeros(have_slots, have_tokens)
        used, width = len(self.members), max(self.lengths, default=0)
        grown[:, :, :used, :, :width] = self.kv[:, :, :used, :, :width]
        self.kv = grown

    def add(self, member: Any, cache: Any) -> None:
        """Join with a prepared transformers cache (``DynamicCache``; its KV is copied into a slot)."""
        length = int(cache.get_seq_length())
        slot = len(self.members)
        self._ensure(slot + 1, length + 1)
        for layer, cache_layer in enumerate(cache.layers):
            self.kv[layer, 0, slot, :, :length] = cache_layer.keys[0]
            self.kv[layer, 1, slot, :, :length] = cache_layer.values[0]
        self.members.append(member)
        self.lengths.append(length)

    def remove(self, member: Any) -> None:
        """Leave the batch; the last slot's sequence moves into the freed slot."""
        slot = self.members.index(member)
        last = len(self.members) - 1
        if slot != last:
            n = self.lengths[last]
            self.kv[:, :, slot, :, :n] = self.kv[:, :, last, :, :n]
            self.members[slot], self.lengths[slot] = self.members[last], self.lengths[last]
        self.members.pop()
        self.lengths.pop()

    def clear(self) -> None:
        self.members.clear()
        self.lengths.clear()

    @torch.no_grad()
    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Run every member on its next token (``tokens[b]`` at ``positions[b]``, in slot order) and return the
        float32 logits ``[B, V]``. Each member's cache grows by that token."""
        a = self.adapter
        b = len(self.members)
        if len(tokens) != b or len(positions) != b:
            raise ValueError(f"{b} sequences in the batch, {len(tokens)} tokens and {len(positions)} positions given")
        width = max(self.lengths) + 1
        self._ensure(b, width)
        device = a.device
        lengths = torch.tensor(self.lengths, device=device)
        slots = torch.arange(b, device=device)
        cos, sin = a.rope(torch.tensor(positions, device=device))  # [1, B, D]
        rope = (cos.transpose(0, 1), sin.transpose(0, 1))  # [B, 1, D]: one position per sequence
        mask = (torch.arange(width, device=device)[None, :] <= lengths[:, None])[:, None, None, :]  # [B, 1, 1, W]
        hidden = a.embed(torch.tensor(tokens, device=device)[:, None])  # [B, 1, E]
        for layer in range(a.num_layers):
            q, k, v = a.project(layer, hidden, rope)  # k, v [B, H, 1, D]
            keys, values = self.kv[layer, 0], self.kv[layer, 1]  # [S, H, N, D]
            keys[slots, :, lengths] = k[:, :, 0]
            values[slots, :, lengths] = v[:, :, 0]
            hidden = a.attend(layer, hidden, q, keys[:b, :, :width], values[:b, :, :width], mask=mask)
        self.lengths = [n + 1 for n in self.lengths]
        return a.logits(hidden)[:, -1]


__all__ = ["DecodeBatch"]
