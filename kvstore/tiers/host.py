"""``host`` tier: decoded chunk tensors in process memory."""
from __future__ import annotations

from dataclasses import dataclass

from ragkv.kvstore.tiers.base import TierConfig, register_tier
from ragkv.kvstore.tiers.memory import MemoryTier


@dataclass(frozen=True)
class HostConfig(TierConfig):
    pass


@register_tier
class HostTier(MemoryTier):
    kind = "host"
    config_class = HostConfig
