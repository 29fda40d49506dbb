"""The ``raw`` codec: the tensor's bytes as given (fp16, bf16 or fp32), per layer."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ragkv.codecs.base import Codec, CodecError, CodecParams, register_codec


@dataclass(frozen=True)
class RawParams(CodecParams):
    pass


@register_codec
class RawCodec(Codec):
    name = "raw"
    params_class = RawParams
    lossless = True

    def encode_layer(self, layer: torch.Tensor, layer_index: int, num_layers: int) -> bytes:
        # layer: [2, H, T, D]; reinterpret as bytes without a copy through numpy (bf16 has no numpy dtype)
        return layer.contiguous().view(torch.uint8).numpy().tobytes()

    def decode_layer(self, data, shape, dtype, layer_index, num_layers, out) -> None:
        expected = out.numel() * out.element_size()
        if len(data) != expected:
            raise CodecError(f"raw layer {layer_index}: {len(data)} bytes, expected {expected}")
        if expected == 0:
            return
        # numpy copy: no intermediate tensor over a read-only buffer
        out.view(torch.uint8).view(-1).numpy()[:] = np.frombuffer(data, dtype=np.uint8)
