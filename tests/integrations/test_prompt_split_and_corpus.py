"""Finding retrieved documents inside a formatted prompt; reading corpora; the progress bar."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from ragkv.integrations.backends import DocumentRegistry, split_prompt
from ragkv.integrations.corpus import ProgressBar, read_corpus, split_text
from ragkv.kvstore import ConfigError


def test_split_around_documents() -> None:
    docs = ["k1 v2 ; the", "k3 v4 ; of"]
    prompt = "Answer from the context.\n\nk1 v2 ; the\n\nk3 v4 ; of\n\nQ k1 ?"
    split = split_prompt(prompt, docs)
    assert split.system == "Answer from the context." and split.chunks == docs and split.query == "Q k1 ?"


def test_labels_between_documents_become_chunks_and_order_follows_the_prompt() -> None:
    prompt = "Doc A: beta text\nDoc B: alpha text\nquestion?"
    split = split_prompt(prompt, ["alpha text", "beta text"])
    assert split.system == "Doc A:" and split.chunks == ["beta text", "Doc B:", "alpha text"]
    assert split.query == "question?"


def test_longest_document_wins_and_occurrences_do_not_overlap() -> None:
    split = split_prompt("x abc abcdef y", ["abc", "abcdef"])
    assert split.chunks == ["abc", "abcdef"] and split.query == "y"
    repeated = split_prompt("ctx ctx q", ["ctx"])
    assert repeated.chunks == ["ctx", "ctx"] and repeated.query == "q"


def test_no_documents_and_trailing_document() -> None:
    assert split_prompt("  just a question ", ["absent"]).query == "just a question"
    trailing = split_prompt("sys doc-one", ["doc-one"])
    assert trailing.system == "sys" and trailing.chunks == [] and trailing.query == "doc-one"


def test_registry_is_a_bounded_lru() -> None:
    registry = DocumentRegistry(max_texts=3)
    registry.add(["a", "b", "c", " "])
    registry.add(["a", "d"])
    assert registry.texts() == ["d", "a", "c"] and len(registry) == 3


def test_read_corpus_directory_text_and_jsonl(corpus_dir: Path, tmp_path: Path) -> None:
    assert read_corpus(corpus_dir) == ["k1 v2 ; the k3 v4 ;", "k5 v6 ; of k7 v8 ;", "k9 v10 ; and k11 v12 ;"]
    assert len(read_corpus(corpus_dir, split="file")) == 2
    assert read_corpus(corpus_dir / "a.txt") == ["k1 v2 ; the k3 v4 ;", "k5 v6 ; of k7 v8 ;"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join([json.dumps("one"), json.dumps({"text": "two"}), json.dumps({"body": "three"}),
                                json.dumps({"chunks": ["four", "one"]}), ""]))
    with pytest.raises(ConfigError, match="c.jsonl:3"):
        read_corpus(jsonl)
    jsonl.write_text("\n".join([json.dumps("one"), json.dumps({"body": "two"}), json.dumps({"chunks": ["x", "one"]})]))
    assert read_corpus(jsonl, text_field="body") == ["one", "two", "x"]
    with pytest.raises(ConfigError):
        read_corpus(tmp_path / "missing")
    with pytest.raises(ConfigError):
        split_text("x", split="sentence")


def test_read_corpus_rejects_bad_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        read_corpus(bad)


def test_progress_bar_prints_deciles_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = ProgressBar(100, "warm", out=out)
    for _ in range(100):
        bar.update(1, "x computed")
    bar.close()
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 12 and "100/100" in lines[-1] and "x computed" in lines[-1]
