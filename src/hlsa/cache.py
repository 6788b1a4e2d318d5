"""`HybridCache`: the decode states of every layer of a model, allocated once per generation (gpt-fast style).

Each mixer defines its own state dataclass (`GDNState`, `KVState`, `NSAState`, `LTEState`, `EvictionState`) of
preallocated tensors that it updates in place. GDN, SWA and LTE states have a fixed size whatever the context length,
and so does full attention under an eviction policy (`EvictionState`); otherwise full attention and NSA keep the whole
history.
"""

from __future__ import annotations

import dataclasses

import torch


class HybridCache:
    def __init__(self, states: list) -> None:
        self.states = states
        self.seen = 0  # tokens consumed so far (pads included); a host-side count, so decoding needs no sync

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def nbytes(self) -> int:
        """Bytes held by every tensor of every layer's state."""
        total = 0
        for state in self.states:
            for field in dataclasses.fields(state):
                value = getattr(state, field.name)
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    def __repr__(self) -> str:
        kinds = ", ".join(type(s).__name__ for s in self.states)
        return f"HybridCache(seen={self.seen}, nbytes={self.nbytes()}, states=[{kinds}])"
