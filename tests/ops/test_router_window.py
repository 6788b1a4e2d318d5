"""router_window_logits: the Triton kernel (interpreted on CPU) against the reference on awkward shapes, and the
reference against `F.conv1d` over the gathered window (tests/layers/test_lte_router.py checks both against the
router's full-sequence forward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hlsa.ops.router_window import router_window_logits, router_window_logits_ref, window_length

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layers(H: int, cnns: int, C: int, convs: list[tuple[int, int]], dtype: torch.dtype, seed: int) -> list:
    """Tap-major weights `[cnns, k, C_in, C_out]` halving the channels per conv, then a 1-channel projection."""
    g = torch.Generator().manual_seed(seed)
    layers, c_in = [], C
    for k, d in [*convs, (1, 1)]:
        c_out = max(1, c_in // 2) if (k, d) != (1, 1) or len(layers) < len(convs) else 1
        w = torch.randn(cnns, k, c_in, c_out, generator=g) / (k * c_in) ** 0.5
        b = torch.randn(cnns, c_out, generator=g) * 0.5
        layers.append((w.to(DEVICE, dtype), b.to(DEVICE, dtype), d))
        c_in = c_out
    return layers


def _inputs(B: int, H: int, R: int, C: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, R, C, generator=g).to(DEVICE, dtype)
    valid = torch.rand(B, R, generator=g) < 0.8
    valid[0] = True
    return x, valid.to(DEVICE)


def _conv1d_logits(x: torch.Tensor, valid: torch.Tensor, start: int, layers: list) -> torch.Tensor:
    """Per head: gather the window, then `F.conv1d` (no padding) with the weights back in PyTorch's `[O, C, k]`."""
    B, H, R, _ = x.shape
    L = window_length(layers)
    slots = [(start + i) % R for i in range(L)]
    keep = valid[:, slots].to(x.dtype)  # [B, L]
    out = torch.empty(B, H, dtype=x.dtype, device=x.device)
    for h in range(H):
        y = (x[:, h, slots] * keep[:, :, None]).transpose(1, 2)  # [B, C, L]
        lo = 0
        for i, (w, b, d) in enumerate(layers):
            cnn = h // (H // w.shape[0])
            y = F.conv1d(y, w[cnn].permute(2, 1, 0), b[cnn], dilation=d)
            if i < len(layers) - 1:
                lo += (w.shape[1] - 1) * d // 2
                y = F.silu(y * keep[:, None, lo : lo + y.shape[-1]])
        out[:, h] = y[:, 0, 0]
    return out


@pytest.mark.parametrize(
    "convs", [[(3, 2), (3, 2), (3, 2)], [(5, 1), (3, 3)], [(1, 1)], [(3, 1)]], ids=["default", "mixed", "pw", "k3"]
)
@pytest.mark.parametrize("cnns", [1, 2, 4])
def test_reference_matches_conv1d(convs: list, cnns: int) -> None:
    H, C = 4, 24
    layers = _layers(H, cnns, C, convs, torch.float64, seed=1)
    R = window_length(layers) + 3
    x, valid = _inputs(3, H, R, C, torch.float64, seed=2)
    for start in (0, R - 2):
        ref = router_window_logits_ref(x, valid, torch.tensor(start, device=DEVICE), layers)
        torch.testing.assert_close(ref, _conv1d_logits(x, valid, start, layers), rtol=1e-10, atol=1e-10)


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 70),
    H=st.sampled_from([1, 3, 4]),
    C=st.sampled_from([8, 24, 64, 128]),
    # 4, 3, 2 and 1 layers (the kernel's stages), the projection included.
    convs=st.sampled_from([[(3, 2), (3, 2), (3, 2)], [(5, 1), (3, 3)], [(1, 1)], [(3, 1), (3, 1)], []]),
    extra=st.integers(0, 5),
    start=st.integers(0, 40),
    shared=st.booleans(),
    # Triton 3.9's interpreter computes bf16 tl.dot wrongly (tests/ops/test_decode_attention.py): bf16 runs on CUDA.
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference(
    B: int, H: int, C: int, convs: list, extra: int, start: int, shared: bool, dtype: torch.dtype, seed: int
) -> None:
    """Batches that leave a block of rows partly empty, odd channel counts, rings longer than the window with the
    window wrapping, CNNs shared by all heads or one per head."""
    layers = _layers(H, 1 if shared else H, C, convs, dtype, seed)
    R = window_length(layers) + extra
    x, valid = _inputs(B, H, R, C, dtype, seed + 1)
    start_t = torch.tensor(start % R, device=DEVICE)
    got = router_window_logits(x, valid, start_t, layers, backend="triton")
    ref = router_window_logits_ref(x.double(), valid, start_t, [(w.double(), b.double(), d) for w, b, d in layers])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and got.shape == (B, H)
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shared", [False, True])
def test_cuda_bf16_matches_reference(shared: bool) -> None:
    """The 0.4B GDN+LTE shape at batch 64: 16 heads, 128 channels, the default CNN, a ring of 13 slots."""
    layers = _layers(16, 1 if shared else 16, 128, [(3, 2), (3, 2), (3, 2)], torch.bfloat16, seed=3)
    x, valid = _inputs(64, 16, 13, 128, torch.bfloat16, seed=4)
    for start in (0, 7):
        start_t = torch.tensor(start, device=DEVICE)
        got = router_window_logits(x, valid, start_t, layers, backend="triton")
        ref = router_window_logits_ref(x.double(), valid, start_t, [(w.double(), b.double(), d) for w, b, d in layers])
        torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)


def test_rejects_bad_input() -> None:
    layers = _layers(2, 2, 8, [(3, 1)], torch.float32, seed=0)
    x, valid = _inputs(1, 2, 3, 8, torch.float32, seed=0)
    zero = torch.tensor(0, device=DEVICE)
    with pytest.raises(ValueError, match="x must be"):
        router_window_logits(x[0], valid, zero, layers)
    with pytest.raises(ValueError, match="valid must be bool"):
        router_window_logits(x, valid.float(), zero, layers)
    with pytest.raises(ValueError, match="start must be a 0-d int64"):
        router_window_logits(x, valid, zero.view(1), layers)
    with pytest.raises(ValueError, match="layer 0"):
        router_window_logits(x, valid, zero, [(layers[0][0][:, :, :4], layers[0][1], 1), layers[1]])
    with pytest.raises(ValueError, match="layer 1"):  # a bf16 weight with fp32 inputs
        router_window_logits(x, valid, zero, [layers[0], (layers[1][0].bfloat16(), layers[1][1], 1)])
    with pytest.raises(ValueError, match="1 output channel"):
        router_window_logits(x, valid, zero, layers[:1])
    with pytest.raises(ValueError, match="fit the ring"):
        router_window_logits(x[:, :, :2], valid[:, :2], zero, layers)
    with pytest.raises(ValueError, match="at least"):
        router_window_logits(x, valid, zero, [])
    with pytest.raises(ValueError, match="backend"):
        router_window_logits(x, valid, zero, layers, backend="cuda")


def test_deeper_cnn_than_the_kernel_runs_the_reference() -> None:
    """Five layers: backend='triton' refuses them by name; the reference computes them (auto picks it on CUDA)."""
    H, C = 2, 32
    layers = _layers(H, H, C, [(3, 1)] * 4, torch.float32, seed=5)
    x, valid = _inputs(2, H, window_length(layers), C, torch.float32, seed=6)
    zero = torch.tensor(0, device=DEVICE)
    with pytest.raises(ValueError, match="at most 4 layers"):
        router_window_logits(x, valid, zero, layers, backend="triton")
    got = router_window_logits(x, valid, zero, layers)
    torch.testing.assert_close(got, _conv1d_logits(x, valid, 0, layers), rtol=1e-5, atol=1e-5)
