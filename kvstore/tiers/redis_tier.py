"""``redis`` tier (being written)."""
from __future__ import annotations

from dataclasses import dataclass

from ragkv.kvstore.tiers.base import Tier, TierConfig


@dataclass(frozen=True)
class RedisConfig(TierConfig):
    url: str = "redis://127.0.0.1:6379/0"


class RedisTier(Tier):
    kind = "redis"
    config_class = RedisConfig
    holds_encoded = True
