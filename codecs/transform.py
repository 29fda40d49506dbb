"""The ``transform`` codec: KVTC-style transform coding against a per-model calibrated basis.

Per layer, keys (RoPE undone at the chunk's positions) and values are viewed as features ``[T, C]``
(``C = kv_heads * head_dim``), centred on the basis' mean and projected onto its principal components.
A level is a budget in bits per element; it is spread over the components of a layer's keys and values
together, minimising the sum of K's and V's relative squared errors: component i with variance
``lambda_i`` (over its kind's total variance ``S``) at width ``b_i`` costs ``lambda_i / S * 4**-b_i``, and the
widths that minimise the sum under ``sum(b_i) <= budget`` are found by giving one bit at a time to the
component whose error drops most (exact for this separable convex objective: the greedy steps are the
dynamic programme's optimal path). Components left at 0 bits are dropped. A component at ``w`` bits is
quantized uniformly with step ``6 sigma_i / 2**w``, its symbols clipped at +-16 sigma, and entropy-coded
with constriction's ANS coder under the basis' stored model for width ``w`` (one concrete ``Categorical``
per width: one vectorised call codes every component of that width).

The first ``sink_tokens`` tokens (attention sinks when a prompt starts the chunk) are coded under a budget
of ``SINK_BITS`` bits per element instead of the level's.

Layer payload (little-endian): a header ``<BBBBII8s>`` (format version, level, sink tokens coded,
flags: bit 0 = keys coded with RoPE undone, tokens, the first token's position, the basis digest's first
8 bytes),
the number of 32-bit words in the layer's ANS stream (u32), the stream. The stream holds, in decode order,
keys then values, each as the sink rows' widths then the other rows' widths, each width component-major.
The full basis digest is a codec parameter (recorded in the entry header by ``payload_params``); a payload
whose basis is missing or different is a ``CodecError`` (a miss), never garbage.
"""
from __future__ import annotations

import heapq
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ragkv.codecs.base import (
    CodecError,
    CodecParams,
    check_encode_input,
    join_layers,
    register_codec,
)
from ragkv.codecs.buffers import as_float32, scratch_float32, scratch_int32, write_float32
from ragkv.codecs.decode_pool import get_pool, run_if_free
from ragkv.codecs.layered import ValidatingCodec
from ragkv.codecs.optional_deps import require_constriction
from ragkv.codecs.parallel import decode_workers
from ragkv.codecs.payload import ByteReader, check_finite
from ragkv.codecs.rotary import cos_sin, rotate
from ragkv.codecs.transform_basis import (
    MAX_WIDTH,
    STEP_SIGMAS,
    TransformBasis,
    default_basis_digest,
    find_basis,
    symbol_radius,
)
from ragkv.codecs.transform_stream import Piece, StreamUnit, decode_symbols, layer_pieces

FORMAT_VERSION = 1
_HEADER = struct.Struct("<BBBBII8s")
_WORDS = struct.Struct("<I")
FLAG_ROPE_UNDONE = 1
# level -> budget in bits per element (before entropy coding, which takes it lower still)
LEVEL_BITS: dict[int, float] = {1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0, 5: 3.0, 6: 4.0, 7: 5.0, 8: 6.0}
DEFAULT_LEVEL = 3
SINK_BITS = 6.0
DEFAULT_SINK_TOKENS = 4
MAX_SINK_TOKENS = 255
MAX_POSITION = (1 << 32) - 1
POOL_MIN_SYMBOLS = 1 << 17  # below this many symbols a decode stays in-process (the round trip costs more)


@dataclass(frozen=True)
class TransformParams(CodecParams):
    level: int = DEFAULT_LEVEL
    basis: str = ""  # hex SHA-256 of the basis; "" = the default basis registered for the KV's shape
    sink_tokens: int = DEFAULT_SINK_TOKENS

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or self.level not in LEVEL_BITS:
            raise CodecError(f"transform level must be one of {sorted(LEVEL_BITS)}, got {self.level!r}")
        if not isinstance(self.basis, str) or (self.basis and (len(self.basis) != 64 or not all(
                c in "0123456789abcdef" for c in self.basis))):
            raise CodecError(f"transform basis must be '' or a 64-character lowercase hex digest, got {self.basis!r}")
        if (not isinstance(self.sink_tokens, int) or isinstance(self.sink_tokens, bool)
                or not 0 <= self.sink_tokens <= MAX_SINK_TOKENS):
            raise CodecError(f"transform sink_tokens must be an integer in 0..{MAX_SINK_TOKENS}, "
                             f"got {self.sink_tokens!r}")


class KindPlan(NamedTuple):
    """How one layer group's keys or values are coded at one budget (k kept components, widths ascending)."""

    columns: np.ndarray  # [k] the kept components' indices in the basis
    projection: np.ndarray  # [C, k] float32: the kept components
    mean: np.ndarray  # [C] float32
    steps: np.ndarray  # [k] float32
    widths: list[tuple[int, int, int]]  # (width, first kept column, end kept column)
    # decoding in one product: x = offset + symbols [t, k] @ reconstruction, where the rows of
    # the reconstruction are scaled by the steps and the symbols' radius is folded into the offset
    reconstruction: np.ndarray  # [k, C] float32, the rows scaled by the steps
    offset: np.ndarray  # [C] float32, the mean with the symbols' radius folded in


def allocate_widths(key_variances: np.ndarray, value_variances: np.ndarray, budget: int) -> tuple[np.ndarray, ...]:
    """Widths (bits) for every key and value component under ``budget`` bits per token, minimising
    ``sum(lambda_i / S_kind * 4**-b_i)``; at most ``MAX_WIDTH`` bits each."""
    weights = []
    for variances in (key_variances, value_variances):
        total = float(np.sum(variances, dtype=np.float64))
        weights.append(variances.astype(np.float64) / total if total > 0 else np.zeros(len(variances)))
    weight = np.concatenate(weights)
    widths = np.zeros(len(weight), dtype=np.int64)
    heap = [(-0.75 * w, i) for i, w in enumerate(weight.tolist()) if w > 0]
    heapq.heapify(heap)
    for _ in range(max(budget, 0)):
        if not heap:
            break
        _, i = heapq.heappop(heap)
        widths[i] += 1
        if widths[i] < MAX_WIDTH:
            heapq.heappush(heap, (-0.75 * weight[i] * 4.0 ** -int(widths[i]), i))
    return widths[:len(key_variances)], widths[len(key_variances):]


def _kind_plan(kind_basis: Any, widths: np.ndarray) -> KindPlan:
    order = [(w, i) for i, w in enumerate(widths.tolist()) if w > 0]
    order.sort()
    columns = np.array([i for _, i in order], dtype=np.int64)
    sigma = np.sqrt(kind_basis.variances.astype(np.float64))
    steps = np.array([STEP_SIGMAS * sigma[i] / (1 << w) for w, i in order], dtype=np.float32)
    spans: list[tuple[int, int, int]] = []
    for j, (w, _) in enumerate(order):
        if spans and spans[-1][0] == w:
            spans[-1] = (w, spans[-1][1], j + 1)
        else:
            spans.append((w, j, j + 1))
    projection = np.ascontiguousarray(kind_basis.components[:, columns])  # [C, k]
    radius = np.array([symbol_radius(w) for w, _ in order], dtype=np.float64)
    scaled = projection.T.astype(np.float64) * steps.astype(np.float64)[:, None]  # [k, C]
    offset = kind_basis.mean.astype(np.float64) - radius @ scaled
    return KindPlan(columns, projection.astype(np.float32), kind_basis.mean.astype(np.float32), steps, spans,
                    scaled.astype(np.float32), offset.astype(np.float32))


def layer_plans(basis: TransformBasis, layer: int, bits: float) -> tuple[KindPlan, KindPlan]:
    """(keys plan, values plan) of ``layer``'s group at ``bits`` per element (memoised on the basis)."""
    group = layer // basis.layer_group

    def build() -> tuple[KindPlan, KindPlan]:
        keys, values = basis.groups[group]
        budget = round(bits * 2 * basis.features)
        key_widths, value_widths = allocate_widths(keys.variances, values.variances, budget)
        return _kind_plan(keys, key_widths), _kind_plan(values, value_widths)

    return basis.cached(("plan", group, bits), build)


def width_model(basis: TransformBasis, width: int) -> Any:
    """The basis' concrete entropy model for ``width``-bit symbols (memoised on the basis)."""
    categorical = require_constriction().stream.model.Categorical
    return basis.cached(("model", width), lambda: categorical(basis.probabilities[width - 1], perfect=False))


def stream_layout(basis: TransformBasis, layer: int, bits: float, sinks: int, tokens: int
                  ) -> list[tuple[int, KindPlan, int, int]]:
    """A layer's stream in decode order: (kind, coding plan, first row, end row) for the keys' then the values'
    sink rows and other rows (empty row ranges left out)."""
    sink_plans = layer_plans(basis, layer, SINK_BITS)
    plans = layer_plans(basis, layer, bits)
    return [(kind, plan, lo, hi) for kind in (0, 1)
            for plan, lo, hi in ((sink_plans[kind], 0, sinks), (plans[kind], sinks, tokens)) if hi > lo]


class _LayerPlan(NamedTuple):
    basis: TransformBasis
    sinks: int
    position: int | None  # None: keys were coded as they are
    words: np.ndarray  # uint32 stream
    layer: int


@register_codec
class TransformCodec(ValidatingCodec):
    name = "transform"
    params_class = TransformParams
    lossless = False

    @property
    def bits(self) -> float:
        return LEVEL_BITS[self.params.level]

    def basis_for(self, num_layers: int, heads: int, dim: int) -> TransformBasis:
        """The basis this codec codes KV of that shape with: its ``basis`` parameter, or the registered default."""
        digest = self.params.basis or default_basis_digest(num_layers, heads, dim)
        if not digest:
            raise CodecError(f"no transform basis for KV of {num_layers} layers, {heads} KV heads, head_dim {dim}: "
                             f"run `ragkv calibrate` (or register one) first")
        basis = find_basis(digest)
        if basis.shape_key != (num_layers, heads, dim):
            raise CodecError(f"transform basis {digest[:16]}… is for {basis.shape_key} (layers, kv_heads, "
                             f"head_dim), not {(num_layers, heads, dim)}")
        return basis

    def payload_params(self, kv: torch.Tensor) -> dict[str, Any]:
        """The parameters a payload of ``kv`` decodes with: the basis named explicitly."""
        basis = self.basis_for(kv.shape[0], kv.shape[2], kv.shape[4])
        return {**self.params.to_dict(), "basis": basis.digest}

    # -- encode --------------------------------------------------------------------------------------------
    def encode(self, kv: torch.Tensor, position: int | None = None) -> bytes:
        kv = check_encode_input(kv)
        num_layers, _, heads, tokens, dim = kv.shape
        basis = self.basis_for(num_layers, heads, dim)
        if position is not None and (isinstance(position, bool) or not 0 <= int(position) <= MAX_POSITION):
            raise CodecError(f"position must be an integer in 0..{MAX_POSITION}, got {position!r}")
        rope = position is not None and len(basis.inv_freq) > 0
        table = cos_sin(basis.inv_freq, int(position), tokens) if rope else None
        sinks = min(self.params.sink_tokens, tokens)
        header = _HEADER.pack(FORMAT_VERSION, self.params.level, sinks, FLAG_ROPE_UNDONE if rope else 0, tokens,
                              int(position) if rope else 0, bytes.fromhex(basis.digest[:16]))
        return join_layers([self._encode_layer(kv[i], i, basis, table, sinks, header) for i in range(num_layers)])

    def _encode_layer(self, layer: torch.Tensor, index: int, basis: TransformBasis,
                      table: tuple[np.ndarray, np.ndarray] | None, sinks: int, header: bytes) -> bytes:
        # layer: [2, H, T, D] -> x: [2, T, H, D] float32 (numpy on this thread, as the decoder)
        _, heads, tokens, dim = layer.shape
        x = as_float32(layer.permute(0, 2, 1, 3), "transform_x")
        check_finite(x, self.name)
        if table is not None:  # keys with RoPE undone: rotated back by their positions' angles
            x[0] = rotate(x[0], table[0][:, None, :], table[1][:, None, :], inverse=True)
        features = x.reshape(2, tokens, heads * dim)  # [2, T, C]
        pieces: list[tuple[np.ndarray, Any]] = []  # (symbols, model) in decode order
        for kind, plan, lo, hi in stream_layout(basis, index, self.bits, sinks, tokens):
            if not plan.widths:
                continue
            coefficients = (features[kind, lo:hi] - plan.mean) @ plan.projection  # [t, k]
            for width, start, end in plan.widths:
                radius = symbol_radius(width)
                q = np.clip(np.rint(coefficients[:, start:end] / plan.steps[start:end]), -radius, radius)
                pieces.append((np.ascontiguousarray(q.T, dtype=np.int32).ravel() + radius, width_model(basis, width)))
        coder = require_constriction().stream.stack.AnsCoder()
        for symbols, model in reversed(pieces):
            coder.encode_reverse(symbols, model)
        words = coder.get_compressed() if pieces else np.zeros(0, np.uint32)
        return b"".join([header, _WORDS.pack(len(words)), np.ascontiguousarray(words, dtype="<u4").tobytes()])

    # -- decode --------------------------------------------------------------------------------------------
    def plan_layer(self, data: memoryview, shape: tuple[int, int, int, int], dtype: torch.dtype,
                   layer_index: int, num_layers: int) -> _LayerPlan:
        _, heads, tokens, dim = shape
        reader = ByteReader(data, f"transform layer {layer_index}")
        version, level, sinks, flags, coded_tokens, position, prefix = reader.unpack(_HEADER.format)
        if version != FORMAT_VERSION:
            raise CodecError(f"transform layer {layer_index}: format version {version} is not {FORMAT_VERSION}")
        if level != self.params.level:
            raise CodecError(f"transform layer {layer_index}: coded at level {level}, not {self.params.level}")
        if coded_tokens != tokens:
            raise CodecError(f"transform layer {layer_index}: holds {coded_tokens} tokens, not {tokens}")
        if sinks != min(self.params.sink_tokens, tokens) or flags not in (0, FLAG_ROPE_UNDONE):
            raise CodecError(f"transform layer {layer_index}: header does not match the parameters")
        basis = self.basis_for(num_layers, heads, dim)
        if bytes(prefix) != bytes.fromhex(basis.digest[:16]):
            raise CodecError(f"transform layer {layer_index}: coded with another basis than {basis.digest[:16]}…")
        if flags and not len(basis.inv_freq):
            raise CodecError(f"transform layer {layer_index}: keys coded with RoPE undone, basis has no rotary")
        (count,) = reader.unpack(_WORDS.format)
        words = reader.array(np.uint32, count)
        reader.done()
        return _LayerPlan(basis, sinks, position if flags else None, words, layer_index)

    def _layout(self, plan: _LayerPlan, tokens: int) -> list[tuple[int, KindPlan, int, int]]:
        return stream_layout(plan.basis, plan.layer, self.bits, plan.sinks, tokens)

    def _layer_pieces(self, plan: _LayerPlan, tokens: int) -> tuple[Piece, ...]:
        return layer_pieces([(kind_plan, hi - lo) for _, kind_plan, lo, hi in self._layout(plan, tokens)])

    def decode_planned(self, plan: _LayerPlan, shape: tuple[int, int, int, int], dtype: torch.dtype,
                       out: torch.Tensor) -> None:
        pieces = self._layer_pieces(plan, shape[2])
        symbols = scratch_int32("transform_symbols", sum(p.count for p in pieces))
        decode_symbols(plan.words, pieces, lambda width: width_model(plan.basis, width), symbols,
                       f"transform layer {plan.layer}")
        self._reconstruct(plan, symbols, shape, out)

    def _reconstruct(self, plan: _LayerPlan, symbols: np.ndarray, shape: tuple[int, int, int, int],
                     out: torch.Tensor) -> None:
        """A layer's decoded symbols (int32, stream order) -> ``out`` ``[2, H, T, D]``. numpy on this thread:
        torch's intra-op threads cost far more than they save on these sizes when the cores are shared."""
        _, heads, tokens, dim = shape
        x = scratch_float32("transform_features", (2, tokens, heads * dim))
        pos = 0
        for kind, kind_plan, lo, hi in self._layout(plan, tokens):
            rows = x[kind, lo:hi]
            if not kind_plan.widths:
                rows[:] = kind_plan.mean
                continue
            kept = kind_plan.projection.shape[1]
            block = symbols[pos:pos + kept * (hi - lo)].reshape(kept, hi - lo)  # [k, t]
            pos += kept * (hi - lo)
            np.matmul(block.T.astype(np.float32), kind_plan.reconstruction, out=rows)
            rows += kind_plan.offset
        x4 = x.reshape(2, tokens, heads, dim)
        keys = x4[0]
        if plan.position is not None:
            cos, sin = cos_sin(plan.basis.inv_freq, plan.position, tokens)
            keys = rotate(keys, cos[:, None, :], sin[:, None, :])
        write_float32(out[0], keys.transpose(1, 0, 2))  # [H, T, D]
        write_float32(out[1], x4[1].transpose(1, 0, 2))

    def decode_all(self, plans: Sequence[_LayerPlan], shape: tuple[int, int, int, int], dtype: torch.dtype,
                   out: torch.Tensor) -> None:
        """With ``decode_workers() > 1`` and enough symbols, pool helpers decode layers' streams while this thread
        reconstructs the finished ones; else one layer after another."""
        pieces = [self._layer_pieces(plan, shape[2]) for plan in plans]
        counts = [sum(p.count for p in layer) for layer in pieces]
        workers = decode_workers()
        pool = get_pool(workers - 1, wait=False) if (workers > 1 and len(plans) > 1
                                                     and sum(counts) >= POOL_MIN_SYMBOLS) else None
        if not self._decode_pooled(pool, list(plans), pieces, counts, shape, out):
            super().decode_all(plans, shape, dtype, out)

    def _decode_pooled(self, pool: Any, plans: list[_LayerPlan], pieces: list[tuple[Piece, ...]], counts: list[int],
                       shape: tuple[int, int, int, int], out: torch.Tensor) -> bool:
        """Helpers and this thread claim layers' streams; this thread reconstructs each as it finishes. False
        when there is no pool free to use."""
        if pool is None:
            return False
        basis = plans[0].basis
        segments, units, words_off, out_off = [], [], 0, 0
        for plan, layer_pieces_, count in zip(plans, pieces, counts, strict=True):
            segments.append(memoryview(plan.words).cast("B"))
            units.append(StreamUnit(words_off, len(plan.words), out_off, layer_pieces_))
            words_off += 4 * len(plan.words)
            out_off += count
        widths = sorted({p.width for layer in pieces for p in layer})
        spec = (basis.digest, {w: basis.probabilities[w - 1] for w in widths}, units)

        def local(buf: memoryview, symbols: np.ndarray, unit: int) -> None:
            u = units[unit]
            decode_symbols(plans[unit].words, u.pieces, lambda width: width_model(basis, width),
                           symbols.view(np.int32)[u.out_off:u.out_off + counts[unit]], f"transform unit {unit}")

        def finished(symbols: np.ndarray, unit: int, result: object = None) -> None:
            u = units[unit]
            self._reconstruct(plans[unit], symbols.view(np.int32)[u.out_off:u.out_off + counts[unit]], shape,
                              out[unit])

        return run_if_free(pool, "transform_decode_layer", segments, 4 * out_off, spec, len(units), local, finished)


__all__ = ["LEVEL_BITS", "TransformCodec", "TransformParams", "allocate_widths", "layer_plans"]
