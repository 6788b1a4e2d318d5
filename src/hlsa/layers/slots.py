"""Slot buffers of the decode caches, head-major `[B, HKV, S, ...]`.

Window caches (SWA, and the first `W + 1` slots of LTE's) are rings: the token at position `p` lives in slot
`p % ring_size`; the decode write takes the position as a device tensor, so a step needs no host sync and can be
captured in a CUDA graph. Full-history caches (full attention, NSA) hold position `p` in slot `p` and grow.
"""

from __future__ import annotations

import torch


def fill_ring(ring: torch.Tensor, values: torch.Tensor, *, start: int = 0) -> torch.Tensor:
    """Write the last `ring_size` tokens of a prefill chunk into their slots.

    ring [B, HKV, R, ...] (written in place), values [B, T, HKV, ...] for positions `start .. start+T-1`.
    Returns the int64 token indices kept (the last `min(T, R)`), so callers can fill matching metadata.
    """
    ring_size, length = ring.shape[2], values.shape[1]
    keep = torch.arange(max(0, length - ring_size), length, device=ring.device)
    slots = (keep + start) % ring_size
    ring[:, :, slots] = values[:, keep].transpose(1, 2).to(ring.dtype)
    return keep


def write_slot(ring: torch.Tensor, value: torch.Tensor, position: torch.Tensor) -> None:
    """Decode write: ring [B, HKV, R, ...] <- value [B, HKV, ...] at slot `position % R` (position: int64 [] tensor)."""
    slot = (position % ring.shape[2]).view(1)
    ring.index_copy_(2, slot, value.unsqueeze(2).to(ring.dtype))


def grow_slots(buf: torch.Tensor, slots: int, *, used: int) -> torch.Tensor:
    """A zero buffer like `buf [B, HKV, S, ...]` with `slots` slots, holding a copy of the first `used` ones."""
    grown = buf.new_zeros((*buf.shape[:2], slots, *buf.shape[3:]))
    grown[:, :, :used] = buf[:, :, :used]
    return grown
