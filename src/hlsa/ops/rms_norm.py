"""RMSNorm over the last dim, computed in fp32 and cast back (gpt-fast), optionally gated (fla's
`FusedRMSNormGated` with a swish gate). The norm modules (`hlsa.layers.norm`) and the GDN decode op share it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None) -> torch.Tensor:
    """`x / sqrt(mean(x^2) + eps) * weight`, times `silu(gate)` when a gate (shaped like `x`) is given; in the dtype of
    `x`."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if gate is not None:
        normed = normed * F.silu(gate.float())
    return normed.to(x.dtype)
