"""The weights digest of a model folder, computed once per set of weight files and remembered.

The fingerprint hashes every weight byte (``adapter.weights_digest``): ~0.5 s for SmolLM2-135M, seconds to
minutes for multi-GB models. Hashing the files instead would read as many bytes, so the digest is keyed by
the files' identity (name, size, modification time in ns) and the dtype the weights were loaded in, and kept
in ``<models_dir>/weights-digests.json``. A file rewritten in place gets a new mtime, so its weights are
hashed again. The cache is plain JSON, read defensively: anything malformed is ignored and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

MAX_ENTRIES = 64
WEIGHT_SUFFIXES = (".safetensors",)


def files_identity(directory: Path, dtype: str) -> str | None:
    """A digest of the folder's weight files' (name, size, mtime_ns) and ``dtype``; None without weight files."""
    entries = []
    for path in sorted(directory.iterdir()):
        if path.suffix in WEIGHT_SUFFIXES and path.is_file():
            st = path.stat()
            entries.append([path.name, st.st_size, st.st_mtime_ns])
    if not entries:
        return None
    payload = json.dumps({"dir": str(directory.resolve()), "dtype": dtype, "files": entries})
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def _is_hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


class WeightsDigestCache:
    """identity -> weights digest, in one small JSON file (newest ``MAX_ENTRIES`` kept)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if _is_hex(k, 32) and _is_hex(v, 32)}

    def get(self, identity: str) -> str | None:
        return self._read().get(identity)

    def put(self, identity: str, digest: str) -> None:
        """Remember ``digest``; a cache that cannot be written is only a slower next load."""
        entries = self._read()
        entries.pop(identity, None)
        entries[identity] = digest
        kept = dict(list(entries.items())[-MAX_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".weights-digests-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(kept, f)
            os.replace(tmp, self.path)
        except OSError:
            return


__all__ = ["WeightsDigestCache", "files_identity"]
