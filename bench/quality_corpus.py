"""Synthetic multi-document corpus for ragkv's quality benchmark: associative recall across chunks.

Why this task: ragkv computes each chunk's KV on its own and assembles them later. Whatever a token's KV
should have learned from *earlier chunks* is lost by independent computation; CacheBlend exists to repair
exactly that. Associative recall makes the loss measurable with a tiny model: a context lists key/value
pairs ``kX vY ;`` (the value directly after its key), and the question ``Q kX ?`` asks for the value.

- ``inside`` questions ask for a pair that lies wholly inside one chunk: independent-chunk KV holds
  everything needed, so reuse should answer them as well as full prefill.
- ``cross`` questions ask for a pair that straddles a chunk boundary: the chunk ends with ``kX`` and the
  next chunk opens with ``vY``. The value's KV must have "seen" its key (the model copies the previous
  token into each position), which independent computation of the second chunk cannot provide, so
  reuse without recompute should fail them.

Keys ``k0..k63`` and values ``v0..v63`` are single tokens (a ``kX : vY`` format, with the value two
tokens after the key, stayed at chance in the feasibility study); keys and values are unique within a
context so every question has exactly one answer. Filler words pad the chunks so pairs do not sit at
fixed offsets. Chunk boundaries are invisible in the text: a context is just its chunks joined by spaces.

Everything is deterministic by seed (``random.Random``, never ``hash()``). The training script draws its
contexts from :func:`sample_context` with per-step seeds; the held-out set is :func:`generate_examples`
with :data:`HELDOUT_SEED`, and early stopping uses :data:`VALIDATION_SEED`, so neither is trained on.

This module is pure Python (no torch), so it can be imported anywhere; bench/ is not a package, so
tests load it with ``importlib.util.spec_from_file_location``. Command line::

    python bench/quality_corpus.py --n 400 --seed 2 --out heldout.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["inside", "cross"]

NUM_KEYS = 64
NUM_VALUES = 64
KEYS: tuple[str, ...] = tuple(f"k{i}" for i in range(NUM_KEYS))
VALUES: tuple[str, ...] = tuple(f"v{i}" for i in range(NUM_VALUES))
# Ordinary words as filler: they carry nothing, they only move the pairs around inside a chunk.
FILLERS: tuple[str, ...] = (
    "the", "a", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "by", "at", "from",
    "this", "that", "it", "report", "note", "data", "table", "page", "item", "list", "entry", "file",
    "record", "section", "value", "source", "see",
)
PAIR_END = ";"
QUERY_MARK = "Q"
ASK_MARK = "?"
REPLAY_MARK = "R"
SYMBOLS: tuple[str, ...] = (PAIR_END, QUERY_MARK, ASK_MARK, REPLAY_MARK)

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)

# Seeds of the fixed evaluation sets. Training uses other seeds (see train_model.py), so these are held out.
VALIDATION_SEED = 1
HELDOUT_SEED = 2


def vocabulary() -> list[str]:
    """Every word the tokenizer knows, specials first so their ids are small and stable (pad = 0)."""
    return [*SPECIAL_TOKENS, *SYMBOLS, *KEYS, *VALUES, *FILLERS]


@dataclass(frozen=True)
class CorpusConfig:
    """Shape of a context. Defaults are the ones the bundled model was trained and evaluated on."""

    min_chunks: int = 4
    max_chunks: int = 8
    min_pairs_per_chunk: int = 2
    max_pairs_per_chunk: int = 4
    max_fillers_per_gap: int = 3
    straddle_probability: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.min_chunks <= self.max_chunks:
            raise ValueError(f"need 1 <= min_chunks <= max_chunks, got {self.min_chunks}, {self.max_chunks}")
        if not 1 <= self.min_pairs_per_chunk <= self.max_pairs_per_chunk:
            raise ValueError("need 1 <= min_pairs_per_chunk <= max_pairs_per_chunk, got "
                             f"{self.min_pairs_per_chunk}, {self.max_pairs_per_chunk}")
        if self.max_fillers_per_gap < 0:
            raise ValueError(f"max_fillers_per_gap must be >= 0, got {self.max_fillers_per_gap}")
        if not 0.0 <= self.straddle_probability <= 1.0:
            raise ValueError(f"straddle_probability must be in [0, 1], got {self.straddle_probability}")
        # Inside pairs plus one straddling pair per boundary must fit the unique keys and values.
        most_pairs = self.max_chunks * self.max_pairs_per_chunk + self.max_chunks - 1
        if most_pairs > min(NUM_KEYS, NUM_VALUES):
            raise ValueError(f"up to {most_pairs} pairs per context, but only {min(NUM_KEYS, NUM_VALUES)} "
                             "unique keys/values exist; lower max_chunks or max_pairs_per_chunk")


@dataclass(frozen=True)
class Pair:
    """One key/value pair of a context; ``straddles`` when the key ends a chunk and the value opens the next."""

    key: str
    value: str
    straddles: bool


@dataclass(frozen=True)
class Context:
    """A context as chunks of word tokens, and the pairs it states (in text order)."""

    chunks: tuple[tuple[str, ...], ...]
    pairs: tuple[Pair, ...]

    def chunk_texts(self) -> list[str]:
        return [" ".join(words) for words in self.chunks]

    def words(self) -> list[str]:
        return [word for chunk in self.chunks for word in chunk]


@dataclass(frozen=True)
class QAExample:
    """One held-out question over one context. ``chunks`` are texts of space-separated word tokens."""

    chunks: list[str]
    question: str
    answer: str
    kind: Kind
    meta: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(line: str) -> QAExample:
        data = json.loads(line)
        return QAExample(chunks=list(data["chunks"]), question=data["question"], answer=data["answer"],
                         kind=data["kind"], meta=dict(data.get("meta", {})))


def question_for(key: str) -> str:
    """The question text for a key: the answer is read from the logits at the final ``?``."""
    return f"{QUERY_MARK} {key} {ASK_MARK}"


def prompt_words(example: QAExample) -> list[str]:
    """The word tokens of the full prompt, without ``<bos>``: chunks in order, then the question."""
    return [word for chunk in example.chunks for word in chunk.split()] + example.question.split()


def _fillers(rng: random.Random, config: CorpusConfig) -> list[str]:
    return [rng.choice(FILLERS) for _ in range(rng.randint(0, config.max_fillers_per_gap))]


def sample_context(rng: random.Random, num_chunks: int, config: CorpusConfig = CorpusConfig(),
                   force_straddle: bool = False) -> Context:
    """Draw one context of ``num_chunks`` chunks from ``rng``.

    Each chunk holds ``min..max_pairs_per_chunk`` pairs separated by filler. Each boundary straddles with
    ``straddle_probability``: the chunk before it then ends with a key and the chunk after it opens with
    that key's value. ``force_straddle`` guarantees at least one straddling boundary (when there are two
    or more chunks), so a cross-boundary question can always be asked.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    straddles = [rng.random() < config.straddle_probability for _ in range(num_chunks - 1)]
    if force_straddle and num_chunks > 1 and not any(straddles):
        straddles[rng.randrange(num_chunks - 1)] = True
    inside_counts = [rng.randint(config.min_pairs_per_chunk, config.max_pairs_per_chunk) for _ in range(num_chunks)]
    total = sum(inside_counts) + sum(straddles)
    keys = rng.sample(KEYS, total)
    values = rng.sample(VALUES, total)
    next_pair = 0
    pairs: list[Pair] = []
    chunks: list[tuple[str, ...]] = []
    carried_value: str | None = None  # the value that must open this chunk (previous boundary straddles)
    for index in range(num_chunks):
        words: list[str] = []
        if carried_value is not None:
            words += [carried_value, PAIR_END]
            carried_value = None
        for _ in range(inside_counts[index]):
            key, value = keys[next_pair], values[next_pair]
            next_pair += 1
            words += _fillers(rng, config) + [key, value, PAIR_END]
            pairs.append(Pair(key, value, straddles=False))
        words += _fillers(rng, config)
        if index < num_chunks - 1 and straddles[index]:
            key, value = keys[next_pair], values[next_pair]
            next_pair += 1
            words.append(key)
            carried_value = value
            pairs.append(Pair(key, value, straddles=True))
        chunks.append(tuple(words))
    return Context(chunks=tuple(chunks), pairs=tuple(pairs))


def generate_examples(n: int, seed: int, config: CorpusConfig = CorpusConfig()) -> list[QAExample]:
    """``n`` questions, each over its own fresh context, alternating ``inside`` and ``cross`` (half each).

    One stream ``random.Random(seed)`` drives everything, so the same seed gives identical examples on
    every machine and Python version that keeps ``random``'s documented reproducibility.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    examples: list[QAExample] = []
    for index in range(n):
        kind: Kind = "inside" if index % 2 == 0 else "cross"
        low = max(config.min_chunks, 2) if kind == "cross" else config.min_chunks
        num_chunks = rng.randint(low, max(low, config.max_chunks))
        context = sample_context(rng, num_chunks, config, force_straddle=(kind == "cross"))
        candidates = [pair for pair in context.pairs if pair.straddles == (kind == "cross")]
        pair = rng.choice(candidates)
        key_chunk = next(i for i, chunk in enumerate(context.chunks) if pair.key in chunk)
        examples.append(QAExample(
            chunks=context.chunk_texts(), question=question_for(pair.key), answer=pair.value, kind=kind,
            meta={"num_chunks": num_chunks, "key_chunk": key_chunk, "seed": seed, "index": index},
        ))
    return examples


def write_jsonl(examples: Iterable[QAExample], path: Path | None) -> None:
    """One JSON object per line; ``path`` None writes to standard output."""
    lines = [example.to_json() + "\n" for example in examples]
    if path is None:
        sys.stdout.writelines(lines)
    else:
        path.write_text("".join(lines), encoding="utf-8")


def read_jsonl(path: Path) -> list[QAExample]:
    return [QAExample.from_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Dump the synthetic associative-recall QA corpus as JSONL.")
    parser.add_argument("--n", type=int, default=400, help="number of questions (half inside, half cross)")
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED,
                        help=f"generator seed (held-out set: {HELDOUT_SEED}, validation: {VALIDATION_SEED})")
    parser.add_argument("--min-chunks", type=int, default=CorpusConfig.min_chunks)
    parser.add_argument("--max-chunks", type=int, default=CorpusConfig.max_chunks)
    parser.add_argument("--out", type=Path, default=None, help="output file (default: standard output)")
    args = parser.parse_args(argv)
    config = CorpusConfig(min_chunks=args.min_chunks, max_chunks=args.max_chunks)
    write_jsonl(generate_examples(args.n, args.seed, config), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
