"""CacheGen specifics: the bins table per level and depth, half-step error bounds, level ordering,
block independence, and decoding through the helper-process pool."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from ragkv.codecs import CodecError, get_codec, set_decode_workers, start_decode_pool
from ragkv.codecs.cachegen import LEVEL_BINS, layer_bins, level_summary
from ragkv.codecs.cachegen_stream import frequency_tables
from ragkv.codecs.decode_pool import get_pool, shutdown_pool


def test_bins_table_matches_cachegen_for_32_layers() -> None:
    # public CacheGen code, 32 layers: keys groups end at layers 10 and 20, values at layer 2
    assert [layer_bins(2, i, 32)[0] for i in (0, 9, 10, 19, 20, 31)] == [32, 32, 16, 16, 16, 16]
    assert [layer_bins(2, i, 32)[1] for i in (0, 1, 2, 31)] == [32, 32, 16, 16]
    assert [layer_bins(1, i, 32)[0] for i in (0, 9, 10, 19, 20, 31)] == [16, 16, 16, 16, 12, 12]
    assert [layer_bins(1, i, 32)[1] for i in (0, 1, 2, 31)] == [16, 16, 12, 12]
    assert {b for i in range(32) for b in layer_bins(3, i, 32)} == {32}


def test_bins_table_scales_to_depth() -> None:
    summary = level_summary(24)
    assert summary[2]["key_bins"] == [32] * 8 + [16] * 16
    assert summary[2]["value_bins"] == [32] * 2 + [16] * 22
    assert summary[1]["key_bins"] == [16] * 15 + [12] * 9
    for depth in (1, 2, 3, 5, 80):
        for level in LEVEL_BINS:
            keys = [layer_bins(level, i, depth)[0] for i in range(depth)]
            values = [layer_bins(level, i, depth)[1] for i in range(depth)]
            assert keys[0] == LEVEL_BINS[level][0][0] and values[0] == LEVEL_BINS[level][1][0]
            assert keys == sorted(keys, reverse=True) and values == sorted(values, reverse=True)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_error_is_at_most_half_a_step(level: int, make_kv, single_worker, cachegen_steps) -> None:
    kv = make_kv(layers=6, tokens=300, dtype=torch.float32, seed=2)
    codec = get_codec("cachegen", {"level": level})
    out = codec.decode(codec.encode(kv), tuple(kv.shape), kv.dtype)
    half_step = cachegen_steps({"level": level}, kv) / 2
    # stored fp16 scales are rounded up by at most 2**-10 relative
    assert bool(((out - kv).abs() <= half_step * (1 + 2 ** -9) + 1e-5).all())


def test_keys_are_normalised_per_channel_so_an_outlier_channel_costs_the_others_nothing(make_kv,
                                                                                         single_worker) -> None:
    kv = make_kv(layers=2, tokens=200, dtype=torch.float32, seed=5)
    spiky = kv.clone()
    spiky[:, 0, :, :, 3] = spiky[:, 0, :, :, 3] * 50 + 400  # one huge, offset key channel
    codec = get_codec("cachegen", {"level": 2})

    def other_channels_error(x: torch.Tensor) -> float:
        out = codec.decode(codec.encode(x), tuple(x.shape), x.dtype)
        keep = [d for d in range(x.shape[-1]) if d != 3]
        return float((out[:, 0, ..., keep] - x[:, 0, ..., keep]).abs().mean())

    assert other_channels_error(spiky) < 1.5 * other_channels_error(kv)


def test_levels_trade_size_for_error(make_kv, single_worker) -> None:
    kv = make_kv(layers=8, tokens=256, seed=4)
    sizes, errors = [], []
    for level in (1, 2, 3):
        codec = get_codec("cachegen", {"level": level})
        payload = codec.encode(kv)
        out = codec.decode(payload, tuple(kv.shape), kv.dtype)
        sizes.append(len(payload))
        errors.append((out.float() - kv.float()).abs().mean().item())
    assert sizes[0] < sizes[1] < sizes[2]
    assert errors[0] > errors[1] > errors[2]
    int8 = len(get_codec("quant", {"bits": 8}).encode(kv))
    assert sizes[1] < int8 / 2


def test_frequency_tables_are_valid_for_any_codes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(2, 256, rng.integers(1, 6))
        codes = rng.integers(0, 16, int(sizes.sum())).astype(np.uint8)
        if rng.random() < 0.3:
            codes[:] = rng.integers(0, 16)
        freq, starts = frequency_tables(sizes, codes)
        for j in range(len(sizes)):
            seg = freq[starts[j]:starts[j + 1]]
            assert seg.min() >= 1 and seg.sum() == 1 << 16


def test_constant_channels_cost_no_stream_bits(single_worker) -> None:
    kv = torch.zeros(1, 2, 2, 64, 8)
    kv[..., 0] = 1.0  # every token's peak in channel 0, all other channels constant 0
    codec = get_codec("cachegen", {"level": 3})
    payload = codec.encode(kv)
    assert len(payload) < 200
    assert torch.equal(codec.decode(payload, tuple(kv.shape), kv.dtype), kv)


def test_blocks_decode_independently(make_kv, single_worker) -> None:
    """Corrupting one block's stream leaves the symbol streams of the other blocks untouched: the
    damaged block fails its end-of-stream check (or decodes wrong), the others decode exactly."""
    from ragkv.codecs.cachegen_stream import decode_section, parse_section

    codec = get_codec("cachegen", {"level": 2, "block_tokens": 64})
    kv = make_kv(layers=1, tokens=256, seed=9)
    payload = bytearray(codec.encode(kv))
    view = memoryview(bytes(payload))
    # past the layer table (16 B), the layer header (6 B) and the key channel means and ranges (2 x 16 fp16)
    plan, _, _ = parse_section(view, 16 + 6 + 64, len(view), 256, 16, 31, 64, 0, "keys")
    good = np.empty((256, 16), np.uint8)
    decode_section(view, plan, good)
    lengths = np.frombuffer(view, "<u4", plan.nblocks, plan.lengths_off)
    first = plan.words_off
    payload[first] ^= 0xFF  # damage block 0 only
    bad_view = memoryview(bytes(payload))
    # decode the intact blocks on their own by skipping block 0's words
    shifted = plan._replace(words_off=first + 4 * int(lengths[0]), nwords=plan.nwords - int(lengths[0]),
                            tokens=192, nblocks=3, lengths_off=plan.lengths_off + 4)
    part = np.empty((192, 16), np.uint8)
    decode_section(bad_view, shifted, part)
    assert np.array_equal(part, good[64:])


@pytest.fixture(scope="module")
def two_workers():
    """Decode with the caller + 1 helper process; one pool for the module (starting helpers takes seconds)."""
    set_decode_workers(2)
    assert start_decode_pool()
    yield
    set_decode_workers(None)
    shutdown_pool()


def test_concurrent_decodes_share_the_pool(make_kv, two_workers) -> None:
    from concurrent.futures import ThreadPoolExecutor

    codec = get_codec("cachegen", {"level": 1})
    kvs = [make_kv(layers=2, heads=2, tokens=400, dim=64, seed=s) for s in range(4)]
    payloads = [codec.encode(kv) for kv in kvs]
    set_decode_workers(1)
    expected = [codec.decode(p, tuple(kv.shape), kv.dtype) for p, kv in zip(payloads, kvs)]
    set_decode_workers(2)
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda i: codec.decode(payloads[i % 4], tuple(kvs[i % 4].shape), torch.float16),
                           range(12)))
    assert all(torch.equal(o, expected[i % 4]) for i, o in enumerate(outs))


def test_pool_decode_equals_in_process(make_kv, two_workers) -> None:
    kv = make_kv(layers=4, heads=2, tokens=600, dim=64, seed=6)  # enough symbols to use the pool
    codec = get_codec("cachegen", {"level": 2})
    payload = codec.encode(kv)  # layers shared between the caller and the helper
    try:
        set_decode_workers(1)
        assert codec.encode(kv) == payload  # in-process: the same bytes
        expected = codec.decode(payload, tuple(kv.shape), kv.dtype)
        set_decode_workers(2)
        assert torch.equal(codec.decode(payload, tuple(kv.shape), kv.dtype), expected)
        assert torch.equal(codec.decode_layers(payload, tuple(kv.shape), kv.dtype, [3, 1]), expected[[3, 1]])
        pool = get_pool(1)
        assert not pool.broken
        # a corrupt payload through the pool is a CodecError, and the pool survives it
        bad = bytearray(payload)
        bad[len(bad) // 2:len(bad) // 2 + 64] = bytes(64)
        with pytest.raises(CodecError):
            codec.decode(bytes(bad), tuple(kv.shape), kv.dtype)
        assert get_pool(1) is pool and not pool.broken
        assert torch.equal(codec.decode(payload, tuple(kv.shape), kv.dtype), expected)
        # a helper that dies breaks the pool; the decode falls back in-process and still succeeds
        for proc in pool._procs:
            proc.kill()
            proc.wait()
        assert torch.equal(codec.decode(payload, tuple(kv.shape), kv.dtype), expected)
        assert pool.broken
        assert start_decode_pool() and get_pool(1) is not pool  # a fresh pool
        assert torch.equal(codec.decode(payload, tuple(kv.shape), kv.dtype), expected)
    finally:
        set_decode_workers(2)


def test_a_layer_decode_sends_the_helpers_that_layer_only_and_a_busy_pool_is_not_waited_for(
        make_kv, two_workers, monkeypatch) -> None:
    from ragkv.codecs.decode_pool import DecodePool

    kv = make_kv(layers=6, heads=2, tokens=600, dim=64, seed=8)
    codec = get_codec("cachegen", {"level": 2})
    payload = codec.encode(kv)
    expected = codec.decode(payload, tuple(kv.shape), kv.dtype)
    pool = get_pool(1)
    sent: list[int] = []
    real_run = DecodePool.run

    def spying_run(self, task, segments, *args, **kwargs):
        sent.append(sum(len(s) for s in segments))
        return real_run(self, task, segments, *args, **kwargs)

    monkeypatch.setattr(DecodePool, "run", spying_run)
    table = struct.unpack_from("<7Q", payload, 0)
    for layer in (0, 4):
        assert torch.equal(codec.decode_layers(payload, tuple(kv.shape), kv.dtype, [layer]), expected[[layer]])
        assert sent[-1] == table[layer + 1] - table[layer]  # that layer's bytes, not the payload's
    assert torch.equal(codec.decode_layers(payload, tuple(kv.shape), kv.dtype, [5, 2, 5]), expected[[5, 2, 5]])
    calls = len(sent)
    with pool.lock:  # another call holds the pool: this one decodes in-process at once
        assert torch.equal(codec.decode(payload, tuple(kv.shape), kv.dtype), expected)
        assert len(sent) == calls


def test_decode_workers_setting_is_validated() -> None:
    with pytest.raises(CodecError):
        set_decode_workers(0)
    set_decode_workers(None)
