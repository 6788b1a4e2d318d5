"""Projections: `nn.Linear` on `hlsa.ops.linear` (the decode fast path), and several projections of one input as
one GEMM.

At decode every projection is a GEMM of a few rows whose cost is mostly fixed latency, so the layers fuse the
projections that share an input (q|k|v, gate|up, GDN's six). The weights are concatenated on every call: in eager
mode that copies them (a few MB per layer, small next to a training step's GEMMs); a compiled, frozen decode step
folds the concatenation into a constant (benchmarks/e2e.py, docs/efficiency.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hlsa.ops.linear import linear


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and init) whose matmul is `hlsa.ops.linear`.

    `backend`: the owning layer's. "torch" keeps every call on `F.linear` (the model's reference mode); any other
    value lets the op choose (its decode kernel where it applies), since an explicit "triton" would refuse the
    training and prefill shapes that the kernel does not take."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, backend: str = "auto") -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.backend = "torch" if backend == "torch" else "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, backend=self.backend)
        return out if self.bias is None else out + self.bias


def fused_weight(projections: Sequence[Linear]) -> torch.Tensor:
    """The weights of `projections` stacked `[sum of out_features, in_features]`: their product is one GEMM."""
    return torch.cat([p.weight for p in projections])


def fused_linear(x: torch.Tensor, projections: Sequence[Linear]) -> torch.Tensor:
    """The outputs of `projections` (all of input `x`, one backend) concatenated on the last dim, as one GEMM."""
    if len(projections) == 1:
        return projections[0](x)
    out = linear(x, fused_weight(projections), backend=projections[0].backend)
    if all(p.bias is None for p in projections):
        return out
    biases = [p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projections]
    return out + torch.cat(biases)
