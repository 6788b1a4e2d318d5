"""The layers' projections: `fused_linear` against the projections applied one by one, and the model's "torch"
backend reaching every `Linear` (the reference mode must not launch the decode GEMM kernel)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hlsa.layers.linear import Linear, fused_linear
from tests.model.conftest import ARCHS, tiny_model


@pytest.mark.parametrize("biases", [(False, False, False), (True, False, True)], ids=["no-bias", "mixed-bias"])
def test_fused_linear_matches_the_projections_one_by_one(biases: tuple[bool, ...]) -> None:
    x = torch.randn(2, 3, 12)
    projections = [Linear(12, n, bias=b) for n, b in zip((5, 7, 1), biases)]
    want = torch.cat([F.linear(x, p.weight, p.bias) for p in projections], dim=-1)
    torch.testing.assert_close(fused_linear(x, projections), want)
    torch.testing.assert_close(fused_linear(x, projections[1:2]), want[..., 5:12])  # one projection: no concat


def test_gradients_flow_to_every_fused_weight() -> None:
    projections = [Linear(6, 4, bias=True), Linear(6, 3, bias=False)]
    fused_linear(torch.randn(5, 6), projections).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for proj in projections for p in proj.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_model_backend_reaches_every_projection(arch: str) -> None:
    """config backend "torch" -> every Linear keeps F.linear; "auto" -> the op chooses."""
    for backend, want in (("torch", "torch"), ("auto", "auto")):
        model = tiny_model(arch, backend=backend)
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        assert linears and all(m.backend == want for m in linears)
        assert not any(type(m) is torch.nn.Linear for m in model.modules())  # none left on plain nn.Linear
