"""The fingerprint covers every weight and the model's name; families bring their start token and chat format."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.families import CHATML_TEMPLATE, FAMILIES, check_config
from ragkv.middleware.prompt_template import PromptTemplate


def test_a_change_to_any_weight_changes_the_fingerprint(model_factory: Any, word_tokenizer: Any) -> None:
    model = model_factory("llama", seed=7)
    before = ModelAdapter(model, word_tokenizer).fingerprint
    assert ModelAdapter(model, word_tokenizer).fingerprint == before  # stable
    with torch.no_grad():  # one element in the middle of a middle layer's MLP: no sample would see it
        weight = model.model.layers[len(model.model.layers) // 2].mlp.up_proj.weight
        weight[weight.shape[0] // 2, weight.shape[1] // 2] += 1e-3
    assert ModelAdapter(model, word_tokenizer).fingerprint != before


def test_the_model_name_is_part_of_the_fingerprint(model_factory: Any, word_tokenizer: Any) -> None:
    model = model_factory("llama", seed=7)
    a = ModelAdapter(model, word_tokenizer, model_id="one").fingerprint
    assert a != ModelAdapter(model, word_tokenizer, model_id="two").fingerprint


def test_qwen_families_chunk_behind_endoftext_and_speak_chatml(model_factory: Any) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "a"])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>")
    model = model_factory("qwen2", seed=2)
    model.config.bos_token_id = None
    adapter = ModelAdapter(model, tokenizer)
    assert adapter.start_token_id == vocab["<|endoftext|>"]
    family = check_config(model.config).family
    assert family is FAMILIES["qwen2"] and family.fallback_chat_template(tokenizer) == CHATML_TEMPLATE
    template = PromptTemplate(tokenizer, adapter.start_token_id, chat_template=family.fallback_chat_template(tokenizer))
    opening, closing = template.render("a", system="a")
    assert opening.startswith("<|im_start|>system\na") and closing.endswith("<|im_start|>assistant\n")
    assert FAMILIES["llama"].fallback_chat_template(tokenizer) is None


@pytest.mark.parametrize("rope", ["dynamic", "yarn"])
def test_rope_kinds_come_from_the_family(rope: str) -> None:
    from transformers import LlamaConfig

    from ragkv.middleware.errors import UnsupportedModel

    config = LlamaConfig(rope_parameters={"rope_type": rope, "rope_theta": 10000.0, "factor": 2.0})
    assert rope not in FAMILIES["llama"].rope_types
    with pytest.raises(UnsupportedModel, match=rope):
        check_config(config)
