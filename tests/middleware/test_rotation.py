"""Re-rotation: a chunk's cached keys moved by ``delta`` equal the keys computed at the new position."""
from __future__ import annotations

import pytest
import torch

from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.rope import rotate_keys


@pytest.mark.parametrize("family", ["llama", "qwen3", "llama_untied_llama3rope"])
@pytest.mark.parametrize("delta", [1, 37, 500])
def test_rotated_chunk_equals_chunk_computed_at_new_position(family, delta, model_factory, word_tokenizer):
    adapter = ModelAdapter(model_factory(family, seed=11), word_tokenizer)
    ids = torch.randint(4, 200, (1, 24), generator=torch.Generator().manual_seed(delta))
    at_zero = adapter.prefill(ids, start_position=0).kv[:, :, 0]  # [L, 2, H, T, D], no preceding context
    at_new = adapter.prefill(ids, start_position=delta).kv[:, :, 0]
    moved = adapter.rotate_keys(at_zero, delta)
    assert torch.allclose(moved[:, 1], at_new[:, 1], atol=1e-4)  # values do not depend on position
    assert (moved[:, 0] - at_new[:, 0]).abs().max() <= 1e-4 * max(1.0, at_new[:, 0].abs().max().item())
    assert not torch.allclose(at_zero[:, 0], at_new[:, 0], atol=1e-3)  # the rotation did something


def test_rotations_compose_and_invert(llama_adapter):
    kv = torch.randn(2, 2, 2, 5, 16)
    back = rotate_keys(rotate_keys(kv, 40, llama_adapter.inv_freq), -40, llama_adapter.inv_freq)
    assert torch.allclose(back, kv, atol=1e-5)
    two_steps = rotate_keys(rotate_keys(kv, 15, llama_adapter.inv_freq), 25, llama_adapter.inv_freq)
    assert torch.allclose(two_steps, rotate_keys(kv, 40, llama_adapter.inv_freq), atol=1e-5)


def test_rotation_in_bf16_is_done_in_float32(llama_adapter):
    kv = torch.randn(1, 2, 2, 8, 16)
    ref = rotate_keys(kv, 123, llama_adapter.inv_freq)
    low = rotate_keys(kv.to(torch.bfloat16), 123, llama_adapter.inv_freq)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), ref, atol=0.05, rtol=0.02)
