"""Shared fixtures for the codec tests: KV tensors with real KV's structure, codec cases, error bounds."""
from __future__ import annotations

import pytest
import torch

from ragkv.codecs import get_codec, set_decode_workers
from ragkv.codecs.cachegen import half_range, layer_bins

# (codec name, params) pairs covering every codec and its main options
CASES: list[tuple[str, dict]] = [
    ("raw", {}),
    ("zstd", {}),
    ("zstd", {"level": 1, "shuffle": False}),
    ("quant", {"bits": 8}),
    ("quant", {"bits": 4}),
    ("quant", {"bits": 4, "key_group": 16, "zstd_level": 3}),
    ("cachegen", {"level": 1}),
    ("cachegen", {"level": 2}),
    ("cachegen", {"level": 3, "block_tokens": 32}),
]


def case_id(case: tuple[str, dict]) -> str:
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests taking ``case`` run over every codec case; ``lossy_case`` over the lossy ones;
    ``encoded_case`` over every codec but raw (whose payload is the tensor's bytes)."""
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, ids=case_id)
    if "lossy_case" in metafunc.fixturenames:
        lossy = [c for c in CASES if not get_codec(*c).lossless]
        metafunc.parametrize("lossy_case", lossy, ids=case_id)


def _make_kv(layers: int = 3, heads: int = 2, tokens: int = 37, dim: int = 8, dtype: torch.dtype = torch.float16,
            seed: int = 0) -> torch.Tensor:
    """KV [L, 2, H, T, D] shaped like real KV: per-channel offsets and spreads, a few outlier key channels,
    an outlier token (like an attention sink), token-to-token correlation."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(layers, 2, heads, tokens, dim, generator=g)
    smooth = torch.cumsum(torch.randn(layers, 2, heads, tokens, dim, generator=g), dim=3) * 0.1
    spread = torch.rand(layers, 2, heads, 1, dim, generator=g) * 1.5 + 0.1
    offset = torch.randn(layers, 2, heads, 1, dim, generator=g) * 0.5
    kv = (base + smooth) * spread + offset
    if dim > 2:
        kv[:, 0, :, :, 1] *= 8.0  # outlier key channel
    if tokens > 1:
        kv[:, :, :, 0] *= 4.0  # outlier first token
    return kv.to(dtype)


@pytest.fixture
def single_worker():
    """Decode in-process (the pool is exercised by its own tests)."""
    set_decode_workers(1)
    yield
    set_decode_workers(None)


@pytest.fixture
def make_kv():
    return _make_kv


@pytest.fixture
def error_bound():
    return _error_bound


@pytest.fixture
def codec_cases():
    return list(CASES)


def output_eps(dtype: torch.dtype) -> float:
    return {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -20}[dtype]


def _error_bound(name: str, params: dict, kv: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |decoded - kv| for lossy codecs: one quantization step of the element's
    group (KIVI groups for quant, the token's scale over the layer's bins for cachegen), plus the
    rounding of stored fp16 scales and of the output dtype."""
    x = kv.float()
    L, _, _, T, _ = x.shape
    if name == "quant":
        codec = get_codec(name, params)
        levels = (1 << codec.params.bits) - 1
        kg = codec.params.key_group
        keys, values = x[:, 0], x[:, 1]
        step_k = torch.empty_like(keys)
        for g0 in range(0, T, kg):
            grp = keys[:, :, g0:g0 + kg]
            step_k[:, :, g0:g0 + kg] = ((grp.amax(2, keepdim=True) - grp.amin(2, keepdim=True)) / levels)
        step_v = (values.amax(3, keepdim=True) - values.amin(3, keepdim=True)).expand_as(values) / levels
        step = torch.stack([step_k, step_v], dim=1)
    elif name == "cachegen":
        level = params.get("level", 2)
        peak = x.abs().amax(dim=(2, 4), keepdim=True)  # [L, 2, 1, T, 1] per (layer, kind, token)
        m = torch.tensor([[half_range(b) for b in layer_bins(level, i, L)] for i in range(L)], dtype=torch.float32)
        step = (peak / m.view(L, 2, 1, 1, 1)).expand_as(x)
    else:
        raise ValueError(name)
    return step * (1 + 2.0 ** -8) + x.abs() * (output_eps(kv.dtype) + 2.0 ** -10) + 1e-30
