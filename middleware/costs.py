"""Measured speeds the ``auto`` controller plans with: compute per token-layer, load bandwidth per tier.

Every measurement is an exponential moving average of what the engine actually observed (chunk prefills,
strategy runs, chunk loads), seeded with conservative defaults until the first observation.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

# Bytes per second until measured: decoded tiers are memory copies; slow tiers include decoding.
DEFAULT_LOAD_BYTES_PER_S = {"device": 20e9, "host": 10e9, "disk": 1e9, "redis": 0.3e9}
FALLBACK_LOAD_BYTES_PER_S = 0.5e9
DEFAULT_SECONDS_PER_TOKEN_LAYER = 2e-5


@dataclass
class CostModel:
    alpha: float = 0.3  # weight of the newest observation
    seconds_per_token_layer: float | None = None
    load_bytes_per_s: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe_compute(self, token_layers: int, seconds: float) -> None:
        if token_layers > 0 and seconds > 0:
            with self._lock:
                self.seconds_per_token_layer = self._ema(self.seconds_per_token_layer, seconds / token_layers)

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            with self._lock:
                self.load_bytes_per_s[tier] = self._ema(self.load_bytes_per_s.get(tier), nbytes / seconds)

    def compute_seconds(self, token_layers: float) -> float:
        per = self.seconds_per_token_layer or DEFAULT_SECONDS_PER_TOKEN_LAYER
        return token_layers * per

    def load_seconds(self, tier: str, nbytes: int) -> float:
        kind = tier.rstrip("0123456789")
        bw = self.load_bytes_per_s.get(tier) or DEFAULT_LOAD_BYTES_PER_S.get(kind, FALLBACK_LOAD_BYTES_PER_S)
        return nbytes / bw

    def snapshot(self) -> dict[str, object]:
        return {"seconds_per_token_layer": self.seconds_per_token_layer,
                "load_bytes_per_s": dict(self.load_bytes_per_s)}


__all__ = ["DEFAULT_LOAD_BYTES_PER_S", "CostModel"]
