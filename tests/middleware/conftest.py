"""Fixtures for the middleware tests: tiny random Llama-family models and a word-level tokenizer.

Nothing is downloaded: models are built from configs with random weights, re-initialised at a scale that
gives O(1) logits (transformers' default init makes every logit nearly zero, which would hide errors).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

torch.set_num_threads(2)

VOCAB_WORDS = 200
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def _word_tokenizer() -> Any:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for i in range(VOCAB_WORDS):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def word_tokenizer() -> Any:
    return _word_tokenizer()


FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    # name -> (config class name, kwargs); GQA everywhere, tied and untied heads, different rope_theta
    "llama": {"cls": "LlamaConfig", "tie_word_embeddings": True,
              "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
    "llama_untied_llama3rope": {"cls": "LlamaConfig", "tie_word_embeddings": False, "max_position_embeddings": 4096,
                                "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 256}},
    "qwen2": {"cls": "Qwen2Config", "tie_word_embeddings": True,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    "qwen3": {"cls": "Qwen3Config", "tie_word_embeddings": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}},
    "mistral": {"cls": "MistralConfig", "tie_word_embeddings": False, "sliding_window": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}},
}
_MODEL_CLASSES = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
                  "Qwen3Config": "Qwen3ForCausalLM", "MistralConfig": "MistralForCausalLM"}


def _reinit(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def build_model(family: str = "llama", *, seed: int = 0, layers: int = 3, dtype: torch.dtype = torch.float32,
                **overrides: Any) -> Any:
    import transformers

    spec = dict(FAMILY_CONFIGS[family])
    cls_name = spec.pop("cls")
    kwargs: dict[str, Any] = {
        "vocab_size": len(SPECIALS) + VOCAB_WORDS, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
    }
    kwargs.update(spec)
    kwargs.update(overrides)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, _MODEL_CLASSES[cls_name])(config)
    _reinit(model, seed)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def model_factory() -> Callable[..., Any]:
    return build_model


@pytest.fixture(scope="session")
def llama_adapter(word_tokenizer: Any) -> Any:
    from ragkv.middleware.adapter import ModelAdapter

    return ModelAdapter(build_model("llama", seed=1), word_tokenizer)


def words(start: int, n: int) -> str:
    """A text of n distinct-ish words, deterministic in start."""
    return " ".join(f"w{(start + 7 * i) % VOCAB_WORDS}" for i in range(n))


@pytest.fixture(scope="session")
def make_words() -> Callable[[int, int], str]:
    return words



@pytest.fixture()
def host_engine(word_tokenizer: Any) -> Any:
    """A fresh engine over a 4-layer Llama and an empty host tier."""
    from ragkv.kvstore.tiers import HostConfig, HostTier
    from ragkv.middleware.adapter import ModelAdapter
    from ragkv.middleware.engine import ContextEngine

    return ContextEngine(ModelAdapter(build_model("llama", seed=1, layers=4), word_tokenizer), HostTier(HostConfig()))


@pytest.fixture()
def rag_request() -> Any:
    from ragkv.middleware.context import PrepareRequest

    return PrepareRequest(query=words(1, 5), chunks=[words(10, 12), words(30, 9), words(50, 14)], system=words(90, 4))
