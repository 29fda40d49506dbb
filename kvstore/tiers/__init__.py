"""Tiers, one per file; importing this package registers the built-in ones.

The redis tier's module imports redis-py only when a RedisTier is constructed, so ragkv.kvstore loads
without the ``redis`` extra.
"""
from __future__ import annotations

from ragkv.kvstore.tiers.base import Tier, TierConfig, make_tier, register_tier, tier_class, tier_kinds
from ragkv.kvstore.tiers.device import DeviceConfig, DeviceTier
from ragkv.kvstore.tiers.disk import DiskConfig, DiskTier
from ragkv.kvstore.tiers.host import HostConfig, HostTier
from ragkv.kvstore.tiers.redis_tier import RedisConfig, RedisTier

__all__ = [
           "DeviceConfig",
           "DeviceTier",
           "DiskConfig",
           "DiskTier",
           "HostConfig",
           "HostTier",
           "RedisConfig",
           "RedisTier",
           "Tier",
           "TierConfig",
           "make_tier",
           "register_tier",
           "tier_class",
           "tier_kinds",
]
