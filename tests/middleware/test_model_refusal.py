"""Models the adapter cannot drive exactly are refused with an error naming what is supported."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ragkv.kvstore.errors import ConfigError, RagKVError
from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.errors import ContextTooLong, UnsupportedModel
from ragkv.middleware.families import check_config


def test_other_architecture_refused(word_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=204))
    with pytest.raises(UnsupportedModel, match="supported: model_type in") as info:
        ModelAdapter(model, word_tokenizer)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, RagKVError)


@pytest.mark.parametrize("rope", [
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 256},
])
def test_non_rotation_rope_refused(rope, model_factory, word_tokenizer):
    with pytest.raises(UnsupportedModel, match=rope["rope_type"]):
        ModelAdapter(model_factory("llama", rope_parameters=rope), word_tokenizer)


def test_partial_rotary_refused():
    config = SimpleNamespace(model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                  "partial_rotary_factor": 0.5})
    with pytest.raises(UnsupportedModel, match="partial"):
        check_config(config)


def test_linear_rope_accepted(model_factory, word_tokenizer):
    model = model_factory("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    adapter = ModelAdapter(model, word_tokenizer)
    ids = torch.randint(4, 200, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert (adapter.logits(adapter.prefill(ids).hidden) - ref).abs().max() <= 1e-4


def test_base_model_without_head_refused(model_factory, word_tokenizer):
    model = model_factory("llama")
    with pytest.raises(UnsupportedModel, match="ForCausalLM"):
        ModelAdapter(model.model, word_tokenizer)


def test_sliding_window_limits_length(model_factory, word_tokenizer):
    model = model_factory("mistral", sliding_window=16)
    adapter = ModelAdapter(model, word_tokenizer)
    assert adapter.max_length == 16
    ids = torch.randint(4, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert (adapter.logits(adapter.prefill(ids).hidden) - ref).abs().max() <= 1e-4  # within the window: exact
    with pytest.raises(ContextTooLong, match="sliding window"):
        adapter.prefill(torch.randint(4, 200, (1, 17)))


def test_qwen_sliding_layers_limit_length(model_factory, word_tokenizer):
    model = model_factory("qwen2", use_sliding_window=True, sliding_window=12, max_window_layers=1)
    assert "sliding_attention" in model.config.layer_types
    assert ModelAdapter(model, word_tokenizer).max_length == 12


def test_model_without_start_token_needs_one(model_factory):
    model = model_factory("qwen2", bos_token_id=None)
    with pytest.raises(ConfigError, match="start_token_id"):
        ModelAdapter(model, None)
    assert ModelAdapter(model, None, start_token_id=2).start_token_id == 2
