"""ragkv.integrations (see DESIGN.md). Imported as ``ragkv.integrations``."""
from __future__ import annotations

if not __name__.startswith("ragkv."):
    raise ImportError("import this package as ragkv.integrations, not as a bare 'integrations' (see DESIGN.md)")
