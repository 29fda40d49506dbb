"""The transform codec beyond the generic contract: RoPE undone at the chunk's positions, bit allocation, the
basis as an untrusted blob, and a basis that is missing or different (a CodecError, never garbage)."""
from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
import torch
from codec_kv import fit_test_basis, rope_frequencies

from ragkv.codecs import CodecError, get_codec
from ragkv.codecs.rotary import cos_sin, rotate
from ragkv.codecs.transform import LEVEL_BITS, allocate_widths
from ragkv.codecs.transform_basis import (
    MAX_WIDTH,
    add_basis_source,
    basis_from_bytes,
    basis_to_bytes,
    default_basis_digest,
    find_basis,
    forget_basis,
    register_basis,
)
from ragkv.codecs.transform_fit import fit_basis

pytestmark = pytest.mark.usefixtures("single_worker")


def rotary_kv(layers: int, heads: int, tokens: int, dim: int, position: int, seed: int) -> torch.Tensor:
    """KV whose keys are rank-2 before RoPE (as a trained model's nearly are) and then rotated at their
    positions: a basis fitted with RoPE undone captures them in 2 components, one fitted on rotated keys cannot."""
    mix = torch.randn(layers, heads * dim, 2, generator=torch.Generator().manual_seed(1234))  # the "model"
    g = torch.Generator().manual_seed(seed)
    coefficients = torch.randn(layers, tokens, 2, generator=g) * 3.0
    keys = (coefficients @ mix.transpose(1, 2)).view(layers, tokens, heads, dim).permute(0, 2, 1, 3)  # [L, H, T, D]
    cos, sin = cos_sin(rope_frequencies(dim).numpy(), position, tokens)
    keys = torch.stack([torch.from_numpy(rotate(keys[i].numpy(), cos, sin)) for i in range(layers)])
    values = torch.randn(layers, heads, tokens, dim, generator=g)
    return torch.stack([keys, values], dim=1)


def test_keys_are_coded_with_rope_undone_at_their_positions(transform_bound) -> None:
    samples = [(rotary_kv(2, 2, 64, 8, position=1 + 7 * s, seed=s), 1 + 7 * s) for s in range(4)]
    basis, _ = fit_basis(samples, rope_frequencies(8))
    assert float(basis.groups[0][0].variances[2:].sum()) < 1e-6 * float(basis.groups[0][0].variances.sum())
    digest = register_basis(basis)
    try:
        codec = get_codec("transform", {"level": 6, "basis": digest, "sink_tokens": 0})
        kv = rotary_kv(2, 2, 50, 8, position=300, seed=9)
        with_position = codec.decode(codec.encode(kv, position=300), tuple(kv.shape), kv.dtype)
        without = codec.decode(codec.encode(kv), tuple(kv.shape), kv.dtype)
        error = (with_position[:, 0] - kv[:, 0]).norm() / kv[:, 0].norm()
        assert error < 0.01  # two components hold the keys once RoPE is undone: they get most of the bits
        assert (without[:, 0] - kv[:, 0]).norm() / kv[:, 0].norm() > 5 * error
    finally:
        forget_basis(digest)


def test_round_trip_with_positions_within_the_bound(make_kv, transform_bound) -> None:
    kv = make_kv(layers=3, heads=2, tokens=41, dim=8, seed=21)
    for params in ({"level": 1, "sink_tokens": 0}, {"level": 4}, {"level": 6, "sink_tokens": 5}):
        codec = get_codec("transform", params)
        for position in (0, 1, 4093):
            out = codec.decode(codec.encode(kv, position=position), tuple(kv.shape), kv.dtype)
            assert bool(((out.float() - kv.float()).abs() <= transform_bound(params, kv, position)).all())


def test_higher_levels_are_larger_and_closer(make_kv) -> None:
    kv = make_kv(layers=3, heads=2, tokens=200, dim=8, seed=5)
    sizes, errors = [], []
    for level in sorted(LEVEL_BITS):
        codec = get_codec("transform", {"level": level, "sink_tokens": 0})
        payload = codec.encode(kv, position=0)
        sizes.append(len(payload))
        errors.append(float((codec.decode(payload, tuple(kv.shape), kv.dtype).float() - kv.float()).norm()))
    assert sizes == sorted(sizes) and errors == sorted(errors, reverse=True)
    assert sizes[0] * 8 / kv.numel() < 1.0  # level 1: under a bit per element


def test_greedy_allocation_is_the_optimum() -> None:
    """The greedy bit-by-bit allocation equals an exhaustive search of the dynamic programme's objective."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        keys, values = rng.exponential(size=3) ** 3, rng.exponential(size=2) ** 3
        budget = int(rng.integers(0, 9))
        k_w, v_w = allocate_widths(keys, values, budget)
        weight = np.concatenate([keys / keys.sum(), values / values.sum()])

        def cost(widths, weight=weight) -> float:
            return float(np.sum(weight * 4.0 ** -np.asarray(widths, dtype=float)))

        best = min(cost(w) for w in itertools.product(range(min(budget, MAX_WIDTH) + 1), repeat=5) if sum(w) <= budget)
        assert sum(k_w) + sum(v_w) <= budget
        assert cost(np.concatenate([k_w, v_w])) == pytest.approx(best, rel=1e-12)


def test_missing_or_different_basis_is_a_codec_error(make_kv) -> None:
    kv = make_kv(layers=3, heads=2, tokens=20, dim=8, seed=1)
    codec = get_codec("transform", {"level": 3})
    payload = codec.encode(kv, position=1)
    named = get_codec("transform", codec.payload_params(kv))
    other, _ = fit_test_basis(3, 2, 8, layer_group=3)
    other_digest = register_basis(other)
    try:
        with pytest.raises(CodecError, match="another basis"):
            get_codec("transform", {"level": 3, "basis": other_digest}).decode(payload, tuple(kv.shape), kv.dtype)
    finally:
        forget_basis(other_digest)
    default = find_basis(default_basis_digest(3, 2, 8))
    forget_basis(default.digest)
    try:
        with pytest.raises(CodecError, match="not available"):
            named.decode(payload, tuple(kv.shape), kv.dtype)
        with pytest.raises(CodecError, match="no transform basis"):
            codec.encode(kv)
    finally:
        register_basis(default, default=True)
    assert named.decode(payload, tuple(kv.shape), kv.dtype).shape == kv.shape


class _Source:
    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.asked: list[str] = []

    def read(self, digest: str) -> bytes | None:
        self.asked.append(digest)
        return self.blobs.get(digest)


def test_a_basis_is_found_through_a_source_and_a_corrupt_copy_is_skipped(make_kv) -> None:
    basis, data = fit_test_basis(3, 2, 8, layer_group=2)
    corrupt = _Source({basis.digest: data[:-4] + b"\0\0\0\0"})
    good = _Source({basis.digest: data})
    add_basis_source(corrupt.read)
    add_basis_source(good.read)
    try:
        codec = get_codec("transform", {"level": 2, "basis": basis.digest})
        kv = make_kv(layers=3, seed=4)
        payload = codec.encode(kv, position=2)  # found through the sources
        assert corrupt.asked == [basis.digest] and good.asked == [basis.digest]
        forget_basis(basis.digest)
        out = codec.decode(payload, tuple(kv.shape), kv.dtype)
        assert out.shape == kv.shape and len(good.asked) == 2
    finally:
        forget_basis(basis.digest)
        del corrupt, good  # sources are held weakly: they go with their owners


def test_basis_bytes_round_trip_and_layer_groups() -> None:
    basis, data = fit_test_basis(5, 2, 8, layer_group=2)
    again = basis_from_bytes(data, basis.digest)
    assert basis_to_bytes(again) == data and again.digest == basis.digest
    assert len(again.groups) == 3 and again.group_of(4) is again.groups[2]


def _hostile_variants(data: bytes) -> dict[str, bytes]:
    header_at = 8
    version, layers, heads, dim, group, rank, pairs = struct.unpack_from("<HIHHIHH", data, header_at)
    first_float = header_at + 18 + 4 * pairs  # group 0 keys' mean

    def header(**fields: int) -> bytes:
        values = {"version": version, "layers": layers, "heads": heads, "dim": dim, "group": group, "rank": rank,
                  "pairs": pairs, **fields}
        return data[:header_at] + struct.pack("<HIHHIHH", *values.values()) + data[header_at + 18:]

    features = heads * dim
    variances_at = first_float + 4 * features
    components_at = variances_at + 4 * rank
    nan = struct.pack("<f", float("nan"))
    return {
        "truncated": data[:-1],
        "extended": data + b"\0",
        "magic": b"X" + data[1:],
        "version": header(version=2),
        "layers": header(layers=1 << 20),
        "rank": header(rank=features + 1),
        "pairs": header(pairs=3),
        "group": header(group=0),
        "nan mean": data[:first_float] + nan + data[first_float + 4:],
        "increasing variances": data[:variances_at] + struct.pack("<2f", 1.0, 1e9) + data[variances_at + 8:],
        "not a unit component": data[:components_at] + struct.pack("<f", 50.0) + data[components_at + 4:],
    }


@pytest.mark.parametrize("variant", list(_hostile_variants(fit_test_basis(2, 1, 4)[1])))
def test_hostile_basis_bytes_are_refused(variant: str) -> None:
    bad = _hostile_variants(fit_test_basis(2, 1, 4)[1])[variant]
    with pytest.raises(CodecError):
        basis_from_bytes(bad)
    with pytest.raises(CodecError, match="hash"):
        basis_from_bytes(bad, fit_test_basis(2, 1, 4)[0].digest)


def test_garbage_streams_fail_fast_and_tokens_must_match(make_kv) -> None:
    kv = make_kv(layers=2, heads=2, tokens=40, dim=8, seed=3)
    codec = get_codec("transform", {"level": 4})
    payload = bytearray(codec.encode(kv, position=1))
    table = 8 * 3
    with pytest.raises(CodecError, match="tokens"):
        codec.decode(bytes(payload), (2, 2, 2, 41, 8), kv.dtype)
    rng = np.random.default_rng(1)
    body = table + struct.calcsize("<BBBBII8s") + 4
    for _ in range(20):
        bad = bytearray(payload)
        bad[body:] = rng.integers(0, 256, len(bad) - body, dtype=np.uint8).tobytes()
        try:
            out = codec.decode(bytes(bad), tuple(kv.shape), kv.dtype)
        except CodecError:
            continue
        assert out.shape == kv.shape and bool(torch.isfinite(out.float()).all())


def test_pool_helpers_decode_layers_as_this_process_does(make_kv) -> None:
    from ragkv.codecs import set_decode_workers, start_decode_pool
    from ragkv.codecs.decode_pool import get_pool, shutdown_pool

    basis, _ = fit_test_basis(4, 2, 64)
    digest = register_basis(basis)
    codec = get_codec("transform", {"level": 6, "basis": digest})
    kv = make_kv(layers=4, heads=2, tokens=600, dim=64, seed=12)
    payload = codec.encode(kv, position=3)
    expected = codec.decode(payload, tuple(kv.shape), kv.dtype)  # one worker: in-process
    try:
        set_decode_workers(2)
        assert start_decode_pool()
        pool = get_pool(1)
        assert torch.equal(codec.decode(payload, tuple(kv.shape), kv.dtype), expected)
        assert torch.equal(codec.decode_layers(payload, tuple(kv.shape), kv.dtype, [3, 0, 3]), expected[[3, 0, 3]])
        bad = bytearray(payload)
        bad[len(bad) // 2:len(bad) // 2 + 64] = bytes(64)
        with pytest.raises(CodecError):
            codec.decode(bytes(bad), tuple(kv.shape), kv.dtype)
        assert get_pool(1) is pool and not pool.broken  # a bad payload does not break the pool
        forget_basis(digest)  # the helpers need no basis of their own: the caller sends the entropy models
        register_basis(basis)
        assert torch.equal(codec.decode(payload, tuple(kv.shape), kv.dtype), expected)
    finally:
        set_decode_workers(1)
        shutdown_pool()
        forget_basis(digest)
