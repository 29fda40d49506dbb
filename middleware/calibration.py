"""Per-model calibration: which selection rule and budget keeps full prefill's answers, at the least compute.

``calibrate(engine, requests)`` runs full prefill and every candidate ``BlendConfig`` on a calibration set
(the user's own chunks with generic questions, or the bundled sample), greedy-decodes ``tokens`` tokens with
each, and measures, per candidate:

- agreement: the share of prompts whose ``tokens`` greedy tokens are identical to full prefill's (no gold
  answers needed);
- compute share: the token-layers it computes (its selection pass included) over full prefill's, and the
  share of the cached chunk tokens' layers it recomputes (what ``auto`` plans with).

The choice is the candidate with the least compute share whose agreement meets ``target`` (default 0.95).
When none does, there is no choice, and the calibrated default recomputes every row (exact: it meets any
target, at full cost). A ``Calibration`` is saved as JSON under the model fingerprint
(``calibration-<fingerprint>.json``) and read back strictly: a file that does not parse, or belongs to
another model, is ignored. ``engine.use_calibration`` makes it the default of ``blend`` and the table that
``auto`` chooses from.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ragkv.kvstore.errors import ConfigError
from ragkv.kvstore.header_schema import refuse_constant, text_field
from ragkv.middleware.blend import BlendConfig
from ragkv.middleware.context import PrepareRequest
from ragkv.middleware.generation import GenerationConfig

if TYPE_CHECKING:
    from ragkv.middleware.engine import ContextEngine

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TARGET = 0.95
DEFAULT_TOKENS = 16
FILE_VERSION = 1
EVERYTHING = BlendConfig(ratio=1.0)  # every row recomputed: what a calibration without a choice falls back to


def _alone(**kw: Any) -> BlendConfig:
    """A rule without check layers (boundary, stored, query single stage)."""
    return BlendConfig(check_layers=(), **kw)


# (name, config), roughly from cheapest to dearest; each one is measured.
CANDIDATES: tuple[tuple[str, BlendConfig], ...] = (
    ("boundary k=4", _alone(ratio=0.0, boundary_tokens=4)),
    ("boundary k=8", _alone(ratio=0.0, boundary_tokens=8)),
    ("boundary k=16", _alone(ratio=0.0, boundary_tokens=16)),
    ("stored 0.15", _alone(ratio=0.15, rule="stored")),
    ("boundary k=32", _alone(ratio=0.0, boundary_tokens=32)),
    ("boundary k=4 + stored 0.15", _alone(ratio=0.15, rule="stored", boundary_tokens=4)),
    ("deviation 0.15", BlendConfig(ratio=0.15)),
    ("stored 0.3", _alone(ratio=0.3, rule="stored")),
    ("query 0.3", _alone(ratio=0.3, rule="query")),
    ("deviation 0.3", BlendConfig(ratio=0.3)),
    ("stored 0.5", _alone(ratio=0.5, rule="stored")),
    ("deviation 0.5", BlendConfig(ratio=0.5)),
    ("stored 0.7", _alone(ratio=0.7, rule="stored")),
)


@dataclass(frozen=True)
class CalibrationPoint:
    name: str
    config: BlendConfig
    agreement: float
    compute_share: float  # token-layers computed / full prefill's
    cached_share: float  # token-layers of cached chunk rows recomputed / cached chunk rows x layers

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": config_to_dict(self.config), "agreement": self.agreement,
                "compute_share": self.compute_share, "cached_share": self.cached_share}


@dataclass(frozen=True)
class Calibration:
    fingerprint: str
    target: float
    tokens: int
    prompts: int
    points: tuple[CalibrationPoint, ...]

    def cheapest(self, target: float | None = None) -> CalibrationPoint | None:
        """The point with the least compute share meeting ``target`` (default: the calibration's own)."""
        target = self.target if target is None else target
        meeting = [p for p in self.points if p.agreement >= target]
        return min(meeting, key=lambda p: (p.compute_share, -p.agreement)) if meeting else None

    @property
    def choice(self) -> CalibrationPoint | None:
        return self.cheapest()

    def default_blend(self) -> BlendConfig:
        choice = self.choice
        return choice.config if choice is not None else EVERYTHING

    def to_dict(self) -> dict[str, Any]:
        choice = self.choice
        return {"version": FILE_VERSION, "fingerprint": self.fingerprint, "target": self.target,
                "tokens": self.tokens, "prompts": self.prompts, "choice": choice.name if choice else None,
                "points": [p.to_dict() for p in self.points]}

    @classmethod
    def from_dict(cls, d: Any) -> Calibration:
        """Strict: every field of its type and in range; ``ConfigError`` otherwise."""
        try:
            if not isinstance(d, dict) or d.get("version") != FILE_VERSION:
                raise TypeError("not a calibration file of version 1")
            points = tuple(CalibrationPoint(name=text_field(p["name"], "point name"),
                                            config=config_from_dict(p["config"]),
                                            agreement=_fraction(p["agreement"]),
                                            compute_share=_share(p["compute_share"]),
                                            cached_share=_share(p["cached_share"])) for p in d["points"])
            prompts, tokens = d["prompts"], d["tokens"]
            if type(prompts) is not int or type(tokens) is not int or prompts < 1 or tokens < 1:
                raise TypeError("prompts and tokens must be positive integers")
            return cls(text_field(d["fingerprint"], "fingerprint"), _fraction(d["target"]), tokens, prompts, points)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid calibration: {exc}") from exc

    def save(self, directory: str | Path) -> Path:
        return write_model_record(calibration_path(directory, self.fingerprint), self.to_dict())


def _fraction(value: Any) -> float:
    if type(value) not in (int, float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"expected a number in [0, 1], got {value!r}")
    return float(value)


def _share(value: Any) -> float:
    if type(value) not in (int, float) or not 0.0 <= value <= 10.0 or not math.isfinite(value):
        raise ValueError(f"expected a compute share in [0, 10], got {value!r}")
    return float(value)


_CONFIG_FIELDS = {"ratio": (int, float), "check_layers": list, "schedule": (list, type(None)), "deviation": str,
                  "selector": str, "seed": int, "boundary_tokens": int, "rule": str}


def config_to_dict(config: BlendConfig) -> dict[str, Any]:
    if not isinstance(config.selector, str):
        raise ConfigError("only configurations with a named selector can be saved")
    d = asdict(config)
    d["check_layers"] = list(config.check_layers)
    d["schedule"] = None if config.schedule is None else list(config.schedule)
    return d


def config_from_dict(d: Any) -> BlendConfig:
    if not isinstance(d, dict) or set(d) != set(_CONFIG_FIELDS):
        raise TypeError(f"a blend configuration has exactly the fields {sorted(_CONFIG_FIELDS)}")
    for name, kind in _CONFIG_FIELDS.items():
        if not isinstance(d[name], kind) or isinstance(d[name], bool):
            raise TypeError(f"{name} has the wrong type")
    layers, schedule = d["check_layers"], d["schedule"]
    if len(layers) > 64 or any(type(x) is not int for x in layers):
        raise TypeError("check_layers must be a short list of integers")
    if schedule is not None and any(type(x) not in (int, float) for x in schedule):
        raise TypeError("schedule must be a list of numbers")
    return BlendConfig(**{**d, "check_layers": tuple(layers),
                          "schedule": None if schedule is None else tuple(float(x) for x in schedule)})


def calibration_path(directory: str | Path, fingerprint: str) -> Path:
    return model_record_path(directory, "calibration", fingerprint)


def model_record_path(directory: str | Path, kind: str, fingerprint: str) -> Path:
    """``<directory>/<kind>-<fingerprint>.json``: where a per-model record lives."""
    if not fingerprint.isalnum():
        raise ConfigError(f"not a model fingerprint: {fingerprint!r}")
    return Path(directory) / f"{kind}-{fingerprint}.json"


def write_model_record(path: Path, record: dict[str, Any]) -> Path:
    """Write a per-model record atomically (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False))
    tmp.replace(path)
    return path


def load_calibration(directory: str | Path, fingerprint: str) -> Calibration | None:
    """The calibration saved for ``fingerprint`` in ``directory``, or None (absent, unreadable, or not for it)."""
    return read_model_record(calibration_path(directory, fingerprint), Calibration.from_dict, fingerprint)


def read_model_record(path: Path, parse: Callable[[Any], T], fingerprint: str) -> T | None:
    """A per-model JSON record (``parse`` is strict, raising ``ConfigError``), or None when it is absent,
    unreadable, invalid or another model's (each logged)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("%s unreadable (%s); ignored", path, exc)
        return None
    try:
        record = parse(json.loads(text, parse_constant=refuse_constant))
    except (ValueError, ConfigError) as exc:
        log.warning("%s is invalid (%s); ignored", path, exc)
        return None
    if record.fingerprint != fingerprint:  # type: ignore[attr-defined]
        log.warning("%s is for another model; ignored", path)
        return None
    return record


def _token_layers(prepared: Any) -> int:
    return sum(prepared.details.get("rows_per_layer", ())) + prepared.details.get("selection_token_layers", 0)


def calibrate(engine: ContextEngine, requests: Sequence[PrepareRequest], *, target: float = DEFAULT_TARGET,
              candidates: Sequence[tuple[str, BlendConfig]] = CANDIDATES, tokens: int = DEFAULT_TOKENS
              ) -> Calibration:
    """Measure every candidate against full prefill on ``requests`` (their chunks are warmed first)."""
    if not requests:
        raise ConfigError("calibration needs at least one prompt")
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target agreement must be in (0, 1], got {target}")
    greedy = GenerationConfig(max_new_tokens=tokens)
    layers = engine.adapter.num_layers
    references, full_cost, cached_rows, query_rows = [], 0, 0, 0
    for request in requests:
        engine.warm(request.chunks, namespace=request.namespace)
        prompt = engine.assemble(request)
        full_cost += prompt.length * layers
        cached_rows += sum(s.length for s in prompt.chunks) * layers
        query_rows += prompt.query.length * layers
        references.append(engine.generate(engine.prepare(request, "full"), greedy).token_ids)
    points = []
    for name, config in candidates:
        strategy = engine.strategy("blend", config)
        same, cost = 0, 0
        for request, reference in zip(requests, references):
            prepared = engine.prepare(request, strategy)
            cost += _token_layers(prepared)
            same += engine.generate(prepared, greedy).token_ids == reference
        # what it computes beyond the query's own rows, per cached token-layer (selection pass included)
        cached_share = max(0, cost - query_rows) / max(cached_rows, 1)
        points.append(CalibrationPoint(name, config, same / len(requests), cost / full_cost, cached_share))
    return Calibration(str(engine.adapter.fingerprint), target, tokens, len(requests), tuple(points))


__all__ = [
    "CANDIDATES",
    "DEFAULT_TARGET",
    "EVERYTHING",
    "Calibration",
    "CalibrationPoint",
    "calibrate",
    "calibration_path",
    "config_from_dict",
    "config_to_dict",
    "load_calibration",
    "model_record_path",
    "read_model_record",
    "write_model_record",
]
