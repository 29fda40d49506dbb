"""``ModelAdapter``: drives a HuggingFace Llama-family decoder layer by layer from its own modules.

The adapter never calls the model's ``forward``. It runs the embedding, each layer's input norm, q/k/v
projections (plus Qwen3's q/k norms), RoPE, attention, o-projection, post-attention norm and MLP, and the
final norm and head itself, so a strategy can compute *chosen rows* of *chosen layers* against any K/V it
assembled. Attention always uses an exact causal mask over positions: key ``j`` is visible to query ``i``
iff ``position[j] <= position[i]`` (never a bottom-right approximation).

Shapes: B batch, R rows being computed, N keys attended, E hidden size, Hq query heads, H kv heads,
D head dim, L layers. Per-sequence KV is ``[L, 2, B, H, N, D]``; one chunk's stored KV is ``[L, 2, H, T, D]``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ragkv.codecs.base import DTYPE_NAMES
from ragkv.kvstore.chunk import ModelFingerprint
from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.errors import ContextTooLong, UnsupportedModel
from ragkv.middleware.families import FamilySpec, check_config, check_model_modules, supported_summary
from ragkv.middleware.rope import apply_rope, rotate_keys

# Config keys that change nothing about the KV a model produces.
_FINGERPRINT_IGNORED = {
    "dtype", "torch_dtype", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "architectures",
}

RopeTables = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [1, T, D] in the model dtype


@dataclass
class PrefillOutput:
    """KV of the newly computed tokens and their last-layer hidden states (before the final norm)."""

    kv: torch.Tensor  # [L, 2, B, H, T, D]
    hidden: torch.Tensor  # [B, T, E]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H, N, D] -> [B, H * n_rep, N, D] (each kv head serves n_rep query heads, GQA)."""
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def exact_causal_mask(row_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """[R] x [N] -> bool [R, N]: True where the key's position <= the query's position (visible)."""
    return key_positions[None, :] <= row_positions[:, None]


@dataclass(frozen=True)
class RowMask:
    """The exact causal mask of R query rows over N keys, plus the cheapest exact way to apply it.

    * Rows that are the contiguous positions ``s .. N-1`` of keys at ``0 .. N-1`` and cover at least half of
      them (layer 0 of a blend, a prefill after a short past): attention is a causal square once ``s`` zero
      queries are put in front, so SDPA's causal kernel runs and the padded rows are dropped.
    * Otherwise, with keys in ascending position order, row ``i`` sees a prefix of the keys; rows (sorted)
      are cut into groups that attend only to the keys the group's last row can see. SDPA's masked CPU
      kernel visits every key block, so this saves the invisible tail (measured ~40% on 15% of 4k rows).
    * Otherwise the dense boolean mask.
    """

    dense: torch.Tensor  # bool [R, N], True = visible
    suffix_start: int | None = None
    groups: tuple[tuple[int, int, int, bool], ...] | None = None  # (row start, row end, keys, needs mask)

    GROUPS = 8
    MIN_GROUP_ROWS = 32

    @classmethod
    def build(cls, row_positions: torch.Tensor, key_positions: torch.Tensor) -> RowMask:
        dense = exact_causal_mask(row_positions, key_positions)
        n, r = key_positions.numel(), row_positions.numel()
        ar = torch.arange(n, device=key_positions.device)
        if 2 * r >= n and torch.equal(key_positions, ar) and torch.equal(row_positions, ar[n - r:]):
            return cls(dense, suffix_start=n - r)
        keys_sorted = n < 2 or bool((key_positions[1:] > key_positions[:-1]).all())
        rows_sorted = r < 2 or bool((row_positions[1:] >= row_positions[:-1]).all())
        if not (keys_sorted and rows_sorted) or r == 0:
            return cls(dense)
        counts = torch.searchsorted(key_positions, row_positions, right=True).tolist()  # visible keys per row
        step = max(cls.MIN_GROUP_ROWS, -(-r // cls.GROUPS))
        groups = []
        for lo in range(0, r, step):
            hi = min(r, lo + step)
            groups.append((lo, hi, int(counts[hi - 1]), counts[lo] != counts[hi - 1]))
        return cls(dense, groups=tuple(groups))


def weights_digest(model: Any) -> str:
    """A digest of every weight and buffer the model holds, byte for byte (tied tensors counted once), so two
    checkpoints of one config never share KV. ~0.5 s for SmolLM2-135M in float32 on this machine."""
    h = hashlib.blake2b(digest_size=16)
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.data_ptr())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


class ModelAdapter:
    """Wraps a ``*ForCausalLM`` of a supported family (see ``ragkv.middleware.families``).

    ``start_token_id`` is the token every chunk is computed behind (its KV is then dropped) and every
    assembled prompt begins with: the tokenizer's BOS by default, else the config's ``bos_token_id``, else the
    family's start token (Qwen's ``<|endoftext|>``); models with none must name one. ``model_id`` (the model's
    name) is mixed into the fingerprint with the config, dtype, tokenizer vocabulary and a digest of every
    weight (``weights_digest``: that digest, already known for these weights, e.g. from
    ``ragkv.middleware.weights_cache``; computed when None).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, start_token_id: int | None = None,
                 model_id: str | None = None, weights_digest: str | None = None) -> None:
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedModel(f"{type(model).__name__} has no config; " + supported_summary())
        check = check_config(config)
        check_model_modules(model)
        self.model = model.eval()
        self.config = config
        self.tokenizer = tokenizer
        self.family: FamilySpec = check.family
        self.rope_type = check.rope_type
        self.max_length: int | None = check.max_length
        base = model.model
        self.embed_tokens = base.embed_tokens
        self.layers = list(base.layers)
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = model.lm_head
        attn0 = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(attn0.head_dim)
        self.hidden_size = int(config.hidden_size)
        self.n_rep = self.num_heads // self.num_kv_heads
        self.dtype: torch.dtype = self.embed_tokens.weight.dtype
        self.device: torch.device = self.embed_tokens.weight.device
        if self.dtype not in DTYPE_NAMES:
            raise UnsupportedModel(f"weights dtype {self.dtype} is not supported; allowed: {sorted(DTYPE_NAMES.values())}")
        self.dtype_name = DTYPE_NAMES[self.dtype]
        self.start_token_id = self._resolve_start_token(start_token_id)
        self.model_id = model_id
        self.fingerprint = self._fingerprint(weights_digest)
        # called after every layer ``attend`` computes (every path: prefill, selective, batched decode); the
        # scheduler uses it to pause a long prepare for decode steps (``middleware/sliced.py``)
        self.layer_hook: Callable[[], None] | None = None

    # -- identity ------------------------------------------------------------------------------------------
    def _resolve_start_token(self, start_token_id: int | None) -> int:
        candidates = [start_token_id, getattr(self.tokenizer, "bos_token_id", None),
                      getattr(self.config, "bos_token_id", None)]
        if self.family.start_token is not None and self.tokenizer is not None:
            candidates.append(self.tokenizer.get_vocab().get(self.family.start_token))
        for c in candidates:
            if isinstance(c, int) and not isinstance(c, bool):
                if not 0 <= c < int(self.config.vocab_size):
                    raise ConfigError(f"start_token_id {c} is outside the vocabulary (size {self.config.vocab_size})")
                return c
        raise ConfigError("the model has no BOS token; pass start_token_id= (the token every chunk is computed "
                          "behind, e.g. Qwen's <|endoftext|>)")

    def _fingerprint(self, known_weights_digest: str | None) -> ModelFingerprint:
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in _FINGERPRINT_IGNORED}
        cfg["ragkv_start_token_id"] = self.start_token_id
        cfg["ragkv_weights"] = known_weights_digest or weights_digest(self.model)
        if self.model_id is not None:
            cfg["ragkv_model_id"] = self.model_id
        vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else None
        return ModelFingerprint.from_parts(cfg, self.dtype_name, vocab)

    # -- tokenizer -----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Tokenize a piece on its own, without special tokens (the same text always gives the same ids)."""
        if self.tokenizer is None:
            raise ConfigError("this adapter has no tokenizer; pass token ids instead of text")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise ConfigError("this adapter has no tokenizer")
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    @property
    def eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        for source in (getattr(self.model, "generation_config", None), self.config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            for e in (eos if isinstance(eos, (list, tuple)) else [eos]):
                if isinstance(e, int) and e not in ids:
                    ids.append(e)
        return ids

    # -- RoPE ------------------------------------------------------------------------------------------------
    @property
    def inv_freq(self) -> torch.Tensor:
        """[D/2] float32 rotary inverse frequencies."""
        return self.rotary.inv_freq.to(torch.float32)

    def rotate_keys(self, kv: torch.Tensor, delta: int) -> torch.Tensor:
        """kv: [L, 2, H, T, D] post-RoPE -> keys moved ``delta`` positions later (float32 math)."""
        return rotate_keys(kv, delta, self.inv_freq)

    def check_length(self, length: int) -> None:
        if self.max_length is not None and length > self.max_length:
            raise ContextTooLong(f"{length} tokens exceed the sliding window of {self.max_length}; within the window "
                                 f"the model's attention is exactly causal, beyond it the adapter would be wrong")

    @torch.no_grad()
    def rope(self, positions: torch.Tensor) -> RopeTables:
        """positions [T] (long) -> cos, sin [1, T, D] in the model dtype, from the model's own rotary module."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, positions.to(self.device)[None, :])
        return cos, sin

    # -- layer pieces ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> hidden [B, T, E]."""
        return self.embed_tokens(ids.to(self.device))

    @torch.no_grad()
    def project(self, layer: int, hidden: torch.Tensor, rope: RopeTables
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [B, R, E] (residual stream entering ``layer``) -> q [B, Hq, R, D], k, v [B, H, R, D] (post-RoPE)."""
        block = self.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        b, r, _ = x.shape
        q = attn.q_proj(x).view(b, r, -1, self.head_dim)  # [B, R, Hq, D]
        k = attn.k_proj(x).view(b, r, -1, self.head_dim)  # [B, R, H, D]
        v = attn.v_proj(x).view(b, r, -1, self.head_dim)
        if self.family.qk_norm:
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    @torch.no_grad()
    def attend(self, layer: int, residual: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | RowMask | None = None, causal: bool = False) -> torch.Tensor:
        """Rest of ``layer`` for R rows: attention over N keys, o-proj, residual, norm, MLP, residual.

        residual [B, R, E]; q [B, Hq, R, D]; keys, values [B, H, N, D]; mask: bool [R, N] (True = visible),
        bool [B, 1, R, N] (a mask per sequence) or a ``RowMask``, or None with ``causal`` (R == N, positions
        aligned) or neither (every key visible).
        Returns [B, R, E].
        """
        block = self.layers[layer]
        attn = block.self_attn
        gqa = self.n_rep > 1
        if isinstance(mask, RowMask) and mask.suffix_start is not None:
            s = mask.suffix_start
            padded = torch.cat((q.new_zeros(q.shape[0], q.shape[1], s, q.shape[3]), q), dim=2) if s else q
            out = F.scaled_dot_product_attention(padded, keys, values, is_causal=True, scale=attn.scaling,
                                                 enable_gqa=gqa)[:, :, s:]
        elif isinstance(mask, RowMask) and mask.groups is not None:
            parts = []
            for lo, hi, n_keys, masked in mask.groups:
                group_mask = mask.dense[None, None, lo:hi, :n_keys] if masked else None
                parts.append(F.scaled_dot_product_attention(
                    q[:, :, lo:hi], keys[:, :, :n_keys], values[:, :, :n_keys], attn_mask=group_mask,
                    scale=attn.scaling, enable_gqa=gqa))
            out = torch.cat(parts, dim=2)
        elif mask is not None:
            dense = mask.dense if isinstance(mask, RowMask) else mask
            dense = dense if dense.dim() == 4 else dense[None, None]  # [B, 1, R, N]: one mask per sequence
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=dense, scale=attn.scaling,
                                                 enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=causal, scale=attn.scaling,
                                                 enable_gqa=gqa)
        b, _, r, _ = out.shape
        out = attn.o_proj(out.transpose(1, 2).reshape(b, r, -1))  # [B, R, E]
        hidden = residual + out
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        if self.layer_hook is not None:
            self.layer_hook()
        return hidden

    @torch.no_grad()
    def attention_probs(self, layer: int, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | RowMask
                        ) -> torch.Tensor:
        """Softmax attention weights q [B, Hq, R, D] x keys [B, H, N, D] under mask [R, N] -> float32 [B, Hq, R, N]."""
        dense = mask.dense if isinstance(mask, RowMask) else mask
        scale = self.layers[layer].self_attn.scaling
        scores = torch.matmul(q.float(), repeat_kv(keys, self.n_rep).float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~dense[None, None], float("-inf"))
        return torch.softmax(scores, dim=-1)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, R, E] (last layer output) -> float32 logits [B, R, V] (final norm + head)."""
        return self.lm_head(self.norm(hidden)).float()

    # -- whole passes ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, start_position: int = 0, past: torch.Tensor | None = None,
                observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                layers: int | None = None) -> PrefillOutput:
        """Compute ``ids`` [B, T] at positions ``start_position ..``, after ``past`` KV [L, 2, B, H, P, D] that
        holds positions ``0 .. P-1`` (so ``start_position`` must be P when ``past`` is given).
        ``observe(layer, q, k)`` sees each layer's new queries and keys (before attention); ``layers``: stop after
        the first ``layers`` layers (default: all).

        Returns the new tokens' KV [layers, 2, B, H, T, D] and the last computed layer's hidden states [B, T, E].
        """
        ids = ids.to(self.device)
        b, t = ids.shape
        past_len = 0 if past is None else past.shape[4]
        if past is not None and start_position != past_len:
            raise ValueError(f"past holds {past_len} positions but start_position is {start_position}")
        self.check_length(start_position + t)
        positions = torch.arange(start_position, start_position + t, device=self.device)
        rope = self.rope(positions)
        mask = None
        if past is not None and past_len:
            mask = RowMask.build(positions, torch.arange(past_len + t, device=self.device))
        depth = self.num_layers if layers is None else layers
        if not 1 <= depth <= self.num_layers:
            raise ValueError(f"layers must be in [1, {self.num_layers}], got {layers}")
        out = torch.empty((depth, 2, b, self.num_kv_heads, t, self.head_dim), dtype=self.dtype, device=self.device)
        hidden = self.embed(ids)
        for layer in range(depth):
            q, k, v = self.project(layer, hidden, rope)
            out[layer, 0], out[layer, 1] = k, v
            if observe is not None:
                observe(layer, q, k)
            if mask is None:
                hidden = self.attend(layer, hidden, q, k, v, causal=True)
            else:
                keys = torch.cat((past[layer, 0], k), dim=2)  # type: ignore[index]
                values = torch.cat((past[layer, 1], v), dim=2)  # type: ignore[index]
                hidden = self.attend(layer, hidden, q, keys, values, mask=mask)
        return PrefillOutput(out, hidden)

    def make_cache(self, kv: torch.Tensor) -> Any:
        """kv [L, 2, B, H, N, D] -> a transformers ``DynamicCache`` ready for the model's own decoding."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.config)
        for layer, cache_layer in enumerate(cache.layers):
            keys, values = kv[layer, 0], kv[layer, 1]  # [B, H, N, D] views: no copy
            if type(cache_layer) is DynamicLayer:
                cache_layer.lazy_initialization(keys, values)
                cache_layer.keys, cache_layer.values = keys, values
            else:  # e.g. a sliding-window layer keeps its own bookkeeping: let it copy
                cache_layer.update(keys.contiguous(), values.contiguous())
        return cache

    def new_kv(self, length: int, batch: int = 1) -> torch.Tensor:
        """An uninitialised sequence KV buffer [L, 2, B, H, length, D]."""
        return torch.empty((self.num_layers, 2, batch, self.num_kv_heads, length, self.head_dim), dtype=self.dtype,
                           device=self.device)

    def describe(self) -> dict[str, Any]:
        return {"model_type": self.family.model_type, "layers": self.num_layers, "heads": self.num_heads,
                "kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "dtype": self.dtype_name,
                "rope_type": self.rope_type, "max_length": self.max_length, "start_token_id": self.start_token_id,
                "fingerprint": str(self.fingerprint)}


__all__ = ["ModelAdapter", "PrefillOutput", "RopeTables", "RowMask", "exact_causal_mask", "repeat_kv", "weights_digest"]
