"""The contract every codec keeps: round trips (exact or within one quantization step), layer-wise
decoding equal to slices of the full decode, deterministic payloads, parameters that survive the
container's JSON header."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ragkv.codecs import CodecError, available_codecs, get_codec

pytestmark = pytest.mark.usefixtures("single_worker")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def test_every_registered_codec_is_covered(codec_cases) -> None:
    assert set(available_codecs()) >= {"raw", "zstd", "quant", "cachegen"}
    assert {name for name, _ in codec_cases} == set(available_codecs())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip(case: tuple[str, dict], dtype: torch.dtype, make_kv, error_bound) -> None:
    name, params = case
    codec = get_codec(name, params)
    kv = make_kv(dtype=dtype)
    out = codec.decode(codec.encode(kv), tuple(kv.shape), dtype)
    assert out.shape == kv.shape and out.dtype == dtype
    if codec.lossless:
        assert torch.equal(out, kv)
    else:
        err = (out.float() - kv.float()).abs()
        bound = error_bound(name, params, kv)
        assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("shape", [(1, 2, 1, 1, 1), (2, 2, 1, 0, 4), (1, 2, 3, 300, 5), (2, 2, 1, 257, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes(case: tuple[str, dict], shape: tuple[int, ...], make_kv, error_bound) -> None:
    name, params = case
    codec = get_codec(name, params)
    kv = make_kv(shape[0], shape[2], shape[3], shape[4], dtype=torch.float16, seed=3)
    out = codec.decode(codec.encode(kv), shape, torch.float16)
    assert out.shape == kv.shape
    if codec.lossless:
        assert torch.equal(out, kv)
    elif kv.numel():
        assert bool(((out.float() - kv.float()).abs() <= error_bound(name, params, kv)).all())


def test_constant_and_zero_kv(case: tuple[str, dict], error_bound) -> None:
    """Per-element codecs keep constant KV within 0.01; the transform codec (whose basis was calibrated on other
    KV) within its bound, which for KV this unlike the calibration's is the energy of the dropped components."""
    name, params = case
    codec = get_codec(name, params)
    for kv in (torch.zeros(2, 2, 2, 20, 4, dtype=torch.float16), torch.full((2, 2, 2, 20, 4), -3.25)):
        out = codec.decode(codec.encode(kv), tuple(kv.shape), kv.dtype)
        if name == "transform":
            assert bool(((out.float() - kv.float()).abs() <= error_bound(name, params, kv)).all())
        else:
            assert torch.allclose(out.float(), kv.float(), atol=1e-2)


def test_decode_layers_equals_slices_of_decode(case: tuple[str, dict], make_kv) -> None:
    name, params = case
    codec = get_codec(name, params)
    kv = make_kv(layers=5)
    payload = codec.encode(kv)
    full = codec.decode(payload, tuple(kv.shape), kv.dtype)
    for layers in ([0], [4], [1, 3], [3, 1, 3], list(range(5)), []):
        part = codec.decode_layers(payload, tuple(kv.shape), kv.dtype, layers)
        assert part.shape == (len(layers), *kv.shape[1:])
        assert torch.equal(part, full[layers])
    with pytest.raises(CodecError):
        codec.decode_layers(payload, tuple(kv.shape), kv.dtype, [5])
    # numpy and torch integer indices are indices too
    assert torch.equal(codec.decode_layers(payload, tuple(kv.shape), kv.dtype, [np.int64(2), torch.tensor(0)]),
                       full[[2, 0]])


def test_deterministic(case: tuple[str, dict], make_kv) -> None:
    name, params = case
    kv = make_kv(seed=7)
    first = get_codec(name, params).encode(kv)
    codec = get_codec(name, params)
    assert codec.encode(kv) == first
    codec.decode(first, tuple(kv.shape), kv.dtype)
    assert codec.encode(kv.clone()) == first
    # a non-contiguous view of the same values encodes to the same bytes
    strided = kv.transpose(3, 4).contiguous().transpose(3, 4)
    assert not strided.is_contiguous()
    assert codec.encode(strided) == first


def test_params_round_trip_through_json(case: tuple[str, dict], make_kv) -> None:
    name, params = case
    codec = get_codec(name, params)
    stored = json.loads(json.dumps(codec.params.to_dict()))
    again = get_codec(name, stored)
    assert again.params == codec.params
    kv = make_kv()
    assert again.encode(kv) == codec.encode(kv)


@pytest.mark.parametrize("name", ["zstd", "quant", "cachegen"])
def test_invalid_params_name_the_allowed_values(name: str) -> None:
    bad = {"zstd": {"level": 99}, "quant": {"bits": 3}, "cachegen": {"level": 7}}[name]
    with pytest.raises(CodecError, match="must be"):
        get_codec(name, bad)
    with pytest.raises(CodecError):
        get_codec(name, {"no_such_parameter": 1})


def test_non_finite_kv_is_refused_by_lossy_codecs_or_kept_by_lossless(case: tuple[str, dict], make_kv) -> None:
    name, params = case
    codec = get_codec(name, params)
    kv = make_kv()
    kv[0, 1, 0, 3, 2] = float("nan")
    if codec.lossless:
        out = codec.decode(codec.encode(kv), tuple(kv.shape), kv.dtype)
        assert torch.equal(out.isnan(), kv.isnan())
    else:
        with pytest.raises(CodecError, match="non-finite"):
            codec.encode(kv)


def test_store_container_round_trip(case: tuple[str, dict], make_kv) -> None:
    """The store records codec name and params in its JSON header and rebuilds the codec from them."""
    container = pytest.importorskip("ragkv.kvstore.container")
    chunk_mod = pytest.importorskip("ragkv.kvstore.chunk")
    name, params = case
    kv = make_kv(tokens=12)
    meta = chunk_mod.ChunkMeta(fingerprint="f" * 32, token_ids=tuple(range(12)))
    blob = container.encode_entry(chunk_mod.ChunkKV(kv, meta), get_codec(name, params))
    header, chunk = container.decode_entry(blob)
    assert header.codec == name
    # the header holds what the payload decodes with: the codec's parameters, with its basis named (transform)
    assert header.params == get_codec(name, params).payload_params(kv)
    expected = get_codec(name, params)
    # the container passes the chunk's position (its keys carry RoPE): codecs that undo it use it
    assert torch.equal(chunk.kv, expected.decode(expected.encode(kv, position=meta.position), tuple(kv.shape), kv.dtype))
    header, payload = container.read_entry(blob)
    first_layer = get_codec(header.codec, header.params).decode_layers(payload, header.shape, kv.dtype, [1])
    assert torch.equal(first_layer, chunk.kv[1:2])
