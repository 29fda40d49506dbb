"""Repair a near-duplicate: the KV of an edited chunk from the stored KV of the chunk it was edited from.

The new chunk is laid out as chunks are cached (the start token at position 0, the chunk from
``CHUNK_POSITION``). Every token the alignment keeps takes the old chunk's K/V row, keys re-rotated from
the old token's position to the new one (one delta per row: an insertion shifts everything after it).
Computed in every layer, against that KV with the exact causal mask (``selective_prefill``):

- the start token and the last token (its hidden state gives nothing here, but the prefill needs it);
- every inserted or replaced token;
- the ``neighbours`` kept tokens after each edit (their context changed most);
- with ``ratio`` > 0, KVShare's second stage: every other kept token is a candidate in the layers up to the
  last check layer, and the ``ratio`` share whose fresh K deviates most from the reused K stays computed in the
  deeper layers (the blend machinery's gradual filtering).

Tokens before the first edit see the same context at the same positions as in the old chunk, so their reused
rows are exact; the rest are approximations whose error the recompute budget bounds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.chunking import CHUNK_POSITION
from ragkv.middleware.near_duplicates import Alignment
from ragkv.middleware.rope import rotate_half
from ragkv.middleware.selective import check_schedule, selective_prefill


@dataclass
class RepairedChunk:
    kv: torch.Tensor  # [L, 2, H, T, D] at positions CHUNK_POSITION ..
    recomputed: int  # chunk tokens computed in the last layer (edits, neighbours, chosen by deviation)
    edited: int  # inserted or replaced tokens

    @property
    def recomputed_fraction(self) -> float:
        tokens = self.kv.shape[3]
        return self.recomputed / tokens if tokens else 0.0


def _row_rotation(adapter: ModelAdapter, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[R, D]`` (float32) rotating each row's key by its own position delta (angles in float64)."""
    inv_freq = adapter.inv_freq.to("cpu", torch.float64)
    angles = deltas.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=1)
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


@torch.no_grad()
def repair_chunk(adapter: ModelAdapter, old_kv: torch.Tensor, old_position: int, new_ids: list[int],
                 alignment: Alignment, *, neighbours: int = 2, ratio: float = 0.0,
                 check_layers: tuple[int, ...] = (2, 3)) -> RepairedChunk:
    """``old_kv`` [L, 2, H, T_old, D] computed at ``old_position``; ``alignment`` maps ``new_ids`` onto it."""
    if len(alignment.source) != len(new_ids) or not new_ids:
        raise ValueError("the alignment must cover the new chunk's tokens, and the chunk must not be empty")
    device = adapter.device
    n = 1 + len(new_ids)
    ids = torch.tensor([adapter.start_token_id, *new_ids])
    kept = [(CHUNK_POSITION + j, i) for j, i in enumerate(alignment.source) if i >= 0]
    kept_new = torch.tensor([s for s, _ in kept], dtype=torch.long)
    kept_old = torch.tensor([i for _, i in kept], dtype=torch.long)
    edited = [CHUNK_POSITION + j for j in alignment.edited()]
    near: set[int] = set()
    for slot in edited:
        near.update(range(slot + 1, min(n, slot + 1 + neighbours)))
    always = sorted({0, n - 1, *edited, *(s for s in near if alignment.source[s - CHUNK_POSITION] >= 0)})
    candidates = sorted(set(kept_new.tolist()) - set(always)) if ratio > 0 else []
    checks = check_schedule(ratio, check_layers, None, len(candidates), adapter.num_layers) if candidates else ()
    # positions: slot s sits at position s; old row i sat at old_position + i
    cos, sin = _row_rotation(adapter, kept_new - (old_position + kept_old))
    cos, sin = cos.to(device)[None], sin.to(device)[None]  # [1, R, D]
    rows_new, rows_old = kept_new.to(device), kept_old.to(device)

    def fill(layer: int, kv_layer: torch.Tensor, needs_cache: bool) -> None:
        if not needs_cache or not kept:
            return
        source = old_kv[layer].to(device)  # [2, H, T_old, D]
        keys = source[0][:, rows_old].to(torch.float32)  # [H, R, D]
        kv_layer[0, 0][:, rows_new] = (keys * cos + rotate_half(keys) * sin).to(kv_layer.dtype)
        kv_layer[1, 0][:, rows_new] = source[1][:, rows_old]

    out = selective_prefill(adapter, ids, torch.arange(n), fill, always=torch.tensor(always, dtype=torch.long),
                            candidates=torch.tensor(candidates, dtype=torch.long), checks=checks,
                            cached_rows=kept_new if kept else None)
    final = out.final_rows if out.final_rows is not None else torch.tensor(always)
    kv = out.kv[:, :, 0, :, CHUNK_POSITION:].contiguous()
    return RepairedChunk(kv=kv, recomputed=int((final >= CHUNK_POSITION).sum()), edited=len(edited))


__all__ = ["RepairedChunk", "repair_chunk"]
