"""Repairing a near-duplicate chunk from the stored KV of the chunk it was edited from."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from ragkv.middleware.chunk_repair import repair_chunk
from ragkv.middleware.near_duplicates import align_tokens


def _kv(engine: Any, ids: list[int]) -> torch.Tensor:
    return engine.cacher.compute([ids])[0].kv


def _ids(engine: Any, make_words: Any, n: int = 40) -> list[int]:
    return engine.cacher.tokens(make_words(3, n))


def test_an_unchanged_chunk_is_its_old_kv(host_engine: Any, make_words: Any) -> None:
    ids = _ids(host_engine, make_words)
    old = _kv(host_engine, ids)
    repaired = repair_chunk(host_engine.adapter, old, 1, ids, align_tokens(ids, ids))
    assert repaired.recomputed == 1 and repaired.edited == 0  # the last token only
    torch.testing.assert_close(repaired.kv, old, rtol=1e-5, atol=1e-5)


def test_an_edit_at_the_end_is_exact(host_engine: Any, make_words: Any) -> None:
    ids = _ids(host_engine, make_words)
    new = ids[:-3] + ids[5:8]  # the last three tokens replaced
    repaired = repair_chunk(host_engine.adapter, _kv(host_engine, ids), 1, new, align_tokens(ids, new),
                            neighbours=0)
    assert repaired.edited == 3 and repaired.recomputed == 3
    torch.testing.assert_close(repaired.kv, _kv(host_engine, new), rtol=1e-5, atol=1e-5)  # the prefix is unchanged


def test_kept_rows_move_to_their_new_positions(host_engine: Any, make_words: Any) -> None:
    ids = _ids(host_engine, make_words)
    new = ids[6:7] + ids[9:10] + ids  # two tokens inserted in front: every kept row moves by 2
    fresh = _kv(host_engine, new)
    repaired = repair_chunk(host_engine.adapter, _kv(host_engine, ids), 1, new, align_tokens(ids, new),
                            neighbours=0)
    assert repaired.edited == 2
    # layer 0's K and V depend on the token and its position only: the moved rows must be exact there
    torch.testing.assert_close(repaired.kv[0], fresh[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(repaired.kv[-1], fresh[-1], atol=1e-5)  # deeper, the stale context shows


def test_a_recompute_budget_by_deviation(host_engine: Any, make_words: Any) -> None:
    ids = _ids(host_engine, make_words)
    new = ids[:10] + [ids[0]] + ids[11:]
    alignment = align_tokens(ids, new)
    plain = repair_chunk(host_engine.adapter, _kv(host_engine, ids), 1, new, alignment, neighbours=1)
    budget = repair_chunk(host_engine.adapter, _kv(host_engine, ids), 1, new, alignment, neighbours=1, ratio=0.25)
    assert plain.recomputed == 3  # the edit, its neighbour, the last token
    assert budget.recomputed == plain.recomputed + round(0.25 * (len(new) - 3))
    fresh = _kv(host_engine, new)
    assert (budget.kv - fresh).abs().max() <= (plain.kv - fresh).abs().max()


def test_everything_recomputed_is_a_full_prefill(host_engine: Any, make_words: Any) -> None:
    ids = _ids(host_engine, make_words)
    new = [ids[5]] + ids[:20] + ids[25:]
    repaired = repair_chunk(host_engine.adapter, _kv(host_engine, ids), 1, new, align_tokens(ids, new),
                            neighbours=len(new))
    assert repaired.recomputed == len(new) and repaired.recomputed_fraction == 1.0
    torch.testing.assert_close(repaired.kv, _kv(host_engine, new), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cover"):
        repair_chunk(host_engine.adapter, _kv(host_engine, ids), 1, new[:-1], align_tokens(ids, new))
