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

import functools
import heapq
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ragkv.codecs.base import CodecError, CodecParams, check_encode_input, join_layers, register_codec
from ragkv.codecs.layered import ValidatingCodec
from ragkv.codecs.optional_deps import require_constriction
from ragkv.codecs.payload import ByteReader
from ragkv.codecs.rotary import cos_sin, rotate
from ragkv.codecs.transform_basis import (
    MAX_WIDTH,
    STEP_SIGMAS,
    TransformBasis,
    default_basis_digest,
    find_basis,
    symbol_radius,
)
from ragkv.codecs.transform_fit import features

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
    projection: torch.Tensor  # [C, k] float32: the kept components
    mean: torch.Tensor  # [C] float32
    steps: torch.Tensor  # [k] float32
    widths: list[tuple[int, int, int]]  # (width, first kept column, end kept column)
    # decoding in one product: x = symbol_offset + symbols [t, k] @ scaled_reconstruction, where the rows of
    # the reconstruction are scaled by the steps and the symbols' radius is folded into the offset
    scaled_reconstruction: torch.Tensor  # [k, C] float32
    symbol_offset: torch.Tensor  # [C] float32


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
    return KindPlan(columns, torch.from_numpy(projection), torch.from_numpy(kind_basis.mean), torch.from_numpy(steps), spans,
                    torch.from_numpy(scaled.astype(np.float32)), torch.from_numpy(offset.astype(np.float32)))


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


def _rope_table(basis: TransformBasis, position: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[T, D]`` for tokens at ``position ..``: rows of a cached table whose length is a power of two."""
    cos, sin = _rope_rows(basis.inv_freq.tobytes(), position, max(1, 1 << (tokens - 1).bit_length()))
    return cos[:tokens], sin[:tokens]


@functools.lru_cache(maxsize=32)
def _rope_rows(inv_freq: bytes, position: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return cos_sin(np.frombuffer(inv_freq, dtype=np.float32), position, rows)


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
        table = _rope_table(basis, int(position), tokens) if rope else None
        sinks = min(self.params.sink_tokens, tokens)
        header = _HEADER.pack(FORMAT_VERSION, self.params.level, sinks, FLAG_ROPE_UNDONE if rope else 0, tokens,
                              int(position) if rope else 0, bytes.fromhex(basis.digest[:16]))
        return join_layers([self._encode_layer(kv[i], i, basis, table, sinks, header) for i in range(num_layers)])

    def _encode_layer(self, layer: torch.Tensor, index: int, basis: TransformBasis,
                      table: tuple[torch.Tensor, torch.Tensor] | None, sinks: int, header: bytes) -> bytes:
        sink_plans = layer_plans(basis, index, SINK_BITS)
        plans = layer_plans(basis, index, self.bits)
        pieces: list[tuple[np.ndarray, Any]] = []  # (symbols, model) in decode order
        for kind in (0, 1):
            x = features(layer[kind], table if kind == 0 else None)  # [T, C]
            if not torch.isfinite(x).all():
                raise CodecError("transform codec: KV holds non-finite values")
            for plan, rows in ((sink_plans[kind], x[:sinks]), (plans[kind], x[sinks:])):
                if rows.shape[0] == 0 or not plan.widths:
                    continue
                coefficients = (rows - plan.mean) @ plan.projection  # [t, k]
                for width, start, end in plan.widths:
                    radius = symbol_radius(width)
                    q = torch.round(coefficients[:, start:end] / plan.steps[start:end]).clamp_(-radius, radius)
                    symbols = (q.T.contiguous().numpy().astype(np.int32) + radius).ravel()
                    pieces.append((symbols, width_model(basis, width)))
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

    def decode_planned(self, plan: _LayerPlan, shape: tuple[int, int, int, int], dtype: torch.dtype,
                       out: torch.Tensor) -> None:
        _, heads, tokens, dim = shape
        basis, sinks = plan.basis, plan.sinks
        sink_plans = layer_plans(basis, plan.layer, SINK_BITS)
        plans = layer_plans(basis, plan.layer, self.bits)
        coder = require_constriction().stream.stack.AnsCoder(plan.words) if len(plan.words) else None
        try:
            for kind in (0, 1):
                x = torch.empty((tokens, heads * dim), dtype=torch.float32)
                for kind_plan, lo, hi in ((sink_plans[kind], 0, sinks), (plans[kind], sinks, tokens)):
                    self._decode_rows(coder, basis, kind_plan, x[lo:hi], layer=plan.layer)
                x = x.view(tokens, heads, dim).permute(1, 0, 2)  # [H, T, D]
                if kind == 0 and plan.position is not None:
                    x = rotate(x, *_rope_table(basis, plan.position, tokens))
                out[kind].copy_(x)
            clean = coder is None or coder.is_empty()
        except (ValueError, KeyError, RuntimeError, OverflowError) as exc:
            raise CodecError(f"transform layer {plan.layer}: corrupt stream: {exc}") from exc
        if not clean:
            raise CodecError(f"transform layer {plan.layer}: stream does not end where its symbols do")

    @staticmethod
    def _decode_rows(coder: Any, basis: TransformBasis, plan: KindPlan, rows: torch.Tensor, layer: int) -> None:
        """Decode ``rows`` (``[t, C]`` float32, filled in place) from the stream."""
        count = rows.shape[0]
        if count == 0:
            return
        if not plan.widths:
            rows.copy_(plan.mean.expand_as(rows))
            return
        if coder is None:
            raise CodecError(f"transform layer {layer}: stream is empty but symbols are expected")
        symbols = np.empty((plan.projection.shape[1], count), dtype=np.int32)  # [k, t]
        for width, start, end in plan.widths:
            symbols[start:end] = coder.decode(width_model(basis, width), (end - start) * count).reshape(-1, count)
        torch.addmm(plan.symbol_offset, torch.from_numpy(symbols).T.to(torch.float32), plan.scaled_reconstruction,
                    out=rows)


__all__ = ["LEVEL_BITS", "TransformCodec", "TransformParams", "allocate_widths", "layer_plans"]
