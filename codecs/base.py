"""The codec interface, the per-layer offset table every payload carries, and the registry."""
from __future__ import annotations

import dataclasses
import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

# A codec error is the codec's own: ragkv.codecs depends on nothing above it, so CodecError
# does not derive from the store's RagKVError; the store translates it into CorruptEntry.


class CodecError(ValueError):
    """A payload that cannot be decoded (truncated, garbled, hostile) or parameters that are invalid."""


DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# Hard cap on what a declared shape may imply, so a hostile header cannot make us allocate absurd memory.
MAX_ELEMENTS = 1 << 32


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CodecError(f"unsupported dtype {name!r}; allowed: {sorted(DTYPES)}") from None


def check_shape(shape: Sequence[int]) -> tuple[int, int, int, int, int]:
    """Validate a declared KV shape ``[layers, 2, kv_heads, tokens, head_dim]`` before anything is allocated."""
    if len(shape) != 5 or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise CodecError(f"KV shape must be 5 integers [layers, 2, kv_heads, tokens, head_dim], got {shape!r}")
    layers, two, heads, tokens, dim = shape
    if two != 2 or min(layers, heads, dim) < 1 or tokens < 0:
        raise CodecError(f"invalid KV shape {tuple(shape)}")
    n = layers * 2 * heads * tokens * dim
    if n > MAX_ELEMENTS:
        raise CodecError(f"declared KV shape {tuple(shape)} implies {n} elements, over the limit {MAX_ELEMENTS}")
    return layers, two, heads, tokens, dim


def check_encode_input(kv: torch.Tensor) -> torch.Tensor:
    """Validate a KV tensor [L, 2, H, T, D] for encoding; returned contiguous on the CPU."""
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise CodecError(f"KV must be [layers, 2, kv_heads, tokens, head_dim], got {tuple(kv.shape)}")
    if kv.dtype not in DTYPE_NAMES:
        raise CodecError(f"unsupported dtype {kv.dtype}; allowed: {sorted(DTYPES)}")
    return kv.detach().to("cpu").contiguous()


def join_layers(parts: Sequence[bytes]) -> bytes:
    """Per-layer payloads -> one payload led by the layer offset table."""
    offsets = [0]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return b"".join([struct.pack(f"<{len(parts) + 1}Q", *offsets), *parts])


def layer_indices(layers: Sequence[Any], num_layers: int) -> list[int]:
    """Requested layer indices as ints (numpy and torch integers accepted), each in range."""
    try:
        out = [operator.index(i) for i in layers]
    except TypeError:
        raise CodecError(f"layer indices must be integers, got {layers!r}") from None
    if any(not 0 <= i < num_layers for i in out):
        raise CodecError(f"layer indices {out} out of range for {num_layers} layers")
    return out


def check_decode_args(shape: Sequence[int], dtype: torch.dtype, layers: Sequence[Any],
                      ) -> tuple[int, int, int, int, list[int]]:
    """Validate what a decode call declares, before anything is read or allocated.

    Returns (num_layers, kv_heads, tokens, head_dim, layer indices)."""
    num_layers, _, heads, tokens, dim = check_shape(shape)
    if dtype not in DTYPE_NAMES:
        raise CodecError(f"unsupported dtype {dtype}; allowed: {sorted(DTYPES)}")
    return num_layers, heads, tokens, dim, layer_indices(layers, num_layers)


@dataclass(frozen=True)
class CodecParams:
    """Base for codec parameters. Subclasses are frozen dataclasses validated in ``__post_init__``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Codec:
    """Encode a KV tensor ``[L, 2, H, T, D]`` into bytes and back.

    Payloads start with a per-layer offset table (``layers + 1`` little-endian uint64 offsets relative
    to the end of the table) so that ``decode_layers`` touches only the layers asked for.
    Subclasses implement ``encode_layer`` and ``decode_layer`` for one layer ``[2, H, T, D]``.
    """

    name: ClassVar[str] = ""
    params_class: ClassVar[type[CodecParams]] = CodecParams
    lossless: ClassVar[bool] = True

    def __init__(self, params: CodecParams | None = None) -> None:
        self.params = params if params is not None else self.params_class()
        if not isinstance(self.params, self.params_class):
            raise CodecError(f"codec {self.name!r} takes {self.params_class.__name__}, got {type(self.params).__name__}")

    # -- per-layer hooks -------------------------------------------------------------------------------
    def encode_layer(self, layer: torch.Tensor, layer_index: int, num_layers: int) -> bytes:
        raise NotImplementedError

    def decode_layer(
        self, data: memoryview, shape: tuple[int, int, int, int], dtype: torch.dtype, layer_index: int,
        num_layers: int, out: torch.Tensor,
    ) -> None:
        """Decode one layer into ``out`` (``[2, H, T, D]``, preallocated with ``dtype``)."""
        raise NotImplementedError

    # -- whole-payload API -----------------------------------------------------------------------------
    def encode(self, kv: torch.Tensor, position: int | None = None) -> bytes:
        """kv: [L, 2, H, T, D] -> payload bytes (deterministic). ``position`` is the absolute position of the first
        token when the keys carry rotary embedding (None: they do not, or it is unknown); codecs that transform
        keys use it, the others ignore it."""
        kv = check_encode_input(kv)
        num_layers = kv.shape[0]
        return join_layers([self.encode_layer(kv[i], i, num_layers) for i in range(num_layers)])

    def payload_params(self, kv: torch.Tensor) -> dict[str, Any]:
        """The parameters recorded beside a payload of ``kv`` (what ``get_codec`` needs to decode it)."""
        return self.params.to_dict()

    def _layer_views(self, payload: bytes | memoryview, num_layers: int) -> list[memoryview]:
        view = memoryview(payload)
        table_size = 8 * (num_layers + 1)
        if len(view) < table_size:
            raise CodecError(f"payload of {len(view)} bytes is shorter than its layer table ({table_size} bytes)")
        offsets = struct.unpack_from(f"<{num_layers + 1}Q", view, 0)
        body = view[table_size:]
        if offsets[0] != 0 or offsets[-1] != len(body) or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise CodecError("payload layer table is inconsistent with the payload size")
        return [body[offsets[i]:offsets[i + 1]] for i in range(num_layers)]

    def decode(self, payload: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """payload -> kv [L, 2, H, T, D] of ``dtype``."""
        return self.decode_layers(payload, shape, dtype, range(check_shape(shape)[0]))

    def decode_layers(
        self, payload: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype, layers: Sequence[int],
    ) -> torch.Tensor:
        """Decode only ``layers`` -> [len(layers), 2, H, T, D]."""
        num_layers, heads, tokens, dim, layers = check_decode_args(shape, dtype, layers)
        views = self._layer_views(payload, num_layers)
        out = torch.empty((len(layers), 2, heads, tokens, dim), dtype=dtype)
        for j, i in enumerate(layers):
            self.decode_layer(views[i], (2, heads, tokens, dim), dtype, i, num_layers, out[j])
        return out


_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make a codec available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def available_codecs() -> list[str]:
    return sorted(_REGISTRY)


def get_codec(name: str, params: CodecParams | dict[str, Any] | None = None) -> Codec:
    """Look up a codec by name; ``params`` may be its params dataclass or a plain dict (as stored in headers)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; available: {available_codecs()}") from None
    if isinstance(params, dict):
        try:
            params = cls.params_class(**params)
        except TypeError as exc:
            raise CodecError(f"invalid parameters for codec {name!r}: {exc}") from exc
    return cls(params)
