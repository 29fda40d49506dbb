"""Shared fixtures for the codec tests: KV tensors with real KV's structure, codec cases, error bounds."""
from __future__ import annotations

import pytest
import torch
from codec_kv import fit_test_basis
from codec_kv import make_codec_kv as _make_kv

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
    ("transform", {"level": 1, "sink_tokens": 0}),
    ("transform", {"level": 3}),
    ("transform", {"level": 6, "sink_tokens": 2}),
]
# (layers, kv_heads, head_dim) of every KV the codec suites encode: each gets a transform basis (see below)
BASIS_SHAPES = [(3, 2, 8), (2, 2, 8), (5, 2, 8), (1, 1, 1), (2, 1, 4), (1, 3, 5), (2, 1, 2), (2, 2, 4), (1, 1, 4), (3, 1, 4)]


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


@pytest.fixture(scope="session", autouse=True)
def transform_bases():
    """Default transform bases for every shape the suites encode, registered for the whole session."""
    from ragkv.codecs.transform_basis import forget_basis, register_basis

    digests = [register_basis(fit_test_basis(*shape)[0], default=True) for shape in BASIS_SHAPES]
    yield digests
    for digest in digests:
        forget_basis(digest)


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
def cachegen_steps():
    return cachegen_step


@pytest.fixture
def transform_bound():
    return _transform_bound


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
    T = x.shape[3]
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
    elif name == "transform":
        return _transform_bound(params, kv)
    elif name == "cachegen":
        step = cachegen_step(params, kv)
    else:
        raise ValueError(name)
    return step * (1 + 2.0 ** -8) + x.abs() * (output_eps(kv.dtype) + 2.0 ** -10) + 1e-30


def _transform_bound(params: dict, kv: torch.Tensor, position: int | None = None) -> torch.Tensor:
    """Per-element bound for the transform codec, from the coefficients of ``kv`` in its default basis: a kept
    component errs by at most half its step (or by what its clipping cut off), a dropped one by its whole
    coefficient; through the orthonormal components each element errs by at most sum_i |U_ci| * |e_i|, and
    redoing RoPE (for KV encoded with a ``position``) mixes an element's error with its pair partner's."""
    from ragkv.codecs.rotary import cos_sin
    from ragkv.codecs.transform import LEVEL_BITS, SINK_BITS, TransformParams, layer_plans
    from ragkv.codecs.transform_basis import default_basis_digest, find_basis, symbol_radius
    from ragkv.codecs.transform_fit import features

    p = TransformParams(**params)
    L, _, H, T, D = kv.shape
    basis = find_basis(default_basis_digest(L, H, D))
    table = cos_sin(basis.inv_freq, position, T) if len(basis.inv_freq) and position is not None else None
    sinks = min(p.sink_tokens, T)
    out = torch.empty(kv.shape, dtype=torch.float32)
    for layer in range(L):
        for kind in (0, 1):
            full = basis.group_of(layer)[kind]
            components = torch.from_numpy(full.components).double()  # [C, R]
            x = torch.from_numpy(features(kv[layer, kind], table if kind == 0 else None)).double()
            y = (x - torch.from_numpy(full.mean).double()) @ components  # [T, R]
            err = y.abs()
            for bits, rows in ((SINK_BITS, slice(0, sinks)), (LEVEL_BITS[p.level], slice(sinks, T))):
                plan = layer_plans(basis, layer, bits)[kind]
                for width, start, end in plan.widths:
                    for j in range(start, end):
                        step, column = float(plan.steps[j]), int(plan.columns[j])
                        clipped = y[rows, column].abs() - symbol_radius(width) * step
                        err[rows, column] = clipped.clamp(min=step / 2)
            bound = err @ components.abs().T  # [T, C]
            bound = bound.view(T, H, D).permute(1, 0, 2)
            if kind == 0 and table is not None:
                bound = bound + torch.cat((bound[..., D // 2:], bound[..., :D // 2]), dim=-1)
            out[layer, kind] = bound.float()
    x = kv.float()
    return out * (1 + 2.0 ** -8) + x.abs() * (output_eps(kv.dtype) + 2.0 ** -10) + 1e-4 * (x.abs().max() + 1)



def cachegen_step(params: dict, kv: torch.Tensor) -> torch.Tensor:
    """cachegen's quantization step per element (the error is at most half of it)."""
    x = kv.float()
    L = x.shape[0]
    level = params.get("level", 2)
    # keys are normalised per channel first: k' = (k - mean_c) / reach_c (mean to fp16, reach rounded up)
    keys = x[:, 0]  # [L, H, T, D]
    mean = keys.mean(2, keepdim=True).half().float()
    reach = (keys - mean).abs().amax(2, keepdim=True)
    normalised = (keys - mean) / torch.where(reach > 0, reach, torch.ones_like(reach))
    peak_k = normalised.abs().amax(dim=(1, 3), keepdim=True)  # [L, 1, T, 1] per (layer, token)
    peak_v = x[:, 1].abs().amax(dim=(1, 3), keepdim=True)
    m = torch.tensor([[half_range(b) for b in layer_bins(level, i, L)] for i in range(L)], dtype=torch.float32)
    step_k = peak_k / m[:, 0].view(L, 1, 1, 1) * reach * (1 + 2.0 ** -9)  # reach: up to fp16 rounding
    step_v = peak_v / m[:, 1].view(L, 1, 1, 1)
    step = torch.stack([step_k.expand_as(keys), step_v.expand_as(keys)], dim=1)
    return step
