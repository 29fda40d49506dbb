"""ragkv.middleware (see DESIGN.md). Imported as ``ragkv.middleware``."""
from __future__ import annotations

if not __name__.startswith("ragkv."):
    raise ImportError("import this package as ragkv.middleware, not as a bare 'middleware' (see DESIGN.md)")
