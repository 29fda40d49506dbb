"""CacheGen's bitstream for one (layer, K-or-V) section: symbol tables, entropy models, ANS streams.

This module works on numpy arrays and constriction only; decode-pool helpers run it as the caller
does. A section holds the symbols of one layer's keys or values, viewed as ``[T, C]`` (token,
channel = head * head_dim + d), quantized with one scale per token (see ``cachegen.py``).

Section layout (little-endian)::

    side_len u32            bytes of the side-information frame
    side     one zstd frame (level 19) holding:
        scales   T x f16|f32    per-token scale (format from the layer header), byte-shuffled
        lo       C x u8         lowest symbol that occurs in the channel
        size     C x u8         alphabet size a_c = highest - lowest + 1 (>= 1)
        codes    ceil(A/2) B    4-bit log-probability codes, A = sum of a_c over channels with
                                a_c >= 2, two per byte, low nibble first, the unused high nibble zero
    lengths  B x u32        32-bit words in each block's stream (B = ceil(T / block_tokens))
    words    sum x u32      the streams, block after block

The side information is ~5% of the section at the middle level; zstd takes ~30% off it (scales'
exponent bytes and the tables are repetitive), 0.057 bits per element on Qwen-shaped KV.

Entropy model: one distribution per (K/V, layer, channel), histogrammed from the chunk itself.
Only the channel's occupied range [lo, lo + a_c) is modelled: symbols outside it never occur in
this chunk, a shorter alphabet makes constriction's table search faster, and a channel that holds
one symbol only (a_c == 1) costs no stream bits at all. Within the range, symbol i gets code
u_i = round(log2(p_max / p_i) / CODE_STEP) clipped to 0..15, and the decoder rebuilds an integer
frequency table summing to 2**16 with every entry >= 1 (a strictly increasing 16-bit CDF: no
symbol in range has zero probability). Any 4-bit code yields a valid table, so a hostile table
cannot reach constriction; 4 bits per entry instead of 16 cuts the table overhead by 4x for a
measured 0.3% of extra stream bits (CODE_STEP 0.5-0.75 measured within 0.1% of each other).

Streams: one ANS stream per block of at most ``block_tokens`` (<= 256) tokens; inside it, the
block's symbols channel after channel, each channel coded with its own concrete ``Categorical``
model in one vectorised call. Blocks decode independently; one stream per (channel, block) would
add a stream flush and a length entry per 256 symbols (~12% more bits) for no parallelism gain.
"""
from __future__ import annotations

import struct
from typing import Any, NamedTuple

import numpy as np

from ragkv.codecs.base import CodecError
from ragkv.codecs.optional_deps import require_constriction, require_zstd
from ragkv.codecs.zstd import shuffle_bytes, unshuffle_into, zstd_compress, zstd_decompress_exact

MAX_BLOCK_TOKENS = 256
CODE_BITS = 4
CODE_MAX = (1 << CODE_BITS) - 1
CODE_STEP = 0.625  # log2 units between successive codes: the most / least probable ratio spans 2**9.4
SIDE_ZSTD_LEVEL = 19
PROB_BITS = 16
PROB_TOTAL = 1 << PROB_BITS
# weight of each code, as integers so that the tables rebuilt from codes are identical everywhere
CODE_WEIGHTS = np.array([round(PROB_TOTAL * 2.0 ** (-u * CODE_STEP)) for u in range(CODE_MAX + 1)],
                        dtype=np.int64)


class SectionPlan(NamedTuple):
    """Where one validated section's parts lie in the payload buffer (plain ints: cheap to pickle)."""

    tokens: int
    channels: int
    nsym: int
    block: int
    scale_fmt: int
    side_off: int
    side_len: int
    side_size: int  # decompressed
    ncodes: int
    lengths_off: int
    nblocks: int
    words_off: int
    nwords: int


def _scale_itemsize(scale_fmt: int) -> int:
    return 2 if scale_fmt == 0 else 4


# -- entropy models --------------------------------------------------------------------------------------


def codes_from_counts(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Histograms int64 [C, nsym] -> the 4-bit codes of every coded channel's range, concatenated.

    Code 0 goes to the most frequent symbol; a symbol that never occurs inside the range gets 15.
    """
    nsym = counts.shape[1]
    pmax = counts.max(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log2(pmax / counts)
    u = np.rint(ratio / CODE_STEP)
    u[~np.isfinite(u)] = CODE_MAX
    u = np.clip(u, 0, CODE_MAX).astype(np.uint8)
    symbol = np.arange(nsym)[None, :]
    in_range = (symbol >= lo[:, None]) & (symbol <= hi[:, None]) & ((hi - lo) >= 1)[:, None]
    return u[in_range]


def frequency_tables(sizes: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coded channels' alphabet sizes (int64 [K], each >= 2) and their codes (uint8 [sum]) ->
    (float64 frequencies [sum], segment starts [K + 1]); each segment is >= 1 and sums to 2**16."""
    starts = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    if not len(sizes):
        return np.zeros(0), starts
    w = CODE_WEIGHTS[codes]
    seg_sum = np.add.reduceat(w, starts[:-1])
    freq = np.maximum((w << PROB_BITS) // np.repeat(seg_sum, sizes), 1)
    residual = PROB_TOTAL - np.add.reduceat(freq, starts[:-1])
    # the residual goes to each segment's most probable symbol: its smallest code, first on ties
    local = np.arange(len(codes), dtype=np.int64) - np.repeat(starts[:-1], sizes)
    key = codes.astype(np.int64) * 1024 + local
    first_min = starts[:-1] + np.minimum.reduceat(key, starts[:-1]) % 1024
    freq[first_min] += residual
    return freq.astype(np.float64), starts


def build_models(sizes: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """Per coded channel (a_c >= 2), its concrete constriction model; returns (coded channel ids, models)."""
    constriction = require_constriction()
    categorical = constriction.stream.model.Categorical
    coded = np.flatnonzero(sizes >= 2)
    freq, starts = frequency_tables(sizes[coded].astype(np.int64), codes)
    bounds = starts.tolist()
    models = [categorical(freq[bounds[j]:bounds[j + 1]], perfect=False) for j in range(len(coded))]
    return coded, models


# -- encode ----------------------------------------------------------------------------------------------


def encode_section(symbols: np.ndarray, nsym: int, block: int, scales: bytes, scale_itemsize: int) -> bytes:
    """uint8 symbols [T, C] (each < nsym) and the stored scales (little-endian bytes) -> the section."""
    constriction = require_constriction()
    tokens, channels = symbols.shape
    counts = np.bincount((np.arange(channels, dtype=np.int64)[None, :] * nsym + symbols).ravel(),
                         minlength=channels * nsym).reshape(channels, nsym)  # [C, nsym]
    present = counts > 0
    if tokens:
        lo = np.argmax(present, axis=1)
        hi = nsym - 1 - np.argmax(present[:, ::-1], axis=1)
    else:
        lo = np.zeros(channels, dtype=np.int64)
        hi = lo.copy()
    sizes = (hi - lo + 1).astype(np.int64)
    codes = codes_from_counts(counts, lo, hi)
    coded, models = build_models(sizes, codes)
    # channel-major symbols relative to each channel's lowest symbol: [ncoded, T] int32, contiguous
    rel = np.ascontiguousarray((symbols[:, coded].astype(np.int32) - lo[coded].astype(np.int32)).T)
    nblocks = -(-tokens // block)
    streams = []
    for b in range(nblocks):
        t0, t1 = b * block, min(tokens, (b + 1) * block)
        coder = constriction.stream.stack.AnsCoder()
        for j in range(len(models) - 1, -1, -1):  # a stack: last channel first, so decoding runs forward
            coder.encode_reverse(rel[j, t0:t1], models[j])
        streams.append(coder.get_compressed().astype("<u4"))
    lengths = np.array([len(w) for w in streams], dtype="<u4")
    raw_scales = np.frombuffer(scales, dtype=np.uint8)
    side = b"".join([shuffle_bytes(raw_scales, scale_itemsize).tobytes() if raw_scales.size else b"",
                     lo.astype(np.uint8).tobytes(), sizes.astype(np.uint8).tobytes(), pack_nibbles(codes).tobytes()])
    frame = zstd_compress(side, SIDE_ZSTD_LEVEL)
    return b"".join([struct.pack("<I", len(frame)), frame, lengths.tobytes(), *(w.tobytes() for w in streams)])


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, dtype=np.uint8)])
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    out = np.empty(2 * packed.size, dtype=np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:count]


# -- parse (validate) ------------------------------------------------------------------------------------


def parse_section(view: memoryview, pos: int, end: int, tokens: int, channels: int, nsym: int, block: int,
                  scale_fmt: int, what: str) -> tuple[SectionPlan, np.ndarray, np.ndarray]:
    """Validate one section starting at ``pos`` (before ``end``) and locate its parts; no symbol decoding.

    Every count is checked against the bytes actually present before anything is allocated, and the
    tables are checked so that nothing constriction receives can be malformed. Returns the plan, the
    section's scales (float32 [T], finite and >= 0) and its decompressed side information.
    """

    def need(n: int, part: str) -> None:
        if n < 0 or pos + n > end:
            raise CodecError(f"{what}: {part} needs {n} bytes at offset {pos}, the section has {end - pos}")

    need(4, "side-information length")
    (side_len,) = struct.unpack_from("<I", view, pos)
    pos += 4
    need(side_len, "side information")
    side_off = pos
    pos += side_len
    fixed = tokens * _scale_itemsize(scale_fmt) + 2 * channels
    side = _side_bytes(view, side_off, side_len, fixed, fixed + (channels * nsym + 1) // 2, what)
    lo = side[fixed - 2 * channels:fixed - channels]
    sizes = side[fixed - channels:fixed]
    if channels and (int(sizes.min()) < 1 or int((lo.astype(np.int64) + sizes).max()) > nsym):
        raise CodecError(f"{what}: channel symbol ranges fall outside the {nsym} symbols of this layer's bins")
    if tokens == 0 and channels and int(sizes.max()) != 1:
        raise CodecError(f"{what}: an empty chunk cannot have coded channels")
    ncodes = int(sizes[sizes >= 2].astype(np.int64).sum())
    if len(side) != fixed + (ncodes + 1) // 2:
        raise CodecError(f"{what}: side information of {len(side)} bytes, its tables imply "
                         f"{fixed + (ncodes + 1) // 2}")
    if ncodes % 2 and side[-1] >> 4:
        raise CodecError(f"{what}: nonzero padding nibble in the probability codes")
    nblocks = -(-tokens // block)
    need(4 * nblocks, "stream lengths")
    lengths = np.frombuffer(view, dtype="<u4", count=nblocks, offset=pos)
    lengths_off = pos
    pos += 4 * nblocks
    nwords = int(lengths.astype(np.int64).sum())
    need(4 * nwords, "streams")
    words_off = pos
    if ncodes == 0 and nwords:
        raise CodecError(f"{what}: streams present for a section with no coded channel")
    if ncodes and nblocks and int(lengths.min()) == 0:
        raise CodecError(f"{what}: an empty stream for a block with coded channels")
    scales = read_side_scales(side, tokens, scale_fmt)
    if tokens and (not np.isfinite(scales).all() or (scales < 0).any()):
        raise CodecError(f"{what}: invalid stored token scale")
    plan = SectionPlan(tokens, channels, nsym, block, scale_fmt, side_off, side_len, len(side), ncodes,
                       lengths_off, nblocks, words_off, nwords)
    return plan, scales, side


def _side_bytes(view: memoryview, off: int, length: int, low: int, high: int, what: str) -> np.ndarray:
    """Decompress a side-information frame whose size must lie in [low, high]."""
    zstandard = require_zstd()
    frame = view[off:off + length]
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: side information is not a zstd frame ({exc})") from exc
    if not low <= declared <= high:
        raise CodecError(f"{what}: side information declares {declared} bytes, the shape allows {low}..{high}")
    return np.frombuffer(zstd_decompress_exact(frame, declared, f"{what} side information"), dtype=np.uint8)


def read_side_scales(side: np.ndarray, tokens: int, scale_fmt: int) -> np.ndarray:
    itemsize = _scale_itemsize(scale_fmt)
    raw = np.empty(tokens * itemsize, dtype=np.uint8)
    if tokens:
        unshuffle_into(side[:tokens * itemsize], itemsize, raw)
    return raw.view("<f2" if itemsize == 2 else "<f4").astype(np.float32)


def section_end(plan: SectionPlan) -> int:
    return plan.words_off + 4 * plan.nwords


# -- decode ----------------------------------------------------------------------------------------------


def decode_section(view: memoryview, plan: SectionPlan, out: np.ndarray, what: str = "cachegen section",
                   side: np.ndarray | None = None) -> None:
    """Decode one validated section's symbols into ``out`` (uint8 [T, C]).

    Each channel's decoded run is written straight into its column of ``out`` (no per-block stacking,
    no transpose afterwards: measured cheaper than row writes plus one transpose). ``side`` is the
    decompressed side information when the caller already has it from validation.
    """
    constriction = require_constriction()
    tokens, channels = plan.tokens, plan.channels
    if tokens == 0 or channels == 0:
        return
    if side is None:
        side = _side_bytes(view, plan.side_off, plan.side_len, plan.side_size, plan.side_size, what)
    fixed = plan.side_size - (plan.ncodes + 1) // 2
    lo = side[fixed - 2 * channels:fixed - channels]
    sizes = side[fixed - channels:fixed]
    if len(side) != plan.side_size or int(sizes[sizes >= 2].astype(np.int64).sum()) != plan.ncodes:
        raise CodecError(f"{what}: side information changed between validation and decoding")
    codes = unpack_nibbles(side[fixed:], plan.ncodes)
    lengths = np.frombuffer(view, dtype="<u4", count=plan.nblocks, offset=plan.lengths_off).astype(np.int64)
    words = np.frombuffer(view, dtype="<u4", count=plan.nwords, offset=plan.words_off)
    coded, models = build_models(sizes, codes)
    if len(models) < channels:
        out[:, sizes == 1] = 0
    if models:
        ans = constriction.stream.stack.AnsCoder
        pairs = list(zip(coded.tolist(), models))
        block = plan.block
        starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        for b in range(plan.nblocks):
            t0 = b * block
            n = min(block, tokens - t0)
            dst = out[t0:t0 + n]
            try:
                coder = ans(words[starts[b]:starts[b + 1]])
                for c, model in pairs:
                    dst[:, c] = coder.decode(model, n)
                clean = coder.is_empty()
            except (ValueError, KeyError, RuntimeError, OverflowError) as exc:
                raise CodecError(f"{what}: corrupt stream in block {b}: {exc}") from exc
            if not clean:
                raise CodecError(f"{what}: stream of block {b} does not end where its symbols do")
    np.add(out, lo[None, :], out=out)  # symbols were decoded relative to each channel's lowest
