"""``ValidatingCodec``: the base of codecs whose layers decode independently; every requested layer is
validated before the output is allocated, and layers decode on the codec thread pool when the work
releases the GIL."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ragkv.codecs.base import Codec, check_decode_args, check_encode_input, join_layers
from ragkv.codecs.parallel import thread_map


class ValidatingCodec(Codec):
    """A codec whose ``decode_layers`` validates every requested layer before allocating the output.

    Subclasses implement ``plan_layer`` (parse and check one layer's bytes against the declared shape,
    returning whatever ``decode_planned`` needs) and ``decode_planned`` (fill ``out``). Layers are
    decoded on ``decode_workers()`` threads when ``threaded`` is set (for work that releases the GIL).
    """

    threaded = False

    def plan_layer(self, data: memoryview, shape: tuple[int, int, int, int], dtype: torch.dtype,
                   layer_index: int, num_layers: int) -> Any:
        raise NotImplementedError

    def decode_planned(self, plan: Any, shape: tuple[int, int, int, int], dtype: torch.dtype,
                       out: torch.Tensor) -> None:
        raise NotImplementedError

    def decode_layer(self, data, shape, dtype, layer_index, num_layers, out) -> None:
        self.decode_planned(self.plan_layer(data, shape, dtype, layer_index, num_layers), shape, dtype, out)

    def decode_layers(self, payload: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype,
                      layers: Sequence[int]) -> torch.Tensor:
        num_layers, heads, tokens, dim, layers = check_decode_args(shape, dtype, layers)
        views = self._layer_views(payload, num_layers)
        layer_shape = (2, heads, tokens, dim)
        plans = [self.plan_layer(views[i], layer_shape, dtype, i, num_layers) for i in layers]
        out = torch.empty((len(layers), 2, heads, tokens, dim), dtype=dtype)
        self.decode_all(plans, layer_shape, dtype, out)
        return out

    def decode_all(self, plans: Sequence[Any], shape: tuple[int, int, int, int], dtype: torch.dtype,
                   out: torch.Tensor) -> None:
        """Decode validated layers into ``out`` (``[len(plans), 2, H, T, D]``): one after another, or on the
        codec thread pool when ``threaded``. Codecs with their own parallelism override this."""
        if self.threaded:
            thread_map(lambda j: self.decode_planned(plans[j], shape, dtype, out[j]), len(plans))
        else:
            for j, plan in enumerate(plans):
                self.decode_planned(plan, shape, dtype, out[j])

    def encode(self, kv: torch.Tensor, position: int | None = None) -> bytes:
        if not self.threaded:
            return super().encode(kv, position)
        kv = check_encode_input(kv)
        num_layers = kv.shape[0]
        return join_layers(thread_map(lambda i: self.encode_layer(kv[i], i, num_layers), num_layers))


__all__ = [
    "ValidatingCodec",
]
