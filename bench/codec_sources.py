"""KV sources for the codec benches, and the transform bases fitted for them on held-out KV.

- ``real``: SmolLM2-135M-Instruct, the default model, over real English text (the fidelity set's documents,
  one after another, keys at positions 0 ..). Its transform basis is fitted on other documents (a fidelity
  world generated with another seed), each prefilled alone behind the start token as ragkv stores chunks.
- ``random-init``: a random-initialised Qwen2.5-0.5B-shaped model (24 layers, hidden 896, 14 heads, 2 KV heads,
  head_dim 64), one forward over random token ids; its basis is fitted on other random ids. Random weights give
  near-Gaussian KV without the outlier channels and token-to-token structure real KV has.
"""
from __future__ import annotations

from typing import Any

import torch

from ragkv.codecs.transform_basis import register_basis
from ragkv.codecs.transform_fit import fit_basis

CALIBRATION_DOCUMENTS = 64
CALIBRATION_DOC_TOKENS = 256


def kv_from_cache(cache: Any) -> torch.Tensor:
    """transformers 5.x DynamicCache -> kv [L, 2, H, T, D] (batch 0)."""
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])


def _forward_kv(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
    return kv_from_cache(out.past_key_values).to(torch.float16).contiguous()


def random_init_kv(quick: bool, tokens: int) -> tuple[torch.Tensor, str, list[tuple[torch.Tensor, int]], Any]:
    """(kv, description, calibration samples, inv_freq)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if quick:
        config = Qwen2Config(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=256, vocab_size=1000)
        tokens = 64
        what = "random-init tiny Qwen2 (2 layers, hidden 128, 2 KV heads, head_dim 32), 64 random tokens"
    else:
        config = Qwen2Config(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                             intermediate_size=4864, vocab_size=32000, max_position_embeddings=32768,
                             tie_word_embeddings=True)
        what = f"random-init Qwen2.5-0.5B shape (24 layers, hidden 896, 14 heads, 2 KV heads, head_dim 64), " \
               f"{tokens} random tokens"
    model = Qwen2ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    kv = _forward_kv(model, torch.randint(0, config.vocab_size, (tokens,), generator=g).tolist())
    calibration = [(_forward_kv(model, torch.randint(0, config.vocab_size, (min(tokens, 512),), generator=g).tolist()),
                    0) for _ in range(2)]
    return kv, what, calibration, model.model.rotary_emb.inv_freq


def real_kv(tokens: int) -> tuple[torch.Tensor, str]:
    """KV of SmolLM2-135M-Instruct (float32 forward, stored as fp16) over the fidelity set's documents."""
    import fidelity_set  # a sibling script: bench/ is on sys.path when run

    from ragkv.integrations.models import load_model

    loaded = load_model()
    ids: list[int] = []
    for question in fidelity_set.load():
        for doc in question.documents:
            ids.extend(loaded.tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= tokens:
            break
    kv = _forward_kv(loaded.model, ids[:tokens])
    c = loaded.model.config
    what = (f"real: SmolLM2-135M-Instruct ({c.num_hidden_layers} layers, {c.num_key_value_heads} KV heads, head_dim "
            f"{kv.shape[-1]}), {kv.shape[3]} tokens of English text (the fidelity set's documents)")
    return kv, what


def held_out_documents(count: int) -> list[str]:
    """Documents of a fidelity world none of the evaluated questions come from (another generator seed)."""
    import fidelity_set

    seen: dict[str, None] = {}
    for question in fidelity_set.generate(120, seed=fidelity_set.SEED + 2):
        for doc in question.documents:
            seen.setdefault(doc, None)
    return list(seen)[:count]


def real_calibration(count: int = CALIBRATION_DOCUMENTS) -> tuple[list[tuple[torch.Tensor, int]], Any]:
    """Held-out chunk KV of the real model (each document alone behind the start token, kept from position 1,
    as ragkv stores chunks) and the model's rotary inverse frequencies."""
    from ragkv.integrations.models import load_model

    loaded = load_model()
    start = loaded.tokenizer.bos_token_id if loaded.tokenizer.bos_token_id is not None else 1
    samples = []
    for doc in held_out_documents(count):
        ids = [start] + loaded.tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"][:CALIBRATION_DOC_TOKENS]
        samples.append((_forward_kv(loaded.model, ids)[:, :, :, 1:].contiguous(), 1))
    return samples, loaded.model.model.rotary_emb.inv_freq


def fit_bases(samples: list[tuple[torch.Tensor, int]], inv_freq: Any) -> dict[str, Any]:
    """A basis per layer and one shared by all layers, registered; {"per layer": basis, "all layers": basis}."""
    layers = samples[0][0].shape[0]
    out = {}
    for label, group in (("per layer", 1), ("all layers", layers)):
        basis, _ = fit_basis(samples, inv_freq, layer_group=group)
        register_basis(basis)
        out[label] = basis
    return out


__all__ = ["fit_bases", "held_out_documents", "kv_from_cache", "random_init_kv", "real_calibration", "real_kv"]
