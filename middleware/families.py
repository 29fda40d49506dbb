"""Which HuggingFace decoders the adapter drives exactly, and the checks that refuse the rest.

Supported: the Llama family as transformers 5 implements it — ``llama``, ``qwen2``, ``qwen3`` (per-head
q/k RMS norms before RoPE) and ``mistral`` — loaded as ``*ForCausalLM``.

RoPE policy (keys are cached post-RoPE and moved by rotating them, so RoPE must be a pure rotation linear
in position, ``R(p + d) = R(d) R(p)``, with a fixed frequency per channel pair and no magnitude scaling):

* accepted: ``default``; ``linear`` (positions divided by a constant: still linear); ``llama3`` (a fixed,
  per-frequency rescaling computed once from the config: still one fixed frequency per channel pair).
* refused: ``dynamic`` (NTK: frequencies change with the sequence length), ``yarn`` and ``longrope``
  (cos/sin magnitude scaling, or frequencies switching with length), any other type, a
  ``partial_rotary_factor`` below 1, and any rotary module whose ``attention_scaling`` is not 1.

Sliding-window attention: for a sequence no longer than the window, sliding-window attention is
identical to full causal attention (every key is inside the window). Models with a window (Mistral v0.1's
4096, Qwen with ``use_sliding_window``) are therefore accepted with ``max_length = window``; any prompt or
generation that would exceed it raises ``ContextTooLong``. Everything else is refused with
``UnsupportedModel`` naming what is supported.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ragkv.middleware.errors import UnsupportedModel

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")


@dataclass(frozen=True)
class FamilySpec:
    """What differs between the supported families (the layer code is otherwise shared).

    ``start_token``: the token chunks are computed behind when the tokenizer and config name no BOS (Qwen's
    ``<|endoftext|>``). ``chat_template``: the family's chat format, used when a tokenizer that knows its
    ``chat_tokens`` ships no template of its own. ``rope_types``: the RoPE kinds whose keys can be moved by
    rotation for this family.
    """

    model_type: str
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    start_token: str | None = None
    chat_template: str | None = None
    chat_tokens: tuple[str, ...] = ()
    rope_types: tuple[str, ...] = SUPPORTED_ROPE_TYPES

    def fallback_chat_template(self, tokenizer: Any) -> str | None:
        """The family's template when ``tokenizer`` has none of its own but knows the family's chat tokens."""
        if self.chat_template is None or tokenizer is None:
            return None
        vocab = tokenizer.get_vocab()
        return self.chat_template if all(t in vocab for t in self.chat_tokens) else None


_CHATML = {"chat_template": CHATML_TEMPLATE, "chat_tokens": ("<|im_start|>", "<|im_end|>")}
FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec("llama"),
    "qwen2": FamilySpec("qwen2", start_token="<|endoftext|>", **_CHATML),
    "qwen3": FamilySpec("qwen3", qk_norm=True, start_token="<|endoftext|>", **_CHATML),
    "mistral": FamilySpec("mistral"),
}
_REFUSED_ROPE_REASONS = {
    "dynamic": "dynamic NTK scaling changes the frequencies with the sequence length",
    "yarn": "YaRN scales the cos/sin magnitude (and mixes frequencies), so a cached key is not a pure rotation",
    "longrope": "LongRoPE switches frequency sets with the sequence length and scales the magnitude",
}


def supported_summary() -> str:
    return (f"supported: model_type in {sorted(FAMILIES)} loaded as *ForCausalLM, rope_type in "
            f"{list(SUPPORTED_ROPE_TYPES)} with full rotary dimension and no magnitude scaling")


@dataclass(frozen=True)
class ModelCheck:
    """The outcome of checking a model: its family and the longest sequence it computes exactly."""

    family: FamilySpec
    max_length: int | None  # None: bounded only by the model's position embeddings
    rope_type: str


def _rope_parameters(config: Any) -> Mapping[str, Any]:
    params = getattr(config, "rope_parameters", None)
    if params is None:
        return {"rope_type": "default"}
    if not isinstance(params, Mapping):
        raise UnsupportedModel(f"rope_parameters of type {type(params).__name__} is not understood; "
                               + supported_summary())
    if "rope_type" not in params and "type" not in params and any(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedModel("per-layer-type RoPE parameters are not supported; " + supported_summary())
    return params


def check_config(config: Any) -> ModelCheck:
    """Refuse configs the adapter cannot compute exactly; return the family and the exact-length limit."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise UnsupportedModel(f"model_type {model_type!r} is not supported; " + supported_summary())

    params = _rope_parameters(config)
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in family.rope_types:
        reason = _REFUSED_ROPE_REASONS.get(rope_type, "its position encoding is not a fixed rotation per channel pair")
        raise UnsupportedModel(f"rope_type {rope_type!r} is refused: {reason}; cached keys could not be moved "
                               f"to new positions by rotation. " + supported_summary())
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModel(f"partial rotary embeddings (partial_rotary_factor={partial}) are refused; "
                               + supported_summary())

    max_length: int | None = None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise UnsupportedModel(f"layer types {unknown} are not supported (only full and sliding-window "
                                   f"attention); " + supported_summary())
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and (
        model_type == "mistral" or (layer_types is not None and "sliding_attention" in layer_types))
    if uses_window:
        if not isinstance(window, int) or window < 1:
            raise UnsupportedModel(f"sliding_window={window!r} is not understood; " + supported_summary())
        max_length = int(window)
    return ModelCheck(family, max_length, rope_type)


def check_model_modules(model: Any) -> None:
    """The adapter drives these modules directly; refuse models that do not have them."""
    base = getattr(model, "model", None)
    if base is None or getattr(model, "lm_head", None) is None:
        raise UnsupportedModel(f"{type(model).__name__} has no .model/.lm_head; load the model as "
                               f"*ForCausalLM (AutoModelForCausalLM). " + supported_summary())
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if getattr(base, name, None) is None:
            raise UnsupportedModel(f"{type(model).__name__}.model has no {name}; " + supported_summary())
    rotary = base.rotary_emb
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if scaling != 1.0:
        raise UnsupportedModel(f"the rotary embedding scales cos/sin by {scaling} (magnitude scaling); "
                               + supported_summary())
    for i, layer in enumerate(base.layers):
        attn = getattr(layer, "self_attn", None)
        needed = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or any(getattr(attn, n, None) is None for n in needed):
            raise UnsupportedModel(f"layer {i} has no self_attn with q/k/v/o projections; " + supported_summary())
        for n in ("mlp", "input_layernorm", "post_attention_layernorm"):
            if getattr(layer, n, None) is None:
                raise UnsupportedModel(f"layer {i} has no {n}; " + supported_summary())


__all__ = [
    "FAMILIES",
    "SUPPORTED_ROPE_TYPES",
    "FamilySpec",
    "ModelCheck",
    "check_config",
    "check_model_modules",
    "supported_summary",
]
