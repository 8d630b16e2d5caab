"""The key/value cache: an explicit object passed to ``DecoderLM.forward``.

Keys and values of every layer are kept in preallocated tensors, so a decode step
only computes the new token's projections and attends over the stored prefix.
Contract: during one forward pass each layer calls ``update(layer, k, v)`` with the
new positions and gets back the whole prefix; the model then calls ``advance(T)``.
"""

from __future__ import annotations

import torch


class KVCache:
    attends = False  # the model attends over what update returns (see SlotKVCache.attend for the other way)

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        # Not zeroed: a position is written before anything reads it (update returns the filled
        # prefix only). Zeroing SmolLM2's cache at its 8,192 positions (377 MB in fp32), as a compiled
        # step allocates it, took 75 ms a request, 1.2 ms a token of a 64-token answer.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled so far (the same for every row of the batch)

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A cache shaped for ``model`` (a DecoderLM)."""
        config = model.config
        param = next(model.parameters())
        return cls(config.num_layers, batch_size, max_len or config.max_seq_len, config.num_kv_heads,
                   config.head_dim, dtype or param.dtype, param.device)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at positions length..length+T-1; return the filled prefix."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def crop(self, length: int) -> None:
        """Forget every position from ``length`` on (used when draft tokens are rejected)."""
        self.length = min(self.length, length)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows in the order ``rows`` (beam search: each beam follows its parent)."""
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i].index_select(0, rows)
            self.values[i] = self.values[i].index_select(0, rows)
