"""``disk`` tier (being written)."""
from __future__ import annotations

from dataclasses import dataclass

from ragkv.kvstore.tiers.base import Tier, TierConfig


@dataclass(frozen=True)
class DiskConfig(TierConfig):
    path: str = ""


class DiskTier(Tier):
    kind = "disk"
    config_class = DiskConfig
    holds_encoded = True
