"""Chat-template prompts on SmolLM2: the template's own rendering, split into opening, documents and closing."""
from __future__ import annotations

from typing import Any

import pytest

from ragkv.kvstore import ConfigError
from ragkv.middleware import PrepareRequest
from ragkv.middleware.generation import INCOMPLETE_CHARACTER, releasable
from ragkv.middleware.prompt_template import DEFAULT_SYSTEM, ChatTurn, DocumentLayout, PromptTemplate

DOCS = ["Brellinford is a small town on the river Asla.", "The mayor of Brellinford is Hella Strom."]


def _chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_prompt_is_the_chat_template_with_documents_in_the_system_turn(smollm2_engine: Any) -> None:
    engine = smollm2_engine
    tokenizer = engine.adapter.tokenizer
    prompt = engine.assemble(PrepareRequest(query="Who is the mayor?", chunks=DOCS))
    documents = "".join(d + "\n\n" for d in DOCS)
    expected = _chat(tokenizer, [{"role": "system", "content": f"{DEFAULT_SYSTEM}\n\nDocuments:\n{documents}"},
                                 {"role": "user", "content": "Who is the mayor?"}])
    assert tokenizer.decode(prompt.input_ids) == expected
    assert prompt.input_ids[0] == engine.adapter.start_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert prompt.input_ids.count(engine.adapter.start_token_id) == 3  # system, user, assistant: never doubled
    for seg, doc in zip(prompt.chunks, DOCS):  # each document tokenized alone, with the layout's separator
        assert list(seg.token_ids) == tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(list(prompt.query.token_ids)).startswith("<|im_end|>\n<|im_start|>user\nWho is")


def test_a_document_keeps_its_key_wherever_it_stands(smollm2_engine: Any) -> None:
    engine = smollm2_engine
    first = engine.assemble(PrepareRequest(query="Q1?", chunks=DOCS))
    history = (ChatTurn("user", "Hello"), ChatTurn("assistant", "Hi! Ask me about the documents."))
    second = engine.assemble(PrepareRequest(query="Another question?", chunks=DOCS[::-1], system="Be brief.",
                                            history=history))
    assert {s.key for s in first.chunks} == {s.key for s in second.chunks}
    assert [s.key for s in first.chunks] == [s.key for s in second.chunks][::-1]


def test_multi_turn_history_keeps_roles_and_order(smollm2_engine: Any) -> None:
    engine = smollm2_engine
    history = (ChatTurn("user", "Hello"), ChatTurn("assistant", "Hi there."), ChatTurn("user", "Thanks"),
               ChatTurn("assistant", "Anything else?"))
    prompt = engine.assemble(PrepareRequest(query="Who is the mayor?", chunks=DOCS, history=history))
    closing = engine.adapter.tokenizer.decode(list(prompt.query.token_ids))
    assert closing == ("<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>\n"
                       "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\nAnything else?<|im_end|>\n"
                       "<|im_start|>user\nWho is the mayor?<|im_end|>\n<|im_start|>assistant\n")


def test_documents_in_the_user_turn_with_a_header(smollm2_adapter: Any) -> None:
    tokenizer = smollm2_adapter.tokenizer
    layout = DocumentLayout(placement="user", header="Context:\n", footer="(end of context)")
    template = PromptTemplate(tokenizer, smollm2_adapter.start_token_id, layout)
    opening, closing = template.render("Who is the mayor?", system="Be brief.")
    assert opening == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nContext:\n"
    assert closing == "(end of context)\n\nWho is the mayor?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ConfigError, match="placement"):
        DocumentLayout(placement="assistant")


def test_a_system_text_written_as_chatml_gets_one_start_tag(smollm2_engine: Any) -> None:
    """Token-id prompts are laid out raw; a system text that already begins with the start token keeps one."""
    engine = smollm2_engine
    tokenizer = engine.adapter.tokenizer
    system = tokenizer("<|im_start|>system\nAnswer briefly.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    query = tokenizer("<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    prompt = engine.assemble(PrepareRequest(query=query["input_ids"], chunks=DOCS, system=system))
    assert prompt.input_ids[:2] != [engine.adapter.start_token_id] * 2
    assert prompt.input_ids[:len(system)] == system


@pytest.mark.parametrize(("text", "splits"), [("a€b", False), ("emoji 😀🎉 ok", True), ("中文测试，日本語", True),
                                              ("naïve café", False)])
def test_streamed_pieces_are_whole_characters(smollm2_adapter: Any, text: str, splits: bool) -> None:
    """Byte-level BPE splits multi-byte characters across tokens; decoding a prefix then ends in U+FFFD. The
    streamer releases text only up to whole characters, and the pieces join to the text."""
    tokenizer = smollm2_adapter.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    split_seen, pieces, emitted = False, [], 0
    for n in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:n])
        split_seen |= decoded.endswith(INCOMPLETE_CHARACTER)
        safe = releasable(decoded, emitted)
        pieces.append(decoded[emitted:safe])
        emitted = max(emitted, safe)
    assert "".join(pieces) == text
    assert all(INCOMPLETE_CHARACTER not in p for p in pieces)
    assert split_seen == splits  # the emoji and CJK cases do split characters across tokens
