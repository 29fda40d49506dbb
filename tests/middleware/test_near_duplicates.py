"""Near-duplicate chunks: token alignment corner cases and the MinHash index (similarity, namespaces)."""
from __future__ import annotations

import random

import pytest

from ragkv.middleware.near_duplicates import NearDuplicateIndex, align_tokens


def _check(old: list[int], new: list[int]) -> None:
    """Every reused row holds the same token, and reused rows keep their order (a monotone alignment)."""
    source = align_tokens(old, new).source
    assert len(source) == len(new)
    kept = [(j, i) for j, i in enumerate(source) if i >= 0]
    assert all(old[i] == new[j] for j, i in kept)
    assert [i for _, i in kept] == sorted({i for _, i in kept})


@pytest.mark.parametrize(("old", "new", "kept"), [
    ([], [], 0),
    ([], [1, 2, 3], 0),  # nothing to reuse
    ([1, 2, 3], [], 0),
    ([1, 2, 3], [7, 8, 9], 0),  # all new
    ([5, 5, 5, 5, 5, 5], [5, 5, 5, 5], 4),  # repeated tokens
    ([9, 1, 2, 3, 4, 9], [8, 1, 2, 3, 4, 8], 4),  # edits at both ends
    ([1, 2, 3, 4, 5, 6], [1, 2, 99, 3, 4, 5, 6], 6),  # an insertion
    ([1, 2, 3, 4, 5, 6], [1, 2, 4, 5, 6], 5),  # a deletion
])
def test_alignment_corner_cases(old: list[int], new: list[int], kept: int) -> None:
    alignment = align_tokens(old, new)
    assert alignment.kept == kept
    assert alignment.edited() == [j for j, i in enumerate(alignment.source) if i < 0]
    _check(old, new)


def test_alignment_of_a_long_chunk_with_popular_tokens_keeps_them() -> None:
    rng = random.Random(3)
    old = [rng.choice([1, 2, 3, 4]) if rng.random() < 0.5 else rng.randrange(100, 5000) for _ in range(600)]
    new = old[:100] + [7, 7] + old[110:400] + old[405:]
    alignment = align_tokens(old, new)
    assert alignment.kept == len(new) - 2  # difflib's autojunk would drop the popular tokens on 200+ tokens
    assert alignment.reused_fraction > 0.99
    _check(old, new)


def _edited(tokens: list[int], fraction: float, rng: random.Random) -> list[int]:
    out = list(tokens)
    for _ in range(max(1, int(fraction * len(tokens)))):
        out[rng.randrange(len(out))] = rng.randrange(10_000, 20_000)
    return out


def test_the_index_finds_an_edited_copy_only_in_readable_namespaces() -> None:
    rng = random.Random(1)
    index = NearDuplicateIndex(threshold=0.5)
    base = [rng.randrange(50_000) for _ in range(256)]
    index.add("alice:base", base)
    index.add("shared:other", [rng.randrange(50_000) for _ in range(256)])
    index.add("bob:base", base)
    edited = _edited(base, 0.02, rng)
    found = index.candidates(edited, ["alice", "shared"])
    assert [k for k, _ in found] == ["alice:base"] and found[0][1] > 0.7
    assert index.candidates(edited, ["carol"]) == []  # bob's identical copy is not carol's to find
    assert index.candidates([rng.randrange(50_000) for _ in range(256)], ["alice", "shared"]) == []
    index.remove("alice:base")
    assert index.candidates(edited, ["alice"]) == [] and len(index) == 2


def test_estimated_similarity_falls_with_the_edit_share() -> None:
    rng = random.Random(2)
    index = NearDuplicateIndex(num_perm=128, bands=32, threshold=0.0)
    base = [rng.randrange(50_000) for _ in range(400)]
    index.add("t:base", base)
    scores = []
    for fraction in (0.01, 0.05, 0.2):
        found = index.candidates(_edited(base, fraction, rng), ["t"])
        scores.append(found[0][1] if found else 0.0)
    assert scores[0] > scores[1] > scores[2]
    with pytest.raises(ValueError, match="multiple"):
        NearDuplicateIndex(num_perm=10, bands=3)
