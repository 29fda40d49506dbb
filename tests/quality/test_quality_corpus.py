"""The synthetic QA corpus: deterministic by seed, and shaped so that its two question kinds mean what they say."""
from __future__ import annotations

from pathlib import Path

import pytest
from bench_modules import load_bench_module

corpus = load_bench_module("quality_corpus")


def test_same_seed_gives_identical_examples() -> None:
    first = [example.to_json() for example in corpus.generate_examples(50, seed=123)]
    second = [example.to_json() for example in corpus.generate_examples(50, seed=123)]
    assert first == second


def test_different_seed_gives_different_examples() -> None:
    first = [(tuple(e.chunks), e.question) for e in corpus.generate_examples(50, seed=123)]
    second = [(tuple(e.chunks), e.question) for e in corpus.generate_examples(50, seed=124)]
    assert len(set(first) & set(second)) == 0  # contents differ, not just the recorded seed


def test_heldout_and_validation_seeds_differ() -> None:
    assert corpus.HELDOUT_SEED != corpus.VALIDATION_SEED


def test_kinds_are_balanced_and_labelled() -> None:
    examples = corpus.generate_examples(40, seed=7)
    assert [e.kind for e in examples] == ["inside", "cross"] * 20


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_questions_are_answered_where_their_kind_says(seed: int) -> None:
    """inside: ``kX vY`` adjacent within a chunk; cross: the chunk ends with kX and the next opens with vY."""
    config = corpus.CorpusConfig()
    for example in corpus.generate_examples(60, seed=seed):
        chunks = [chunk.split() for chunk in example.chunks]
        assert config.min_chunks <= len(chunks) <= config.max_chunks
        marker, key, ask = example.question.split()
        assert (marker, ask) == (corpus.QUERY_MARK, corpus.ASK_MARK)
        assert example.answer in corpus.VALUES
        if example.kind == "inside":
            holders = [words for words in chunks if key in words]
            assert len(holders) == 1
            words = holders[0]
            assert words[words.index(key) + 1] == example.answer
        else:
            index = next(i for i, words in enumerate(chunks) if words and words[-1] == key)
            assert chunks[index + 1][0] == example.answer
            assert example.meta["key_chunk"] == index


def test_keys_and_values_are_unique_within_a_context() -> None:
    for example in corpus.generate_examples(60, seed=3):
        words = [word for chunk in example.chunks for word in chunk.split()]
        keys = [word for word in words if word in corpus.KEYS]
        values = [word for word in words if word in corpus.VALUES]
        assert len(keys) == len(set(keys)) == len(values) == len(set(values))


def test_every_word_is_in_the_vocabulary_and_the_vocabulary_is_stable() -> None:
    vocabulary = corpus.vocabulary()
    assert len(vocabulary) == len(set(vocabulary))
    assert vocabulary[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    known = set(vocabulary)
    for example in corpus.generate_examples(40, seed=5):
        assert set(corpus.prompt_words(example)) <= known
        assert example.answer in known


def test_roughly_half_the_boundaries_straddle() -> None:
    """The training mix relies on straddling being common but not universal."""
    import random

    rng = random.Random(11)
    straddling = boundaries = 0
    for _ in range(300):
        context = corpus.sample_context(rng, 6)
        boundaries += 5
        straddling += sum(pair.straddles for pair in context.pairs)
    assert 0.4 < straddling / boundaries < 0.6


def test_cli_writes_jsonl_that_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "heldout.jsonl"
    assert corpus.main(["--n", "10", "--seed", "9", "--out", str(out)]) == 0
    assert corpus.read_jsonl(out) == corpus.generate_examples(10, seed=9)


def test_bad_configuration_names_the_problem() -> None:
    with pytest.raises(ValueError, match="min_chunks"):
        corpus.CorpusConfig(min_chunks=5, max_chunks=4)
    with pytest.raises(ValueError, match="unique keys"):
        corpus.CorpusConfig(max_chunks=16)
