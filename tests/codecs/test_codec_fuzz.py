"""Every codec treats its payload as untrusted: random, truncated, bit-flipped and hostile payloads and
absurd declared shapes raise CodecError quickly (or, for a flip that leaves the structure valid, decode to
a tensor of the declared shape), never another exception, never a hang, never a large allocation."""
from __future__ import annotations

import random
import struct
import time

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragkv.codecs import CodecError, get_codec

pytestmark = pytest.mark.usefixtures("single_worker")

SHAPE = (2, 2, 2, 40, 8)
DTYPE = torch.float16
PER_CALL_S = 2.0


def attempt(codec, payload, shape=SHAPE, dtype=DTYPE) -> bool:
    """Decode; True if it decoded, False on CodecError; anything else fails the test."""
    start = time.perf_counter()
    try:
        out = codec.decode(payload, shape, dtype)
        ok = True
    except CodecError:
        ok = False
    assert time.perf_counter() - start < PER_CALL_S, "decode of a bad payload took too long"
    if ok:
        assert out.shape == tuple(shape) and out.dtype == dtype
    return ok


def split_layers(payload: bytes, layers: int) -> list[bytes]:
    table = struct.unpack_from(f"<{layers + 1}Q", payload, 0)
    base = 8 * (layers + 1)
    return [payload[base + table[i]:base + table[i + 1]] for i in range(layers)]


def join_layers(parts: list[bytes]) -> bytes:
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + len(p))
    return struct.pack(f"<{len(parts) + 1}Q", *offsets) + b"".join(parts)


@pytest.fixture
def encoded(case, make_kv):
    name, params = case
    codec = get_codec(name, params)
    kv = make_kv(SHAPE[0], SHAPE[2], SHAPE[3], SHAPE[4], dtype=DTYPE, seed=11)
    return codec, codec.encode(kv)


def test_random_payloads(encoded) -> None:
    codec, payload = encoded
    rng = random.Random(1)
    for _ in range(60):
        assert not attempt(codec, rng.randbytes(rng.randrange(0, 2 * len(payload) + 64)))
    # a consistent layer table around random bodies reaches each codec's own layer parser
    for _ in range(60):
        bodies = [rng.randbytes(rng.randrange(0, len(payload) // 2 + 16)) for _ in range(SHAPE[0])]
        attempt(codec, join_layers(bodies))


def test_truncated_payloads(encoded) -> None:
    codec, payload = encoded
    rng = random.Random(2)
    cuts = sorted({0, 1, 7, 8, 23, 24, len(payload) - 1, *rng.sample(range(len(payload)), 40)})
    for cut in cuts:
        assert not attempt(codec, payload[:cut])
    # truncated layers behind a table that agrees with them
    layers = split_layers(payload, SHAPE[0])
    for i in range(SHAPE[0]):
        for cut in sorted({0, 1, 5, 6, len(layers[i]) // 2, len(layers[i]) - 4, len(layers[i]) - 1}):
            if 0 <= cut < len(layers[i]):
                bad = list(layers)
                bad[i] = layers[i][:cut]
                assert not attempt(codec, join_layers(bad))
        extended = list(layers)
        extended[i] = layers[i] + b"\x00\x01\x02\x03"
        assert not attempt(codec, join_layers(extended))


def test_bit_flips(encoded) -> None:
    codec, payload = encoded
    rng = random.Random(3)
    for _ in range(150):
        bad = bytearray(payload)
        for _ in range(rng.choice([1, 1, 2, 8])):
            pos = rng.randrange(len(bad))
            bad[pos] ^= 1 << rng.randrange(8)
        attempt(codec, bytes(bad))
    # byte overwrites inside layer bodies (the table stays valid)
    base = 8 * (SHAPE[0] + 1)
    for _ in range(100):
        bad = bytearray(payload)
        if len(bad) > base:
            pos = rng.randrange(base, len(bad))
            bad[pos] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        attempt(codec, bytes(bad))


@pytest.mark.parametrize("shape", [
    (2, 2, 2, 40_000, 8), (2, 2, 2_000, 40, 8), (2, 2, 2, 40, 8_000), (2_000, 2, 2, 40, 8), (1, 2, 2, 40, 8),
    (2, 2, 2, 1 << 26, 16), (2, 2, 2, 39, 8), (2, 2, 2, 41, 8), (2, 2, 1, 40, 8),
])
def test_absurd_or_wrong_declared_shapes(encoded, shape, monkeypatch) -> None:
    codec, payload = encoded
    big: list[int] = []
    real_empty = torch.empty

    def spying_empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        big.append(t.numel() * t.element_size())
        return t

    if codec.name != "raw":  # raw (the base class path) allocates the declared output before checking
        monkeypatch.setattr(torch, "empty", spying_empty)
    assert not attempt(codec, payload, shape)
    assert not big or max(big) <= 2 * np.prod(SHAPE) * 4, "allocated for a shape the payload cannot hold"


@pytest.mark.parametrize("shape", [(2, 3, 2, 40, 8), (2, 2, 0, 40, 8), (2, 2, 2, -1, 8), (2, 2, 2, 40), (2.0, 2, 2, 40, 8),
                                   (1 << 20, 2, 1 << 10, 1 << 10, 1)])
def test_invalid_shapes(encoded, shape) -> None:
    codec, payload = encoded
    with pytest.raises(CodecError):
        codec.decode(payload, shape, DTYPE)


def test_wrong_dtype_and_layers(encoded) -> None:
    codec, payload = encoded
    with pytest.raises(CodecError):
        codec.decode(payload, SHAPE, torch.int8)
    with pytest.raises(CodecError):
        codec.decode_layers(payload, SHAPE, DTYPE, [-1])
    if codec.name != "raw":  # raw reads the bytes back in any float dtype of the same size
        attempt(codec, payload, SHAPE, torch.bfloat16)
    assert not attempt(codec, payload, SHAPE, torch.float32) or codec.name not in ("raw", "zstd")


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), layers=st.integers(1, 3))
def test_hypothesis_payloads(lossy_case, data: bytes, layers: int) -> None:
    codec = get_codec(*lossy_case)
    attempt(codec, join_layers([data] * layers), (layers, 2, 1, 5, 4))
    attempt(codec, data, (layers, 2, 1, 5, 4))


# -- hostile cachegen payloads: every field of a section set to something a decoder must refuse ----------

def _cachegen_payload(level: int = 2):
    codec = get_codec("cachegen", {"level": level, "block_tokens": 16})
    g = torch.Generator().manual_seed(5)
    kv = (torch.randn(SHAPE, generator=g) * 2).to(DTYPE)
    return codec, codec.encode(kv)


def _sections(layer: bytes):
    """Split one cachegen layer into (header, [(side_len, side, lengths, words), ...])."""
    channel_block = 2 * SHAPE[2] * SHAPE[4] * 2  # the keys' channel means and ranges (fp16), in the header part
    header, pos, sections = layer[:6 + channel_block], 6 + channel_block, []
    tokens, blocks = SHAPE[3], -(-SHAPE[3] // 16)
    for _ in range(2):
        (side_len,) = struct.unpack_from("<I", layer, pos)
        side = layer[pos + 4:pos + 4 + side_len]
        pos += 4 + side_len
        lengths = list(struct.unpack_from(f"<{blocks}I", layer, pos))
        pos += 4 * blocks
        words = layer[pos:pos + 4 * sum(lengths)]
        pos += 4 * sum(lengths)
        sections.append([side_len, side, lengths, words])
    assert pos == len(layer) and tokens
    return header, sections


def _join_sections(header: bytes, sections) -> bytes:
    out = [header]
    for side_len, side, lengths, words in sections:
        out += [struct.pack("<I", side_len), side, struct.pack(f"<{len(lengths)}I", *lengths), words]
    return b"".join(out)


def _side_parts(side: bytes):
    raw = zstandard.ZstdDecompressor().decompress(side)
    fixed = SHAPE[3] * 2
    channels = SHAPE[2] * SHAPE[4]
    return bytearray(raw), fixed, channels


def _with_side(sections, kind: int, raw: bytes) -> None:
    frame = zstandard.ZstdCompressor(level=3).compress(bytes(raw))
    sections[kind][0], sections[kind][1] = len(frame), frame


HOSTILE = [
    "stream_length_beyond_payload", "stream_length_huge", "streams_swapped", "side_len_huge", "side_not_zstd",
    "side_size_mismatch", "alphabet_above_bins", "alphabet_zero", "lo_overflow", "padding_nibble", "nan_scale",
    "negative_scale", "words_last_zero", "words_garbled", "bins_mismatch", "block_mismatch", "version",
    "scale_format", "side_without_content_size", "empty_words_for_coded", "nan_key_mean", "negative_key_range",
    "huge_key_range", "channel_block_cut",
]


@pytest.mark.parametrize("attack", HOSTILE)
def test_hostile_cachegen_sections(attack: str, single_worker) -> None:
    codec, payload = _cachegen_payload()
    layers = split_layers(payload, SHAPE[0])
    header, sections = _sections(layers[1])
    header = bytearray(header)
    side_len, side, lengths, words = sections[0]
    raw, fixed, channels = _side_parts(side)
    if attack == "stream_length_beyond_payload":
        sections[0][2][-1] += 5
    elif attack == "stream_length_huge":
        sections[0][2][0] = 0xFFFFFFFF
    elif attack == "streams_swapped":
        sections[0][3], sections[1][3] = sections[1][3], sections[0][3]
        sections[0][2], sections[1][2] = sections[1][2], sections[0][2]
    elif attack == "side_len_huge":
        sections[0][0] = 0xFFFFFFF0
    elif attack == "side_not_zstd":
        sections[0][1] = b"\x00" * side_len
    elif attack == "side_size_mismatch":
        _with_side(sections, 0, raw + b"\x00\x00")
    elif attack == "alphabet_above_bins":
        raw[fixed + channels] = 200
        _with_side(sections, 0, raw)
    elif attack == "alphabet_zero":
        raw[fixed + channels + 3] = 0
        _with_side(sections, 0, raw)
    elif attack == "lo_overflow":
        raw[fixed + 2] = 250
        _with_side(sections, 0, raw)
    elif attack == "padding_nibble":
        # make the code count odd by shrinking one channel's alphabet, then set the pad nibble
        sizes = raw[fixed + channels:fixed + 2 * channels]
        j = next(i for i, a in enumerate(sizes) if a >= 3)
        raw[fixed + channels + j] -= 1
        ncodes = sum(a for a in raw[fixed + channels:fixed + 2 * channels] if a >= 2)
        body = raw[:fixed + 2 * channels] + raw[fixed + 2 * channels:fixed + 2 * channels + (ncodes + 1) // 2]
        if ncodes % 2:
            body[-1] |= 0xF0
        _with_side(sections, 0, body)
    elif attack == "nan_scale":
        raw[0], raw[SHAPE[3]] = 0x00, 0x7E  # byte-shuffled fp16 0x7E00 = NaN
        _with_side(sections, 0, raw)
    elif attack == "negative_scale":
        raw[SHAPE[3]] |= 0x80
        _with_side(sections, 0, raw)
    elif attack == "words_last_zero":
        w = bytearray(words)
        w[4 * lengths[0] - 4:4 * lengths[0]] = b"\x00\x00\x00\x00"
        sections[0][3] = bytes(w)
    elif attack == "words_garbled":
        sections[0][3] = bytes(b ^ 0x5A for b in words)
    elif attack == "bins_mismatch":
        header[2] = 32 if header[2] != 32 else 16
    elif attack == "block_mismatch":
        header[4] = 17
    elif attack == "version":
        header[0] = 9
    elif attack == "scale_format":
        header[1] = 7
    elif attack == "side_without_content_size":
        frame = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(bytes(raw))
        sections[0][0], sections[0][1] = len(frame), frame
    elif attack == "empty_words_for_coded":
        sections[0][2] = [0] * len(lengths)
        sections[0][3] = b""
    elif attack == "nan_key_mean":
        header[6:8] = b"\x00\x7e"  # fp16 NaN as the first channel's mean
    elif attack == "negative_key_range":
        ranges = 6 + 2 * SHAPE[2] * SHAPE[4]
        header[ranges + 1] |= 0x80
    elif attack == "huge_key_range":  # an infinite range
        ranges = 6 + 2 * SHAPE[2] * SHAPE[4]
        header[ranges:ranges + 2] = b"\x00\x7c"
    elif attack == "channel_block_cut":
        header = header[:6 + 10]
    layers[1] = _join_sections(bytes(header), sections)
    assert not attempt(codec, join_layers(layers))
    # the same layer decoded alone fails the same way
    with pytest.raises(CodecError):
        codec.decode_layers(join_layers(layers), SHAPE, DTYPE, [1])


def test_hostile_zstd_frames(single_worker) -> None:
    codec = get_codec("zstd", {})
    layer_bytes = 2 * SHAPE[2] * SHAPE[3] * SHAPE[4] * 2
    huge = zstandard.ZstdCompressor().compress(b"\x00" * (layer_bytes * 64))  # a bomb: declares 64x the layer
    good = zstandard.ZstdCompressor().compress(b"\x00" * layer_bytes)
    for layer in (huge, good + b"junk", good[:-1], b"", b"\x28\xb5\x2f\xfd"):
        assert not attempt(codec, join_layers([layer, good]))
    assert attempt(codec, join_layers([good, good]))
    quant = get_codec("quant", {"zstd_level": 3})
    assert not attempt(quant, join_layers([huge, huge]))


def test_decode_of_level_mismatch_is_refused(single_worker) -> None:
    _, payload = _cachegen_payload(level=1)
    with pytest.raises(CodecError, match="bins"):
        get_codec("cachegen", {"level": 3, "block_tokens": 16}).decode(payload, SHAPE, DTYPE)
