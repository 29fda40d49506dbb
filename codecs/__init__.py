"""KV codecs: tensors in, bytes out. Imported as ``ragkv.codecs`` (never as ``codecs``).

A codec encodes one chunk's KV tensor ``[layers, 2, kv_heads, tokens, head_dim]`` into a payload
and decodes it back, whole or layer by layer. Codecs are looked up by name in a registry.
"""
from __future__ import annotations

if not __name__.startswith("ragkv."):
    raise ImportError("import this package as ragkv.codecs, not as a bare 'codecs' (see DESIGN.md)")

from ragkv.codecs.base import (
    Codec,
    CodecError,
    CodecParams,
    available_codecs,
    get_codec,
    register_codec,
)
from ragkv.codecs import raw as _raw  # noqa: F401  (registers "raw")

__all__ = ["Codec", "CodecError", "CodecParams", "available_codecs", "get_codec", "register_codec"]
