"""SwiGLU feed-forward block (`gate_proj`, `up_proj`, `down_proj`, as in fla's GatedMLP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hlsa.layers.linear import Linear, fused_linear


class GatedMLP(nn.Module):
    def __init__(
        self, hidden_size: int, intermediate_size: int, *, hidden_act: str = "swish", backend: str = "auto"
    ) -> None:
        super().__init__()
        if hidden_act not in ("swish", "silu"):
            raise ValueError(f"GatedMLP: hidden_act must be 'swish' (SiLU), got {hidden_act!r}")
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False, backend=backend)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False, backend=backend)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, [self.gate_proj, self.up_proj]).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
