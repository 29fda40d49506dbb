"""The adapter's layer-by-layer prefill equals the model's own forward, for every supported family."""
from __future__ import annotations

import pytest
import torch

from ragkv.middleware.adapter import ModelAdapter, exact_causal_mask

FAMILIES = ["llama", "llama_untied_llama3rope", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_prefill_matches_model_forward(family, model_factory, word_tokenizer):
    model = model_factory(family, seed=3)
    adapter = ModelAdapter(model, word_tokenizer)
    ids = torch.randint(4, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True)
    out = adapter.prefill(ids)
    logits = adapter.logits(out.hidden)
    assert ref.logits.abs().max() > 1.0  # the random model is not degenerate
    assert (logits - ref.logits.float()).abs().max().item() <= 1e-4
    # the KV is the model's own cache
    for layer in range(adapter.num_layers):
        assert torch.allclose(out.kv[layer, 0], ref.past_key_values.layers[layer].keys, atol=1e-5)
        assert torch.allclose(out.kv[layer, 1], ref.past_key_values.layers[layer].values, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefill_with_past_matches_single_pass(family, model_factory, word_tokenizer):
    adapter = ModelAdapter(model_factory(family, seed=4), word_tokenizer)
    ids = torch.randint(4, 200, (1, 30), generator=torch.Generator().manual_seed(1))
    whole = adapter.prefill(ids)
    first = adapter.prefill(ids[:, :18])
    second = adapter.prefill(ids[:, 18:], start_position=18, past=first.kv)
    assert torch.allclose(adapter.logits(second.hidden), adapter.logits(whole.hidden[:, 18:]), atol=1e-4)
    assert torch.allclose(torch.cat((first.kv, second.kv), dim=4), whole.kv, atol=1e-5)


def test_selected_rows_with_exact_mask_match_full(model_factory, word_tokenizer):
    """Rows chosen anywhere in the sequence, computed against the exact K/V of a layer, reproduce the exact
    next-layer hidden states (a bottom-right mask would let early rows see later keys and fail)."""
    model = model_factory("qwen2", seed=5)
    adapter = ModelAdapter(model, word_tokenizer)
    ids = torch.randint(4, 200, (1, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=True)
    rows = torch.tensor([0, 3, 9, 10, 17])
    positions = torch.arange(25)
    for layer in range(adapter.num_layers):
        hidden_in = ref.hidden_states[layer][:, rows]
        q, k, _v = adapter.project(layer, hidden_in, adapter.rope(positions[rows]))
        cache = ref.past_key_values.layers[layer]
        assert torch.allclose(k, cache.keys[:, :, rows], atol=1e-5)
        out = adapter.attend(layer, hidden_in, q, cache.keys, cache.values,
                             mask=exact_causal_mask(positions[rows], positions))
        if layer + 1 < adapter.num_layers:
            assert torch.allclose(out, ref.hidden_states[layer + 1][:, rows], atol=1e-4)
        else:
            assert torch.allclose(adapter.logits(out), ref.logits[:, rows], atol=1e-4)


def test_fingerprint_is_stable_and_distinguishes(model_factory, word_tokenizer):
    a = ModelAdapter(model_factory("llama", seed=7), word_tokenizer)
    b = ModelAdapter(model_factory("llama", seed=7), word_tokenizer)
    c = ModelAdapter(model_factory("llama", seed=8), word_tokenizer)
    d = ModelAdapter(model_factory("llama", seed=7, dtype=torch.bfloat16), word_tokenizer)
    e = ModelAdapter(model_factory("llama", seed=7), word_tokenizer, start_token_id=2)
    assert a.fingerprint == b.fingerprint
    assert len({str(x.fingerprint) for x in (a, c, d, e)}) == 4


@pytest.mark.parametrize("rows", [5, 40, 300])
def test_row_mask_fast_paths_equal_dense_attention(rows, llama_adapter):
    """Grouped and padded-causal attention give what the dense exact mask gives."""
    from ragkv.middleware.adapter import RowMask

    gen = torch.Generator().manual_seed(rows)
    n = 400
    keys, values = torch.randn(1, 2, n, 16, generator=gen), torch.randn(1, 2, n, 16, generator=gen)
    for positions in (torch.sort(torch.randperm(n, generator=gen)[:rows]).values, torch.arange(n - rows, n)):
        hidden = torch.randn(1, rows, 64, generator=gen)
        q = torch.randn(1, 4, rows, 16, generator=gen)
        fast = RowMask.build(positions, torch.arange(n))
        dense = exact_causal_mask(positions, torch.arange(n))
        out_fast = llama_adapter.attend(0, hidden, q, keys, values, mask=fast)
        out_dense = llama_adapter.attend(0, hidden, q, keys, values, mask=dense)
        assert fast.groups is not None or fast.suffix_start is not None
        assert torch.allclose(out_fast, out_dense, atol=1e-5)
