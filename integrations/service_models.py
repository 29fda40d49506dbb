"""Request and response bodies of the REST service (pydantic), shared by the app and its OpenAPI schema.

The schema's static bounds are generous sanity limits that keep schema-driven clients honest; the
configured limits (``ServiceLimits``) are checked by the handlers and answered with 422 naming the limit.
ragkv's own bodies forbid unknown fields (a typo is an error, not a silent default); the OpenAI-compatible
chat body ignores them, as OpenAI clients send many fields this server has no use for.
"""
from __future__ import annotations

from typing import Any, Literal

try:
    from pydantic import BaseModel, ConfigDict, Field, model_validator
except ImportError as exc:  # pragma: no cover - pydantic comes with fastapi
    raise ImportError("the ragkv service needs fastapi and uvicorn: pip install 'ragkv[service]'") from exc

KEY_PATTERN = r"^[A-Za-z0-9._-]{1,64}:[A-Za-z0-9._-]{1,128}$"
from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.prompt_template import ChatTurn

MAX_SCHEMA_TEXT = 1_000_000
MAX_SCHEMA_ITEMS = 4096


class ErrorBody(BaseModel):
    detail: Any = Field(description="What was wrong: a message, or a list of validation errors")


class DocumentRef(BaseModel):
    """A document by text or by the key of a chunk already stored (own or shared namespace)."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(default=None, min_length=1, max_length=MAX_SCHEMA_TEXT)
    key: str | None = Field(default=None, pattern=KEY_PATTERN, description="'<namespace>:<name>'")

    @model_validator(mode="after")
    def _exactly_one(self) -> DocumentRef:
        if (self.text is None) == (self.key is None):
            raise ValueError("a document has exactly one of 'text' or 'key'")
        return self


DocumentField = str | DocumentRef


class WarmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, max_length=MAX_SCHEMA_ITEMS,
                             description="Chunk texts; each is tokenized alone and its KV computed and stored")
    shared: bool = Field(default=False, description="Store in the shared namespace (publish) instead of the tenant's")
    ttl_s: float | None = Field(default=None, gt=0, le=10 * 365 * 86400)
    pin: bool = Field(default=False, description="Never evict these chunks")


class WarmResponse(BaseModel):
    keys: list[str]
    namespace: str
    computed: int
    already_cached: int
    seconds: float


class LookupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[str] = Field(min_length=1, max_length=MAX_SCHEMA_ITEMS)


class LookupResult(BaseModel):
    key: str
    present: bool
    tier: str | None = Field(description="Fastest tier holding the chunk, or null")


class LookupResponse(BaseModel):
    results: list[LookupResult]


class ChunkPutResponse(BaseModel):
    key: str
    bytes: int
    tokens: int
    codec: str


class SamplingFields(BaseModel):
    temperature: float | None = Field(default=None, ge=0, le=5, description="0 or null: greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1, le=1000)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


class GenerationFields(SamplingFields):
    strategy: str | None = Field(default=None, max_length=64,
                                 description="full | prefix | reuse | blend | compress | auto (default blend)")
    strategy_params: dict[str, Any] = Field(default_factory=dict,
                                            description="The strategy's config fields, e.g. {\"ratio\": 0.15}")
    shared: bool = Field(default=False, description="Look chunks up in, and store misses to, the shared namespace")


class ChatTurnIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str = Field(max_length=MAX_SCHEMA_TEXT)


class PromptFields(GenerationFields):
    query: str = Field(min_length=1, max_length=MAX_SCHEMA_TEXT)
    history: list[ChatTurnIn] = Field(default_factory=list, max_length=MAX_SCHEMA_ITEMS,
                                      description="Earlier chat turns, in order (the query is the last user turn)")
    documents: list[DocumentField] = Field(default_factory=list, max_length=MAX_SCHEMA_ITEMS)
    system: str | None = Field(default=None, max_length=MAX_SCHEMA_TEXT)


class GenerateRequest(PromptFields):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int | None = Field(default=None, ge=1, le=100_000,
                                       description="Default: 64, or the server's limit when lower")
    stop: list[str] = Field(default_factory=list, max_length=16)
    stream: bool = Field(default=False, description="Stream tokens as server-sent events")


class PrefillRequest(PromptFields):
    """Prepare a prompt and publish it for a decode worker (sampling fields are given to ``/v1/decode``)."""

    model_config = ConfigDict(extra="forbid")
    ttl_s: float = Field(default=600.0, gt=0, le=86400, description="How long the hand-off waits to be decoded")


class DecodeRequest(SamplingFields):
    """Decode from a hand-off published by ``/v1/prefill`` (of the same tenant); a handle is used once."""

    model_config = ConfigDict(extra="forbid")
    handle: str = Field(pattern=KEY_PATTERN, description="'<namespace>:handoff-<hex>' from /v1/prefill")
    max_new_tokens: int | None = Field(default=None, ge=1, le=100_000,
                                       description="Default: 64, or the server's limit when lower")
    stop: list[str] = Field(default_factory=list, max_length=16)


class DocumentOutcome(BaseModel):
    index: int
    key: str
    tokens: int
    hit: bool = Field(description="Served from the store")
    tier: str | None
    codec: str | None
    source: str = Field(description="store | computed | near-duplicate | prefix | text | dropped | skipped")
    recomputed_tokens: int
    load_ms: float
    near_duplicate_of: str | None = Field(default=None, description="the stored chunk a miss was repaired from")
    repaired_tokens: int = Field(default=0, description="tokens computed when repairing a near-duplicate")
    abstract_gap: float | None = Field(default=None, description="how far the chunk's abstract bound stayed below "
                                       "the best chunk's (<= 0); a chunk below the threshold is skipped, not fetched")


class PrefillResponse(BaseModel):
    handle: str = Field(description="Pass to /v1/decode (on any server of the same model and store)")
    prompt_tokens: int
    strategy: str
    stored_bytes: int = Field(description="Decoded size of the published KV")
    ttl_s: float
    timings_ms: dict[str, float]
    documents: list[DocumentOutcome]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    answer: str
    finish_reason: str
    strategy: str
    model: str
    ttft_ms: float
    total_ms: float
    timings_ms: dict[str, float] = Field(description="TTFT split: gather, compute, load_wait, prepare, first_token")
    documents: list[DocumentOutcome]
    usage: Usage


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_SCHEMA_TEXT)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(default=False, description="Send a last chunk with the token usage")


class ChatCompletionRequest(GenerationFields):
    """OpenAI's chat completion body plus ``documents`` (and ragkv's strategy fields); other fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(default=None, max_length=256)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_SCHEMA_ITEMS)
    documents: list[DocumentField] = Field(default_factory=list, max_length=MAX_SCHEMA_ITEMS)
    max_tokens: int | None = Field(default=None, ge=1, le=100_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=100_000)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only 1 is supported")

    def turns(self) -> tuple[str | None, tuple[ChatTurn, ...], str]:
        """(system text, earlier turns in order, the question). System and developer messages make the system
        text; the last other message must be the user's question; tool results count as user turns."""
        system = "\n".join(m.text() for m in self.messages if m.role in ("system", "developer")) or None
        dialogue = [m for m in self.messages if m.role not in ("system", "developer")]
        if not dialogue or dialogue[-1].role not in ("user", "tool") or not dialogue[-1].text().strip():
            raise ConfigError("the last message must be the user's question (non-empty)")
        history = tuple(ChatTurn("assistant" if m.role == "assistant" else "user", m.text())
                        for m in dialogue[:-1] if m.text())
        return system, history, dialogue[-1].text()


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str


class RagkvExtras(BaseModel):
    ttft_ms: float
    timings_ms: dict[str, float]
    strategy: str
    documents: list[DocumentOutcome]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    ragkv: RagkvExtras


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: dict[str, Any]
    store: str
    auth: bool
    sample_corpus: dict[str, Any] | None


__all__ = [
    "KEY_PATTERN",
    "ChatChoice",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessageIn",
    "ChatMessageOut",
    "ChatTurnIn",
    "ChunkPutResponse",
    "DecodeRequest",
    "DocumentField",
    "DocumentOutcome",
    "DocumentRef",
    "ErrorBody",
    "GenerateRequest",
    "GenerateResponse",
    "HealthResponse",
    "LookupRequest",
    "LookupResponse",
    "LookupResult",
    "ModelCard",
    "ModelList",
    "PrefillRequest",
    "PrefillResponse",
    "RagkvExtras",
    "StreamOptions",
    "Usage",
    "WarmRequest",
    "WarmResponse",
]
