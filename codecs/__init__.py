"""KV codecs: tensors in, bytes out. Imported as ``ragkv.codecs`` (never as ``codecs``).

A codec encodes one chunk's KV tensor ``[layers, 2, kv_heads, tokens, head_dim]`` into a payload
and decodes it back, whole or layer by layer. Codecs are looked up by name in a registry.
"""
from __future__ import annotations

if not __name__.startswith("ragkv."):
    raise ImportError("import this package as ragkv.codecs, not as a bare 'codecs' (see DESIGN.md)")

from ragkv.codecs import cachegen as _cachegen  # noqa: F401  (registers "cachegen")
from ragkv.codecs import quant as _quant  # noqa: F401  (registers "quant")
from ragkv.codecs import raw as _raw  # noqa: F401  (registers "raw")
from ragkv.codecs import transform as _transform  # noqa: F401  (registers "transform")
from ragkv.codecs import zstd as _zstd  # noqa: F401  (registers "zstd")
from ragkv.codecs.base import (
    Codec,
    CodecError,
    CodecParams,
    available_codecs,
    get_codec,
    register_codec,
)
from ragkv.codecs.cachegen import start_decode_pool
from ragkv.codecs.decode_pool import shutdown_pool as stop_decode_pool
from ragkv.codecs.parallel import decode_workers, set_decode_workers

__all__ = [
    "Codec", "CodecError", "CodecParams", "available_codecs", "decode_workers", "get_codec", "register_codec",
    "set_decode_workers", "start_decode_pool", "stop_decode_pool",
]
