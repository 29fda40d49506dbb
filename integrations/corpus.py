"""Reading a corpus into chunk texts for ``ragkv warm``, and the progress bar it shows.

Why chunks are whole paragraphs by default: a chunk's cache is only reused when a later prompt contains
the *same* text, so chunking must be deterministic and match what the retriever returns. Paragraphs (or
whole files, or JSONL records) are stable units; the built-in retriever indexes exactly these chunks.

Accepted inputs: a directory (``*.txt`` and ``*.md`` files, recursively, in sorted order), a text file, or
a JSONL file whose lines are strings, objects with a text field (``"text"`` by default), or objects with a
``"chunks"`` list (the synthetic QA corpus format).
"""
from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from ragkv.kvstore.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".md")
SPLITS = ("paragraph", "file")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def split_text(text: str, split: str = "paragraph") -> list[str]:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if split == "file":
        return [text.strip()] if text.strip() else []
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSONL file; ``ConfigError`` naming a line that is not JSON."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not JSON (line {number}: {exc.msg})") from None


def _jsonl_chunks(path: Path, text_field: str) -> Iterator[str]:
    for number, record in json_lines(path):
        if isinstance(record, str):
            yield record
        elif isinstance(record, dict) and isinstance(record.get("chunks"), list):
            yield from (str(c) for c in record["chunks"])
        elif isinstance(record, dict) and isinstance(record.get(text_field), str):
            yield record[text_field]
        else:
            raise ConfigError(f"{path}:{number}: expected a string, an object with '{text_field}', or an "
                              f"object with a 'chunks' list")


def read_corpus(path: str | Path, *, split: str = "paragraph", text_field: str = "text") -> list[str]:
    """Chunk texts of a corpus, deduplicated, in a deterministic order."""
    p = Path(path).expanduser()
    chunks: list[str] = []
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"{p} holds no {' or '.join(TEXT_SUFFIXES)} files")
        for f in files:
            chunks += split_text(f.read_text(encoding="utf-8", errors="replace"), split)
    elif p.is_file() and p.suffix.lower() in (".jsonl", ".ndjson"):
        chunks = [c for c in _jsonl_chunks(p, text_field) if c.strip()]
    elif p.is_file():
        chunks = split_text(p.read_text(encoding="utf-8", errors="replace"), split)
    else:
        raise ConfigError(f"{p} is neither a directory nor a file")
    return list(dict.fromkeys(chunks))


class ProgressBar:
    """A one-line progress bar on a terminal (redrawn in place), a line per 10% elsewhere (logs, CI)."""

    def __init__(self, total: int, label: str = "", out: TextIO | None = None, width: int = 30) -> None:
        self.total = max(total, 0)
        self.label = label
        self.out = out if out is not None else sys.stderr
        self.width = width
        self.done = 0
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.out, "isatty", lambda: False)())
        self._last_decile = -1
        self.extra = ""

    def update(self, n: int, extra: str = "") -> None:
        self.done = min(self.done + n, self.total) if self.total else self.done + n
        self.extra = extra
        self._draw(final=False)

    def _draw(self, final: bool) -> None:
        fraction = self.done / self.total if self.total else 1.0
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(self.width * fraction)
        line = (f"{self.label} [{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{self.total} "
                f"{100 * fraction:5.1f}% · {rate:.1f}/s · ETA {eta:.0f}s{' · ' + self.extra if self.extra else ''}")
        if self._tty:
            self.out.write("\r" + line + ("\n" if final else ""))
            self.out.flush()
            return
        decile = int(fraction * 10)
        if decile != self._last_decile or final:
            self._last_decile = decile
            self.out.write(line + "\n")
            self.out.flush()

    def close(self) -> None:
        self._draw(final=True)


__all__ = ["SPLITS", "ProgressBar", "read_corpus", "split_text"]
