"""``device`` tier: decoded chunk tensors on a torch device (cuda when present; ``cpu`` runs the same code)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ragkv.kvstore.errors import ConfigError
from ragkv.kvstore.tiers.base import TierConfig, register_tier
from ragkv.kvstore.tiers.memory import MemoryTier, check_device


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class DeviceConfig(TierConfig):
    device: str = "cuda"

    def __post_init__(self) -> None:
        super().__post_init__()
        dev = check_device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device tier on {self.device!r} but CUDA is not available; use device='cpu'")


@register_tier
class DeviceTier(MemoryTier):
    kind = "device"
    config_class = DeviceConfig

    def __init__(self, config: DeviceConfig) -> None:
        super().__init__(config)
        self.device = check_device(config.device)
