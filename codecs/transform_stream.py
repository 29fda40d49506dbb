"""The transform codec's entropy-coded layer stream: which symbols it holds in which order, and decoding it,
in-process or in the decode pool's helper processes (constriction holds the GIL, so threads cannot overlap
two streams; the caller reconstructs one layer while helpers decode others).

A layer's stream holds, in decode order, keys then values, each as the sink rows' then the other rows' kept
components, widths ascending, component-major (a width's components one after another, each over its rows):
so one coding plan's symbols form one contiguous ``[k, rows]`` block.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ragkv.codecs.base import CodecError
from ragkv.codecs.optional_deps import require_constriction


class Piece(NamedTuple):
    """``count`` symbols coded with the model of ``width`` bits."""

    width: int
    count: int


class StreamUnit(NamedTuple):
    """One layer's stream for the pool: where its words are in the shared input, where its symbols go (int32
    items into the shared output), what it holds."""

    words_off: int
    nwords: int
    out_off: int
    pieces: tuple[Piece, ...]


def layer_pieces(plans: Sequence[tuple[Any, int]]) -> tuple[Piece, ...]:
    """Pieces of a layer from its (coding plan, rows) pairs in decode order."""
    return tuple(Piece(width, (end - start) * rows) for plan, rows in plans if rows
                 for width, start, end in plan.widths)


def decode_symbols(words: np.ndarray, pieces: Sequence[Piece], model_for: Callable[[int], Any], out: np.ndarray,
                   what: str) -> None:
    """Decode ``pieces`` from ``words`` into ``out`` (int32, as many items as the pieces hold); a stream that
    breaks or does not end where its symbols do is a ``CodecError``."""
    total = sum(p.count for p in pieces)
    if total == 0:
        if len(words):
            raise CodecError(f"{what}: a stream where no symbols are expected")
        return
    if not len(words):
        raise CodecError(f"{what}: stream is empty but symbols are expected")
    pos = 0
    try:
        coder = require_constriction().stream.stack.AnsCoder(words)
        for width, count in pieces:
            out[pos:pos + count] = coder.decode(model_for(width), count)
            pos += count
        clean = coder.is_empty()
    except (ValueError, KeyError, RuntimeError, OverflowError) as exc:
        raise CodecError(f"{what}: corrupt stream: {exc}") from exc
    if not clean:
        raise CodecError(f"{what}: stream does not end where its symbols do")


_helper_models: dict[tuple[str, int], Any] = {}


def decode_unit_task(payload: memoryview, out: np.ndarray, spec: tuple[str, dict[int, np.ndarray], list[StreamUnit]],
                     unit: int) -> None:
    """Decode one layer's stream into the shared output (run by pool helpers; models cached per basis digest)."""
    digest, probabilities, units = spec
    u = units[unit]
    categorical = require_constriction().stream.model.Categorical

    def model_for(width: int) -> Any:
        key = (digest, width)
        if key not in _helper_models:
            _helper_models[key] = categorical(probabilities[width], perfect=False)
        return _helper_models[key]

    words = np.frombuffer(payload, dtype="<u4", count=u.nwords, offset=u.words_off)
    total = sum(p.count for p in u.pieces)
    decode_symbols(words, u.pieces, model_for, out.view(np.int32)[u.out_off:u.out_off + total],
                   f"transform unit {unit}")


__all__ = ["Piece", "StreamUnit", "decode_symbols", "decode_unit_task", "layer_pieces"]
