"""Prompts from the model's own chat template, split around the documents: opening, documents, closing.

A RAG prompt is rendered with the tokenizer's chat template (``apply_chat_template``), the documents standing
in one turn as a marker string. The rendered text is cut at the marker:

* the **opening**: everything before the documents (the system turn's start and its text, or, with
  ``placement="user"``, the system turn, earlier chat turns and the start of the last user turn);
* the **documents**: one chunk each, tokenized alone (each document's text plus the layout's ``separator``,
  so the same document gives the same tokens and key wherever it stands);
* the **closing**: the rest of that turn, the chat turns in order, the question and the assistant header.

The layout's ``header`` (before the documents) and ``footer`` (after them) belong to the template, not to a
chunk. A model whose tokenizer has no chat template gets the plain layout: start token + system text,
documents, then earlier turns as ``role: text`` lines and the question. The prompt begins with the model's
start token exactly once: a rendered opening that already starts with it (ChatML's ``<|im_start|>`` is
SmolLM2's BOS) is not given a second.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragkv.kvstore.errors import ConfigError

DOCUMENTS_MARKER = "\u2063RAGKV-DOCUMENTS\u2063"
PLACEMENTS = ("system", "user")
ROLES = ("user", "assistant")
DEFAULT_SYSTEM = "Answer the question using the documents. Answer in one short sentence."


@dataclass(frozen=True)
class ChatTurn:
    """One earlier turn of a conversation (the question itself is not a turn)."""

    role: str  # "user" | "assistant"
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"a chat turn's role must be one of {list(ROLES)}, got {self.role!r}")


@dataclass(frozen=True)
class DocumentLayout:
    """Where documents go and the template text around them.

    ``separator`` None means: ``"\\n\\n"`` for chat-template models and ``""`` for the plain layout (word-level
    toy tokenizers have no newline token). ``system`` None means ``DEFAULT_SYSTEM`` for chat-template models.
    """

    placement: str = "system"
    header: str = "Documents:\n"
    footer: str = ""
    separator: str | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")


@dataclass(frozen=True)
class PromptParts:
    """A prompt's token ids around its documents."""

    opening: list[int]  # begins with the start token
    closing: list[int]  # non-empty


class PromptTemplate:
    """Renders and splits prompts for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: Any, start_token_id: int, layout: DocumentLayout = DocumentLayout(),
                 chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.start_token_id = start_token_id
        self.layout = layout
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.separator = layout.separator if layout.separator is not None else ("\n\n" if self.chat_template else "")

    @property
    def uses_chat_template(self) -> bool:
        return bool(self.chat_template)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def document_text(self, text: str) -> str:
        """The text a document is tokenized from: itself plus the separator."""
        return text + self.separator

    def with_start(self, ids: Sequence[int]) -> list[int]:
        """``ids`` beginning with the start token exactly once."""
        ids = list(ids)
        return ids if ids[:1] == [self.start_token_id] else [self.start_token_id] + ids

    def render(self, question: str, system: str | None = None, history: Sequence[ChatTurn] = ()) -> tuple[str, str]:
        """(opening text, closing text) of a prompt, cut where the documents go."""
        if not self.uses_chat_template:
            opening = system or ""
            lines = "".join(f"{t.role}: {t.content}\n" for t in history)
            return opening, lines + question
        layout = self.layout
        system_text = system if system is not None else (layout.system or DEFAULT_SYSTEM)
        block = layout.header + DOCUMENTS_MARKER + layout.footer
        messages: list[dict[str, str]] = []
        if layout.placement == "system":
            messages.append({"role": "system", "content": f"{system_text}\n\n{block}" if system_text else block})
            messages += [{"role": t.role, "content": t.content} for t in history]
            messages.append({"role": "user", "content": question})
        else:
            if system_text:
                messages.append({"role": "system", "content": system_text})
            messages += [{"role": t.role, "content": t.content} for t in history]
            messages.append({"role": "user", "content": f"{block}\n\n{question}"})
        rendered = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
        if not isinstance(rendered, str) or rendered.count(DOCUMENTS_MARKER) != 1:
            raise ConfigError("the chat template did not render the documents block exactly once")
        opening, closing = rendered.split(DOCUMENTS_MARKER)
        return opening, closing

    def parts(self, question: str, system: str | None = None, history: Sequence[ChatTurn] = ()) -> PromptParts:
        """Token ids of the opening (with the start token once) and the closing."""
        if DOCUMENTS_MARKER in question or (system and DOCUMENTS_MARKER in system):
            raise ConfigError("the text holds ragkv's documents marker")
        opening, closing = self.render(question, system, history)
        closing_ids = self.encode(closing)
        if not closing_ids:
            raise ConfigError("the question must contain at least one token")
        return PromptParts(self.with_start(self.encode(opening) if opening else []), closing_ids)


__all__ = ["DEFAULT_SYSTEM", "DOCUMENTS_MARKER", "PLACEMENTS", "ChatTurn", "DocumentLayout", "PromptParts",
           "PromptTemplate"]
