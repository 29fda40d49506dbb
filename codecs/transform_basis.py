"""The ``transform`` codec's per-model basis: what calibration measured, its bytes, and where codecs find it.

A basis holds, per layer group and per K/V: the mean feature vector (``C = kv_heads * head_dim``), the
principal components (columns of a ``[C, R]`` matrix) and their variances; the model's rotary inverse
frequencies (keys are coded with RoPE undone); and one entropy model per quantizer width, measured on the
calibration KV (the "stored categorical" models: a component quantized to ``w`` bits follows nearly the
same distribution in every layer once divided by its standard deviation, so one table per width serves all).

Bytes (little-endian), content-addressed by their SHA-256::

    magic     8 B   b"RKVBASIS"
    header    <HIHHIHH>  version, layers, kv_heads, head_dim, layer_group, rank, rotary pairs (0 or head_dim/2)
    inv_freq  f32 [pairs]
    per group g = 0 .. ceil(layers / layer_group) - 1, per kind (keys, values):
        mean f32 [C], variances f32 [R] (non-increasing, >= 0), components f32 [C, R] (unit columns)
    per width w = 1 .. MAX_WIDTH: probabilities f32 [2 * symbol_radius(w) + 1]

A basis read from a store is untrusted: ``basis_from_bytes`` checks the digest, the exact size the header
implies (before any array is read), finiteness, the order of the variances and the unit norm of every
component, and refuses more than ``MAX_BASIS_BYTES``.

Codecs find a basis by digest through a process-wide registry: bases registered here (``register_basis``),
else from the sources added with ``add_basis_source`` (every tier adds itself: any source returning the bytes
of that digest is as good as any other, since the digest names the content).
"""
from __future__ import annotations

import hashlib
import math
import struct
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragkv.codecs.base import CodecError
from ragkv.codecs.payload import ByteReader

MAGIC = b"RKVBASIS"
BASIS_VERSION = 1
_HEADER = struct.Struct("<HIHHIHH")
MAX_BASIS_BYTES = 512 << 20
MAX_LAYERS = 4096
MAX_FEATURES = 1 << 15
MAX_WIDTH = 10  # bits of the widest quantizer (attention-sink tokens reach it; level budgets rarely do)
STEP_SIGMAS = 6.0  # a w-bit quantizer's step is STEP_SIGMAS * sigma / 2**w (w bits uniform over +-3 sigma)
CLIP_SIGMAS = 16.0  # symbols reach +-CLIP_SIGMAS * sigma: entropy coding makes the rare tails nearly free
MIN_PROBABILITY = 1e-7  # every symbol of a width's alphabet stays codable
NORM_TOLERANCE = 1e-3


def symbol_radius(width: int) -> int:
    """Largest |symbol| of a ``width``-bit quantizer (symbols run over -radius .. radius)."""
    return math.ceil(CLIP_SIGMAS * (1 << width) / STEP_SIGMAS)


@dataclass(frozen=True)
class KindBasis:
    """One layer group's keys or values: ``mean`` [C], ``variances`` [R], ``components`` [C, R] (float32)."""

    mean: np.ndarray
    variances: np.ndarray
    components: np.ndarray


@dataclass(eq=False)
class TransformBasis:
    """A calibrated basis (see the module docstring); ``groups[g][kind]`` with kind 0 = keys, 1 = values."""

    num_layers: int
    kv_heads: int
    head_dim: int
    layer_group: int
    inv_freq: np.ndarray  # float32 [head_dim / 2], or empty when keys carry no rotary embedding
    groups: list[tuple[KindBasis, KindBasis]]
    probabilities: list[np.ndarray]  # index w - 1: float64 [2 * symbol_radius(w) + 1], summing to 1
    digest: str = ""
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def features(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def rank(self) -> int:
        return self.groups[0][0].components.shape[1] if self.groups else 0

    @property
    def shape_key(self) -> tuple[int, int, int]:
        return self.num_layers, self.kv_heads, self.head_dim

    def group_of(self, layer: int) -> tuple[KindBasis, KindBasis]:
        return self.groups[layer // self.layer_group]

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """Memoise derived tables (bit plans, entropy models) on the basis, thread-safely."""
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = build()
        with self._lock:
            return self._cache.setdefault(key, value)


def _group_count(num_layers: int, layer_group: int) -> int:
    return -(-num_layers // layer_group)


def _expected_size(layers: int, features: int, layer_group: int, rank: int, pairs: int) -> int:
    floats = pairs + _group_count(layers, layer_group) * 2 * (features + rank + features * rank)
    floats += sum(2 * symbol_radius(w) + 1 for w in range(1, MAX_WIDTH + 1))
    return len(MAGIC) + _HEADER.size + 4 * floats


def basis_to_bytes(basis: TransformBasis) -> bytes:
    """The basis' bytes (deterministic); their SHA-256 is its digest."""
    parts = [MAGIC, _HEADER.pack(BASIS_VERSION, basis.num_layers, basis.kv_heads, basis.head_dim, basis.layer_group,
                                 basis.rank, len(basis.inv_freq)),
             np.ascontiguousarray(basis.inv_freq, dtype="<f4").tobytes()]
    for group in basis.groups:
        for kind in group:
            parts += [np.ascontiguousarray(a, dtype="<f4").tobytes()
                      for a in (kind.mean, kind.variances, kind.components)]
    parts += [np.ascontiguousarray(p, dtype="<f4").tobytes() for p in basis.probabilities]
    return b"".join(parts)


def digest_of(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _finite(array: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise CodecError(f"transform basis: {what} holds NaN or infinity")
    return array


def _read_kind(reader: ByteReader, features: int, rank: int, where: str) -> KindBasis:
    mean = _finite(reader.array(np.float32, features), f"{where} mean").astype(np.float32)
    variances = _finite(reader.array(np.float32, rank), f"{where} variances").astype(np.float32)
    components = _finite(reader.array(np.float32, features * rank), f"{where} components")
    components = components.reshape(features, rank).astype(np.float32)
    if (variances < 0).any() or (np.diff(variances) > 0).any():
        raise CodecError(f"transform basis: {where} variances are not non-negative and non-increasing")
    norms = np.sqrt(np.einsum("cr,cr->r", components, components, dtype=np.float64))
    if rank and float(np.abs(norms - 1.0).max()) > NORM_TOLERANCE:
        raise CodecError(f"transform basis: {where} components are not unit vectors")
    return KindBasis(mean, variances, components)


def basis_from_bytes(data: bytes | memoryview, digest: str | None = None) -> TransformBasis:
    """Parse and validate untrusted basis bytes; ``digest`` (hex SHA-256), when given, must match them."""
    view = memoryview(data).cast("B")
    if len(view) > MAX_BASIS_BYTES:
        raise CodecError(f"transform basis of {len(view)} bytes is over the limit {MAX_BASIS_BYTES}")
    actual = digest_of(view)
    if digest is not None and actual != digest:
        raise CodecError(f"transform basis bytes hash to {actual[:16]}…, not the {digest[:16]}… asked for")
    reader = ByteReader(view, "transform basis")
    if bytes(reader.take(len(MAGIC))) != MAGIC:
        raise CodecError("transform basis: bad magic")
    version, layers, heads, dim, layer_group, rank, pairs = reader.unpack(_HEADER.format)
    if version != BASIS_VERSION:
        raise CodecError(f"transform basis version {version} is not supported (expected {BASIS_VERSION})")
    features = heads * dim
    if (not 1 <= layers <= MAX_LAYERS or heads < 1 or dim < 1 or features > MAX_FEATURES
            or not 1 <= layer_group <= layers or not 0 <= rank <= features or pairs not in (0, dim // 2)
            or (pairs and dim % 2)):
        raise CodecError(f"transform basis: invalid header (layers {layers}, kv_heads {heads}, head_dim {dim}, "
                         f"layer_group {layer_group}, rank {rank}, rotary pairs {pairs})")
    expected = _expected_size(layers, features, layer_group, rank, pairs)
    if len(view) != expected:
        raise CodecError(f"transform basis is {len(view)} bytes; its header implies {expected}")
    inv_freq = _finite(reader.array(np.float32, pairs), "inv_freq").astype(np.float32)
    if (inv_freq <= 0).any():
        raise CodecError("transform basis: rotary inverse frequencies must be positive")
    groups = []
    for g in range(_group_count(layers, layer_group)):
        groups.append((_read_kind(reader, features, rank, f"group {g} keys"),
                       _read_kind(reader, features, rank, f"group {g} values")))
    probabilities = []
    for w in range(1, MAX_WIDTH + 1):
        p = _finite(reader.array(np.float32, 2 * symbol_radius(w) + 1), f"width {w} probabilities")
        if (p < 0).any() or float(p.sum()) <= 0:
            raise CodecError(f"transform basis: width {w} probabilities are not a distribution")
        probabilities.append(normalised(p))
    reader.done()
    return TransformBasis(layers, heads, dim, layer_group, inv_freq, groups, probabilities, digest=actual)


def normalised(counts: np.ndarray) -> np.ndarray:
    """Counts or weights -> probabilities (float64) with every entry at least ``MIN_PROBABILITY``."""
    p = np.asarray(counts, dtype=np.float64)
    p = p / p.sum()
    p = np.maximum(p, MIN_PROBABILITY)
    return p / p.sum()


def seal(basis: TransformBasis) -> tuple[TransformBasis, bytes]:
    """A freshly fitted basis -> (the same basis with its digest set, its bytes), parsed back from the bytes
    so that the basis in memory is exactly what any reader of the bytes gets (float32 everywhere)."""
    data = basis_to_bytes(basis)
    return basis_from_bytes(data), data


# -- the registry ------------------------------------------------------------------------------------------

_registry_lock = threading.Lock()
_bases: dict[str, TransformBasis] = {}
_defaults: dict[tuple[int, int, int], str] = {}
_sources: list[weakref.WeakMethod[Callable[[str], bytes | None]]] = []


def register_basis(basis: TransformBasis, *, default: bool = False) -> str:
    """Make ``basis`` findable by its digest; ``default`` also makes it the basis a codec without an explicit
    ``basis`` parameter uses for KV of its shape (layers, kv_heads, head_dim). Returns the digest."""
    if not basis.digest:
        raise CodecError("register a sealed basis (see seal / basis_from_bytes): it has no digest")
    with _registry_lock:
        _bases[basis.digest] = basis
        if default:
            _defaults[basis.shape_key] = basis.digest
    return basis.digest


def forget_basis(digest: str) -> None:
    """Drop a basis from the registry (and as a default); chunks coded with it miss until it is found again."""
    with _registry_lock:
        _bases.pop(digest, None)
        for shape, d in list(_defaults.items()):
            if d == digest:
                del _defaults[shape]


def add_basis_source(read: Callable[[str], bytes | None]) -> None:
    """Add a bound method ``read(digest) -> bytes | None`` consulted for bases not registered; held weakly."""
    with _registry_lock:
        _sources[:] = [s for s in _sources if s() is not None]
        _sources.append(weakref.WeakMethod(read))


def default_basis_digest(num_layers: int, kv_heads: int, head_dim: int) -> str | None:
    with _registry_lock:
        return _defaults.get((num_layers, kv_heads, head_dim))


def find_basis(digest: str) -> TransformBasis:
    """The basis named ``digest``: registered, or read from a source, validated and registered. ``CodecError``
    when no source has it."""
    with _registry_lock:
        basis = _bases.get(digest)
        sources = [s() for s in _sources]
    if basis is not None:
        return basis
    for read in sources:
        data = read(digest) if read is not None else None
        if data is None:
            continue
        try:
            basis = basis_from_bytes(data, digest)
        except CodecError:
            continue  # a corrupt copy: another source may hold a good one
        register_basis(basis)
        return basis
    raise CodecError(f"transform basis {digest[:16]}… is not available (calibrate with `ragkv calibrate`, "
                     f"or open the store that holds it)")


__all__ = [
    "BASIS_VERSION",
    "MAX_BASIS_BYTES",
    "MAX_WIDTH",
    "KindBasis",
    "TransformBasis",
    "add_basis_source",
    "basis_from_bytes",
    "basis_to_bytes",
    "default_basis_digest",
    "digest_of",
    "find_basis",
    "forget_basis",
    "normalised",
    "register_basis",
    "seal",
    "symbol_radius",
]
