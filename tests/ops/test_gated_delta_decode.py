"""GDN decode op: token-by-token decoding (the reference, and the Triton kernel interpreted on the CPU) against the
layer's math over the whole sequence, written out here with a conv1d and the chunked delta rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hlsa.ops.gated_delta import gated_delta_rule_chunked
from hlsa.ops.gated_delta_decode import gated_delta_decode, projection_width

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernel runs interpreted (tests/conftest.py)
EPS = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_layer(H: int, K: int, V: int, W: int, gated: bool, *, seed: int = 0) -> dict:
    """Random parameters and caches; W = 0: no short conv."""
    gen = torch.Generator().manual_seed(seed)
    C = 2 * H * K + H * V

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    return {
        "conv_weight": rand(C, W, scale=0.5) if W else None,
        "A_log": rand(H, scale=0.5),
        "dt_bias": rand(H, scale=0.5),
        "norm_weight": 1 + rand(V, scale=0.2),
        "norm_eps": EPS,
        "gated": gated,
    }


def sequence_outputs(
    x: torch.Tensor, params: dict, H: int, K: int, V: int, state0: torch.Tensor, conv0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The layer's math over `x [B, T, N]` at once, in fp32: (outputs [B, T, H*V], final state, final conv cache)."""
    B, T, _ = x.shape
    C = 2 * H * K + H * V
    qkv, gate, a, b = x.split([C, H * V if params["gated"] else 0, H, H], dim=-1)
    conv_cache = None
    if params["conv_weight"] is not None:
        W = params["conv_weight"].shape[1]
        x_BCT = torch.cat([conv0, qkv.transpose(1, 2)], dim=-1)
        qkv = F.conv1d(x_BCT, params["conv_weight"][:, None], groups=C).transpose(1, 2)
        conv_cache = x_BCT[:, :, x_BCT.shape[-1] - (W - 1) :]
    q, k, v = F.silu(qkv).split([H * K, H * K, H * V], dim=-1)
    q, k = (t.view(B, T, H, K) / (t.view(B, T, H, K).square().sum(-1, keepdim=True) + 1e-6).sqrt() for t in (q, k))
    g = -params["A_log"].exp() * F.softplus(a + params["dt_bias"])
    o, state = gated_delta_rule_chunked(
        q, k, v.view(B, T, H, V), g, b.sigmoid(), initial_state=state0, output_final_state=True
    )
    o = o / (o.square().mean(-1, keepdim=True) + EPS).sqrt() * params["norm_weight"]
    if params["gated"]:
        o = o * F.silu(gate.view(B, T, H, V))
    return o.reshape(B, T, H * V), state, conv_cache


def as_partials(x: torch.Tensor, splits: int, seed: int) -> torch.Tensor:
    """`[S, ...]` random terms that add up to `x` (the last one closes the sum)."""
    gen = torch.Generator().manual_seed(seed)
    terms = [torch.randn(x.shape, generator=gen).to(x.device) for _ in range(splits - 1)]
    return torch.stack([*terms, x - sum(terms, torch.zeros_like(x))])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    ("H", "K", "V", "W", "gated", "splits"),
    [
        (2, 16, 24, 4, True, 1),  # V not a block multiple
        (3, 8, 8, 2, True, 3),  # partial sums
        (2, 32, 48, 0, False, 2),  # no short conv, plain norm
        (1, 16, 16, 1, False, 1),  # a conv of one tap: an empty cache
        (2, 128, 160, 3, True, 2),  # the model's K; five value blocks of the step kernel
    ],
    ids=lambda x: str(x),
)
def test_decoding_token_by_token_matches_the_sequence(backend, H, K, V, W, gated, splits):
    B, T = 3, 5
    params = make_layer(H, K, V, W, gated)
    C = 2 * H * K + H * V
    x = torch.randn(B, T, projection_width(H, K, V, gated), device=DEVICE)
    state0 = torch.randn(B, H, K, V, device=DEVICE) * 0.3
    conv0 = torch.randn(B, C, W - 1, device=DEVICE) if W else None
    expected, state_expected, conv_expected = sequence_outputs(x, params, H, K, V, state0, conv0)

    state, conv_state = state0.clone(), None if conv0 is None else conv0.clone()
    pointers = (state.data_ptr(), None if conv_state is None else conv_state.data_ptr())
    outputs = []
    for t in range(T):
        proj = as_partials(x[:, t], splits, seed=t)
        outputs.append(
            gated_delta_decode(proj, conv_state=conv_state, state=state, dtype=torch.float32, backend=backend, **params)
        )
    assert rel_err(torch.stack(outputs, dim=1), expected) < 1e-4
    assert rel_err(state, state_expected) < 1e-4
    if conv_state is not None:
        torch.testing.assert_close(conv_state, conv_expected, rtol=1e-6, atol=1e-6)
    # In place: a CUDA graph replays against these addresses.
    assert pointers == (state.data_ptr(), None if conv_state is None else conv_state.data_ptr())


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter truncates fp32 to bf16 (no rounding)"),
        ),
    ],
)
def test_kernel_matches_the_reference_in_half_precision(dtype):
    """Both round where the layer rounds (the projection, conv, silu, L2 norms, beta, the output), from fp32 partial
    sums as the decode GEMM writes them. (Whether the kernel rounds at each of those steps barely shows at the output:
    in fp16 it stays within these tolerances without them. The fp32 test above checks the arithmetic.)"""
    B, H, K, V, W = 4, 2, 32, 32, 4
    params = make_layer(H, K, V, W, True, seed=1)
    params["conv_weight"] = params["conv_weight"].to(dtype)
    proj = as_partials(torch.randn(B, projection_width(H, K, V, True), device=DEVICE), 2, seed=3)
    conv0 = torch.randn(B, 2 * H * K + H * V, W - 1, device=DEVICE).to(dtype)
    state0 = torch.randn(B, H, K, V, device=DEVICE) * 0.3
    results = {}
    for backend in ("torch", "triton"):
        state, conv_state = state0.clone(), conv0.clone()
        out = gated_delta_decode(proj, conv_state=conv_state, state=state, dtype=dtype, backend=backend, **params)
        results[backend] = out, state, conv_state
    (out, state, conv_state), (out_ref, state_ref, conv_ref) = results["triton"], results["torch"]
    assert out.dtype == dtype and out.shape == (B, H * V)
    # Elementwise, to a few units of the last place: the same roundings, sums in a different order (and on a GPU,
    # approximate exp/rsqrt) flip a few. fp16 is checked at 2 units on the CPU; bf16 (GPU only) gets 4.
    ulps = (2 if dtype == torch.float16 else 4) * torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=ulps, atol=ulps * out_ref.abs().max().item())
    assert rel_err(state, state_ref) < 1e-2
    assert torch.equal(conv_state, conv_ref)  # the same rounded inputs, moved


def test_bad_inputs_are_named():
    H, K, V, W = 2, 8, 8, 4
    params = make_layer(H, K, V, W, True)
    C = 2 * H * K + H * V
    proj = torch.randn(1, 2, projection_width(H, K, V, True), device=DEVICE)
    conv_state = torch.zeros(2, C, W - 1, device=DEVICE)
    state = torch.zeros(2, H, K, V, device=DEVICE)

    def call(proj=proj, **overrides):
        return gated_delta_decode(
            proj, **{"conv_state": conv_state, "state": state, "dtype": torch.float32, **params, **overrides}
        )

    with pytest.raises(ValueError, match="state must be a contiguous float32"):
        call(state=state.double())
    with pytest.raises(ValueError, match="state must be a contiguous float32"):
        call(state=state.transpose(2, 3))
    with pytest.raises(ValueError, match=r"proj must be float \[S, B, N\]"):
        call(proj=proj[0])
    with pytest.raises(ValueError, match=r"proj must be float \[S, B, N\] = \[S, 2, 52\]"):
        call(gated=False)  # the gate columns make proj too wide for an ungated layer
    with pytest.raises(ValueError, match="together"):
        call(conv_weight=None)
    with pytest.raises(ValueError, match=r"conv_state must be a contiguous torch.float32 \[B, C, W-1\]"):
        call(conv_state=conv_state[:, :, :2])
    with pytest.raises(ValueError, match="conv_weight must be"):
        call(conv_weight=params["conv_weight"][:-1])
    with pytest.raises(ValueError, match="norm_weight must be"):
        call(norm_weight=params["norm_weight"][:-1])
    with pytest.raises(ValueError, match="backend"):
        call(backend="fla")
