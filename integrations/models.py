"""Which model the integrations serve, and the adapter over it.

``load_model(name_or_path)`` is the middleware's registry (``ragkv.middleware.model_registry``): None or
``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (the default), ``toy`` the self-trained synthetic-task
model, anything else a local HuggingFace folder. ``build_random_model`` makes small random-initialised
Llamas with a word-level tokenizer, labelled as such in ``ModelInfo.label``, for tests and timing benches.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.model_registry import (
    DEFAULT_MODEL,
    KIND_BUNDLED,
    KIND_LOCAL,
    KIND_RANDOM,
    KIND_REGISTRY,
    TOY_MODEL,
    LoadedModel,
    ModelInfo,
    load_model,
    toy_model_dir,
)

log = logging.getLogger(__name__)

RANDOM_MODEL_LABEL = "random-initialised stand-in (untrained: answers are noise)"


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the extra is part of every dev install
        raise ImportError("ragkv's model support needs transformers: pip install 'ragkv[model]'") from exc
    return transformers


def word_tokenizer(vocabulary: Sequence[str], bos: str = "<bos>", eos: str = "<eos>", pad: str = "<pad>",
                   unk: str = "<unk>", max_length: int = 2048) -> Any:
    """A whitespace word-level HF tokenizer over ``vocabulary`` (the specials must be in it)."""
    _require_transformers()
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in vocabulary:
        vocab.setdefault(word, len(vocab))
    missing = [s for s in (bos, eos, pad, unk) if s not in vocab]
    if missing:
        raise ConfigError(f"the vocabulary lacks the special tokens {missing}")
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk, model_max_length=max_length)


def build_random_model(vocabulary: Sequence[str] | None = None, *, layers: int = 4, hidden: int = 128,
                       heads: int = 4, kv_heads: int = 2, intermediate: int = 256, max_positions: int = 2048,
                       seed: int = 0) -> LoadedModel:
    """A small random-initialised Llama (deterministic in ``seed``) with a word-level tokenizer.

    The default vocabulary is the sample corpus's, so the sample questions tokenize without unknown words.
    Deterministic weights give a stable fingerprint, so chunks cached on disk survive a restart.
    """
    transformers = _require_transformers()
    import torch

    if vocabulary is None:
        from ragkv.integrations.sample_corpus import load_sample_corpus

        vocabulary = load_sample_corpus(1).vocabulary
    tokenizer = word_tokenizer(vocabulary, max_length=max_positions)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=max_positions, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    params = sum(p.numel() for p in model.parameters())
    info = ModelInfo(name=f"random-llama-{layers}x{hidden}", kind=KIND_RANDOM, label=RANDOM_MODEL_LABEL, path=None,
                     parameters=params)
    return LoadedModel(model, tokenizer, info)


def make_adapter(loaded: LoadedModel, start_token_id: int | None = None) -> Any:
    """The middleware's adapter for ``loaded`` (its name goes into the fingerprint). Models without a BOS token
    or a family start token chunk behind their EOS token unless ``start_token_id`` names another."""
    from ragkv.middleware.adapter import ModelAdapter
    from ragkv.middleware.families import check_config

    tokenizer = loaded.tokenizer
    family_start = check_config(loaded.model.config).family.start_token
    if (start_token_id is None and getattr(tokenizer, "bos_token_id", None) is None
            and getattr(loaded.model.config, "bos_token_id", None) is None
            and (family_start is None or family_start not in tokenizer.get_vocab())):
        start_token_id = getattr(tokenizer, "eos_token_id", None)
    return ModelAdapter(loaded.model, tokenizer, start_token_id=start_token_id, model_id=loaded.info.name,
                        weights_digest=loaded.weights_digest)


__all__ = [
    "DEFAULT_MODEL",
    "KIND_BUNDLED",
    "KIND_LOCAL",
    "KIND_RANDOM",
    "KIND_REGISTRY",
    "RANDOM_MODEL_LABEL",
    "TOY_MODEL",
    "LoadedModel",
    "ModelInfo",
    "build_random_model",
    "load_model",
    "make_adapter",
    "toy_model_dir",
    "word_tokenizer",
]
