"""The bundled model: loads offline as a plain HF Llama + tokenizer, and has learned the corpus task.

The smoke test runs full prefill on a few dozen held-out questions (the full 400-question report is in
middleware/bundled_model/README.md); the independent-reuse check confirms that the corpus separates
what chunk-independent KV can and cannot answer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from bench_modules import load_bench_module

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO_ROOT / "middleware" / "bundled_model"
SMOKE_QUESTIONS = 48


corpus = load_bench_module("quality_corpus")
check = load_bench_module("quality_reuse_check")


@pytest.fixture(scope="module")
def bundled() -> tuple[Any, Any]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        model = LlamaForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def heldout() -> list[Any]:
    return corpus.generate_examples(SMOKE_QUESTIONS, corpus.HELDOUT_SEED)


def test_artefacts_are_package_data_not_a_package() -> None:
    names = {path.name for path in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md"} <= names
    assert "__init__.py" not in names
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names)  # safetensors only
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 8 * 2**20


def test_model_loads_offline_as_llama(bundled: tuple[Any, Any]) -> None:
    from transformers import LlamaForCausalLM

    model, tokenizer = bundled
    assert isinstance(model, LlamaForCausalLM)
    config = model.config
    assert config.num_hidden_layers >= 6
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert next(model.parameters()).dtype == torch.float32
    assert config.vocab_size == len(tokenizer) == len(corpus.vocabulary())
    assert config.rope_parameters.get("rope_type", "default") == "default"


def test_tokenizer_is_word_level_with_bos(bundled: tuple[Any, Any]) -> None:
    _, tokenizer = bundled
    vocabulary = corpus.vocabulary()
    assert tokenizer.bos_token == corpus.BOS_TOKEN and tokenizer.pad_token == corpus.PAD_TOKEN
    assert tokenizer.convert_tokens_to_ids(vocabulary) == list(range(len(vocabulary)))
    text = "the report k12 v7 ; Q k12 ?"
    with_bos = tokenizer(text)["input_ids"]
    bare = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert with_bos == [tokenizer.bos_token_id] + bare
    assert bare == tokenizer.convert_tokens_to_ids(text.split())
    assert tokenizer.decode(bare) == text
    assert tokenizer("zebra", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]


def test_full_prefill_meets_the_bar_on_heldout(bundled: tuple[Any, Any], heldout: list[Any]) -> None:
    model, tokenizer = bundled
    accuracy = check.full_prefill_accuracy(model, tokenizer, heldout)
    assert accuracy.inside_total == accuracy.cross_total == SMOKE_QUESTIONS // 2
    assert accuracy.inside >= 0.90, accuracy
    assert accuracy.cross >= 0.80, accuracy


def test_batched_prefill_matches_one_at_a_time(bundled: tuple[Any, Any], heldout: list[Any]) -> None:
    """Right padding without a mask must not change answers (causal attention never looks ahead)."""
    model, tokenizer = bundled
    batched = check.full_prefill_answers(model, tokenizer, heldout[:8], batch_size=8)
    single = check.full_prefill_answers(model, tokenizer, heldout[:8], batch_size=1)
    assert batched == single


def test_rerotated_chunk_keys_equal_keys_computed_at_the_new_position(bundled: tuple[Any, Any]) -> None:
    """RoPE is a pure rotation: a chunk computed at positions 1.. and moved by d equals one computed at 1+d.."""
    model, tokenizer = bundled
    ids = tokenizer("the k3 v9 ; data k5 v1 ;", add_special_tokens=False)["input_ids"]
    shift = 37
    at_start = check.chunk_caches(model, tokenizer.bos_token_id, [ids], tokenizer.pad_token_id)[0]
    with torch.no_grad():
        input_ids = torch.tensor([[tokenizer.bos_token_id] + ids])
        positions = torch.arange(shift, shift + len(ids) + 1).unsqueeze(0)
        moved = model(input_ids=input_ids, position_ids=positions, use_cache=True).past_key_values
    frequencies = check.rope_inverse_frequencies(model)
    for (keys, values), layer in zip(at_start, moved.layers):
        torch.testing.assert_close(check.rotate_keys(keys, shift, frequencies), layer.keys[:, :, 1:],
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(values, layer.values[:, :, 1:], rtol=1e-4, atol=1e-4)


def test_independent_reuse_loses_cross_boundary_answers_only(bundled: tuple[Any, Any], heldout: list[Any]) -> None:
    """The corpus must test what CacheBlend fixes: chunk-alone KV keeps inside answers, loses cross ones."""
    model, tokenizer = bundled
    reuse = check.independent_reuse_accuracy(model, tokenizer, heldout)
    assert reuse.inside >= 0.85, reuse
    assert reuse.cross <= 0.35, reuse
