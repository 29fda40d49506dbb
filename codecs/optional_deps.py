"""The optional third-party coders (``ragkv[codecs]``): imported when a codec first needs them, with a clear
``CodecError`` naming the extra when they are missing."""
from __future__ import annotations

from typing import Any

from ragkv.codecs.base import CodecError


def require_zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - installed in development
        raise CodecError("this codec needs the 'zstandard' package: pip install ragkv[codecs]") from exc
    return zstandard


def require_constriction() -> Any:
    try:
        import constriction
    except ImportError as exc:  # pragma: no cover - installed in development
        raise CodecError("this codec needs the 'constriction' package: pip install ragkv[codecs]") from exc
    return constriction


__all__ = [
    "require_constriction",
    "require_zstd",
]
