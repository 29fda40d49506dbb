"""The ``raw`` codec: the tensor's bytes as given (fp16, bf16 or fp32), per layer."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ragkv.codecs.base import Codec, CodecError, CodecParams, check_shape, register_codec


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

    def decode(self, payload: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Zero-copy: the whole tensor is a view over the payload (which it keeps alive).

        The payload is the caller's own buffer (a file read or a Redis reply nobody else holds), so viewing
        it in place is safe and saves the copy into a fresh tensor, which costs page faults at ~1.5 GB/s.
        """
        num_layers = check_shape(shape)[0]
        views = self._layer_views(payload, num_layers)
        layer_bytes = int(np.prod(shape[1:])) * torch.empty((), dtype=dtype).element_size()
        if any(len(v) != layer_bytes for v in views):
            raise CodecError(f"raw payload layers are not {layer_bytes} bytes each")
        body = memoryview(payload)[8 * (num_layers + 1):]
        if len(body) == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffers: we are their only holder
            return torch.frombuffer(body, dtype=dtype).view(tuple(shape))
