"""Per-model codec calibration: the ``transform`` codec's basis, fitted on this model's KV and kept in the store.

``calibrate_transform(engine, texts)`` prefills the calibration texts as chunks (exactly as ``warm`` would,
position and all), fits a basis on their KV (``ragkv.codecs.transform_fit``), writes its bytes to every tier
of the engine's store as a content-addressed artefact and registers it as the default basis for this model's
KV shape. The digest is saved beside the model's other calibration as ``codec-calibration-<fingerprint>.json``;
``use_codec_calibration`` reads that file back (strictly) and makes the basis the default again in a later
process, finding its bytes in the store. Chunks name their basis digest, so a basis that is missing or was
replaced makes them misses, never garbage.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragkv.codecs import CodecError
from ragkv.codecs.transform_basis import TransformBasis, find_basis, register_basis
from ragkv.codecs.transform_fit import fit_basis
from ragkv.kvstore.artefacts import check_digest
from ragkv.kvstore.errors import ConfigError
from ragkv.kvstore.header_schema import text_field
from ragkv.middleware.calibration import model_record_path, read_model_record, write_model_record

if TYPE_CHECKING:
    from ragkv.middleware.engine import ContextEngine

log = logging.getLogger(__name__)
FILE_VERSION = 1
DEFAULT_LAYER_GROUP = 1


@dataclass(frozen=True)
class CodecCalibration:
    """Which transform basis this model's chunks are coded with (its digest), and what it was fitted on."""

    fingerprint: str
    transform_basis: str
    layer_group: int
    chunks: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"version": FILE_VERSION, "fingerprint": self.fingerprint, "transform_basis": self.transform_basis,
                "layer_group": self.layer_group, "chunks": self.chunks, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: Any) -> CodecCalibration:
        """Strict: every field of its type and in range; ``ConfigError`` otherwise."""
        try:
            if not isinstance(d, dict) or d.get("version") != FILE_VERSION:
                raise TypeError(f"not a codec calibration file of version {FILE_VERSION}")
            counts = [d["layer_group"], d["chunks"], d["tokens"]]
            if any(type(n) is not int or n < 1 for n in counts):
                raise TypeError("layer_group, chunks and tokens must be positive integers")
            return cls(text_field(d["fingerprint"], "fingerprint"), check_digest(d["transform_basis"]), *counts)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid codec calibration: {exc}") from exc

    def save(self, directory: str | Path) -> Path:
        return write_model_record(codec_calibration_path(directory, self.fingerprint), self.to_dict())


def codec_calibration_path(directory: str | Path, fingerprint: str) -> Path:
    return model_record_path(directory, "codec-calibration", fingerprint)


def load_codec_calibration(directory: str | Path, fingerprint: str) -> CodecCalibration | None:
    """The codec calibration saved for ``fingerprint`` in ``directory``, or None (absent, unreadable, another's)."""
    return read_model_record(codec_calibration_path(directory, fingerprint), CodecCalibration.from_dict, fingerprint)


def calibrate_transform(engine: ContextEngine, texts: Sequence[str | Sequence[int]], *,
                        layer_group: int = DEFAULT_LAYER_GROUP) -> tuple[CodecCalibration, TransformBasis]:
    """Fit the transform basis on ``texts`` (texts or token ids, prefilled as chunks), keep it in the engine's
    store, make it the default for this model's KV. Returns the calibration record (to save) and the basis."""
    texts = [t for t in texts if t]
    if not texts:
        raise ConfigError("codec calibration needs at least one text")
    cacher, adapter = engine.cacher, engine.adapter
    chunks = cacher.compute([cacher.tokens(t) for t in texts])
    samples = [(c.kv, c.meta.position if c.meta.rope else None) for c in chunks]
    rope = adapter.inv_freq if any(position is not None for _, position in samples) else None
    try:
        basis, data = fit_basis(samples, rope, layer_group=layer_group)
    except CodecError as exc:
        raise ConfigError(f"cannot fit a transform basis: {exc}") from exc
    tokens = sum(c.num_tokens for c in chunks)
    if tokens < 4 * basis.features:
        log.warning("the transform basis was fitted on %d tokens for %d features: calibrate on more text (a "
                    "corpus) for a basis that generalises", tokens, basis.features)
    engine.store.put_artefact(data)
    register_basis(basis, default=True)
    record = CodecCalibration(str(adapter.fingerprint), basis.digest, layer_group, len(chunks), tokens)
    return record, basis


def use_codec_calibration(calibration: CodecCalibration | None) -> TransformBasis | None:
    """Make the calibration's basis the default for its shape again (its bytes found through the open stores);
    None, with a warning, when no store holds it (transform-coded chunks then miss until it is found)."""
    if calibration is None:
        return None
    try:
        basis = find_basis(calibration.transform_basis)
    except CodecError as exc:
        log.warning("codec calibration not in use: %s", exc)
        return None
    register_basis(basis, default=True)
    return basis


__all__ = ["CodecCalibration", "calibrate_transform", "codec_calibration_path", "load_codec_calibration",
           "use_codec_calibration"]
