"""Tiers, one per file; importing this package registers the built-in ones (redis lazily needs redis-py)."""
from __future__ import annotations

from ragkv.kvstore.tiers.base import Tier, TierConfig, make_tier, register_tier, tier_class, tier_kinds
from ragkv.kvstore.tiers.device import DeviceConfig, DeviceTier
from ragkv.kvstore.tiers.host import HostConfig, HostTier

__all__ = ["Tier", "TierConfig", "make_tier", "register_tier", "tier_class", "tier_kinds",
           "HostConfig", "HostTier", "DeviceConfig", "DeviceTier"]
