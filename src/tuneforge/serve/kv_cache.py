"""The engine's key/value cache: one preallocated slot per running sequence.

Per attention layer the cache holds keys and values of shape (slots, kv_heads, capacity, head_dim).
The running batch always occupies slots 0..B-1 in batch order (a finished row's slot is refilled by
moving the last row into it), so a decoding step reads the cache as a view, never a gather. Before
each forward the engine states what it writes (`plan_prefill` / `plan_decode`); the attention
layers then call `update(keys, values, layer_idx)`, the one method transformers' decoder attention
(Llama, Qwen2/3, Mistral, Gemma 3, Phi-3) needs from a cache object, and get back the keys and values
to attend over. Which of those each query may see is the engine's explicit 4D mask (`prefill_mask` /
`decode_mask`), so rows of different lengths never see each other's padding; a sliding-window layer
keeps every key in its slot and its mask hides those older than the window.
"""

from __future__ import annotations

import torch

from tuneforge.errors import ConfigError

MIN_CAPACITY = 64


class SlotKVCache:
    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_layers = num_layers
        self.slots = slots
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_length = max_length
        self.dtype = dtype
        self.device = device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._first_slot = 0
        self._rows = 0
        self._prefill_slots: list[int] = []
        self._positions: torch.Tensor | None = None  # decode: (B,) write position per row
        self._kv_length = 0

    def ensure_capacity(self, length: int) -> None:
        """Grow (by doubling, up to max_length) so that `length` positions fit; keeps the contents."""
        if length > self.max_length:
            raise ConfigError(f"a sequence of {length} tokens exceeds the engine's max_model_len={self.max_length}")
        if length <= self.capacity:
            return
        capacity = min(self.max_length, max(MIN_CAPACITY, self.capacity * 2, length))
        shape = (self.slots, self.kv_heads, capacity, self.head_dim)
        for store in (self.keys, self.values):
            grown = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
            for layer, old in enumerate(store):
                grown[layer][:, :, : self.capacity] = old
            store[:] = grown
        self.capacity = capacity

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target` (every layer)."""
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target, :, :length] = tensor[source, :, :length]

    def plan_prefill(self, slots: list[int], padded_length: int) -> None:
        """The next forward writes one new prompt per entry of `slots` (right-padded to
        `padded_length`) from position 0: row i of the batch goes to slot slots[i]. The engine
        passes the slots its rows occupy at that moment, so no ordering assumption ties the two."""
        self.ensure_capacity(padded_length)
        self._prefill_slots = list(slots)
        self._first_slot, self._rows, self._positions, self._kv_length = 0, len(slots), None, padded_length

    def plan_decode(self, positions: torch.Tensor) -> None:
        """The next forward writes one token per running row (slots 0..B-1) at `positions` (B,)."""
        kv_length = int(positions.max()) + 1
        self.ensure_capacity(kv_length)
        self._first_slot, self._rows, self._positions, self._kv_length = 0, positions.shape[0], positions, kv_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store this step's keys/values (rows, kv_heads, q_len, head_dim); return all to attend over."""
        first, last = self._first_slot, self._first_slot + self._rows
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._positions is None:
            length = key_states.shape[2]
            slots = self._prefill_slots
            if slots == list(range(slots[0], slots[0] + len(slots))):  # one block: a plain slice
                keys[slots[0]:slots[0] + len(slots), :, :length] = key_states
                values[slots[0]:slots[0] + len(slots), :, :length] = value_states
            else:
                index = torch.tensor(slots, device=keys.device)
                keys[index, :, :length] = key_states
                values[index, :, :length] = value_states
            return key_states, value_states
        rows = torch.arange(first, last, device=self._positions.device)
        keys[rows, :, self._positions] = key_states[:, :, 0]
        values[rows, :, self._positions] = value_states[:, :, 0]
        return keys[first:last, :, : self._kv_length], values[first:last, :, : self._kv_length]


def prefill_mask(lengths: torch.Tensor, padded_length: int, dtype: torch.dtype,
                 window: int | None = None) -> torch.Tensor:
    """Additive mask (rows, 1, T, T): query i sees key j when j <= i and j is a real prompt token,
    and, for a sliding-window layer, i - j < window (transformers' `sliding_window_overlay`)."""
    positions = torch.arange(padded_length, device=lengths.device)
    causal = positions[None, :] <= positions[:, None]  # (T, T)
    if window is not None:
        causal = causal & (positions[None, :] > positions[:, None] - window)
    real = positions[None, :] < lengths[:, None]  # (rows, T)
    allowed = causal[None] & real[:, None, :]  # (rows, T, T)
    return _additive(allowed[:, None], dtype)


def decode_mask(positions: torch.Tensor, kv_length: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Additive mask (B, 1, 1, kv_length): the new token of a row at position p sees keys 0..p
    (p - window + 1..p in a sliding-window layer; the cache keeps every key, the mask hides the old)."""
    keys = torch.arange(kv_length, device=positions.device)[None, :]  # (1, kv)
    allowed = keys <= positions[:, None]  # (B, kv)
    if window is not None:
        allowed = allowed & (keys > positions[:, None] - window)
    return _additive(allowed[:, None, None], dtype)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
