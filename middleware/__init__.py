"""ragkv.middleware (see DESIGN.md). Imported as ``ragkv.middleware``.

transformers is an optional extra (``ragkv[model]``): it is imported only where a model is touched.
"""
from __future__ import annotations

if not __name__.startswith("ragkv."):
    raise ImportError("import this package as ragkv.middleware, not as a bare 'middleware' (see DESIGN.md)")

from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.errors import ContextTooLong, UnsupportedModel
from ragkv.middleware.families import FAMILIES, SUPPORTED_ROPE_TYPES
from ragkv.middleware.rope import rotate_keys

__all__ = ["ModelAdapter", "ContextTooLong", "UnsupportedModel", "FAMILIES", "SUPPORTED_ROPE_TYPES", "rotate_keys"]
