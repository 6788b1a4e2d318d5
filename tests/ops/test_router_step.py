"""router_step_logits: streaming a sequence through the op, token by token, gives the logits of the router CNN run
over the whole sequence with `F.conv1d` ('same' padding, masked), for both backends (Triton interpreted on CPU), on
awkward shapes: rings longer than the window, left pads inside the window, prompts shorter than the margin, CNNs
shared by all heads or one per head, and garbage wherever the ring is not valid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hlsa.ops.router_step import reach, ring_channels, router_step_logits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _exact_fp32_convs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The full-forward references run `F.conv1d`, which cuDNN computes in TF32 from fp32 inputs (~1e-3 error), far
    above the fp32 kernel's error that these tests bound."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _layers(cnns: int, C: int, convs: list[tuple[int, int]], dtype: torch.dtype, seed: int) -> list:
    """Tap-major weights `[cnns, k, C_in, C_out]` halving the channels per conv, then a 1 x 1 projection to one."""
    g = torch.Generator().manual_seed(seed)
    layers, c_in = [], C
    for i, (k, d) in enumerate([*convs, (1, 1)]):
        c_out = max(1, c_in // 2) if i < len(convs) else 1
        w = torch.randn(cnns, k, c_in, c_out, generator=g) / (k * c_in) ** 0.5
        b = torch.randn(cnns, c_out, generator=g) * 0.5
        layers.append((w.to(DEVICE, dtype), b.to(DEVICE, dtype), d))
        c_in = c_out
    return layers


def _full_forward(x: torch.Tensor, real: torch.Tensor, layers: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The router CNN over whole sequences, per head with `F.conv1d` in PyTorch's `[O, C, k]` layout:
    `x [B, T, H, C]`, `real [B, T]` -> logits `[B, T, H]` and every conv's input `[B, T, H, C_i]`."""
    B, T, H, _ = x.shape
    keep = real[:, None, :].to(x.dtype)  # [B, 1, T]
    logits, inputs = [], [[] for _ in layers[:-1]]
    for h in range(H):
        y = x[:, :, h].transpose(1, 2) * keep  # [B, C, T]
        for i, (w, b, d) in enumerate(layers):
            cnn = h // (H // w.shape[0])
            if i < len(layers) - 1:
                inputs[i].append(y.transpose(1, 2))
            y = F.conv1d(y, w[cnn].permute(2, 1, 0), b[cnn], dilation=d, padding=reach((w, b, d)))
            if i < len(layers) - 1:
                y = F.silu(y * keep)
        logits.append(y[:, 0])
    return torch.stack(logits, -1), [torch.stack(per_head, 2) for per_head in inputs]


def _prompt_ring(
    x: torch.Tensor, real: torch.Tensor, layers: list, R: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring after a prompt `x [B, P, H, C]`: the last R positions of every conv's input as the prompt's own
    forward gives them (the newest still lacking right context: a decode step recomputes them before reading),
    garbage in slots never written; validity False there and at pads.

    Both are views into buffers one slot wider on each side, holding garbage marked valid: a slot computed out of
    range (a negative position taken modulo R the wrong way) reads it and shows."""
    B, P, H, C = x.shape
    wide = torch.randn(B, H, R + 2, sum(ring_channels(layers)), generator=g).to(x.device, x.dtype) * 100
    wide_valid = torch.ones(B, R + 2, dtype=torch.bool, device=x.device)
    ring, valid = wide[:, :, 1 : R + 1], wide_valid[:, 1 : R + 1]
    valid.zero_()
    keep = torch.arange(max(0, P - R), P, device=x.device)
    if P > 0:
        _, inputs = _full_forward(x, real, layers)
        ring[:, :, keep % R] = torch.cat(inputs, dim=-1)[:, keep].transpose(1, 2)
        valid[:, keep % R] = real[:, keep]
    return ring, valid


def _stream(
    layers: list, B: int, H: int, P: int, T: int, R: int, pads: list[int], dtype: torch.dtype, backend: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt of P tokens (row i left-padded by pads[i]), then T decode tokens through the op. Returns the streamed
    logits `[B, T, H]` (step s scores token P + s - m), the full forward's `[B, P + T, H]` and its `real [B, P+T]`."""
    g = torch.Generator().manual_seed(seed)
    C = layers[0][0].shape[2]
    x = torch.randn(B, P + T, H, C, generator=g).to(DEVICE, dtype)
    real = torch.ones(B, P + T, dtype=torch.bool, device=DEVICE)
    for row, n in enumerate(pads):
        real[row, :n] = False
    x = torch.where(real[:, :, None, None], x, 100 * x)  # garbage at the pads: must be ignored
    ring, valid = _prompt_ring(x[:, :P], real[:, :P], layers, R, g)
    full, _ = _full_forward(x, real, layers)
    steps = [
        router_step_logits(x[:, p], ring, valid, torch.tensor(p, device=DEVICE), layers, backend=backend)
        for p in range(P, P + T)
    ]
    return torch.stack(steps, 1), full, real


CONVS = {
    "default": [(3, 2), (3, 2), (3, 2)],
    "mixed": [(5, 1), (3, 3)],
    "uneven": [(5, 1), (3, 3), (7, 1)],  # three convs that differ in taps and dilation: no slot mix-up can hide
    "pointwise_inside": [(3, 1), (1, 1), (5, 2)],
    "pointwise_first": [(1, 1), (3, 2)],  # the first conv's output is the new token's own
    "one": [(3, 1)],
    "pointwise": [(1, 1)],
}


@pytest.mark.parametrize("backend", ["torch", "triton"])  # "triton" runs interpreted on CPU (tests/conftest.py)
@pytest.mark.parametrize("convs", list(CONVS))
@pytest.mark.parametrize("cnns", [1, 3])
@pytest.mark.parametrize("P", [0, 4, 20])
def test_streaming_matches_full_forward(backend: str, convs: str, cnns: int, P: int) -> None:
    """Row 0 unpadded, row 1 padded into the window, row 2 with pads only the prompt's start; P < m starts the
    decode with the window reaching before the sequence; P = 0 decodes from an empty ring."""
    H, C, T = 3, 16, 17
    layers = _layers(cnns, C, CONVS[convs], torch.float64 if backend == "torch" else torch.float32, seed=P + cnns)
    m = sum(reach(layer) for layer in layers)
    R = 2 * m + 3
    pads = [0, min(P, 3), max(0, P - 15)]
    got, full, real = _stream(layers, 3, H, P, T, R, pads, layers[0][0].dtype, backend, seed=7)
    scored = torch.arange(P, P + T) - m  # the token each step scores
    ok = scored >= 0
    want = full[:, scored[ok]]
    mask = real[:, scored[ok], None].expand_as(want)  # a pad's logit is meaningless (its score is masked)
    tol = 1e-10 if backend == "torch" else 1e-5
    torch.testing.assert_close(got[:, ok][mask], want[mask], rtol=tol, atol=tol)


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 40),
    H=st.sampled_from([1, 2, 4]),
    C=st.sampled_from([8, 24, 64]),
    convs=st.sampled_from(list(CONVS.values())),
    extra=st.integers(0, 5),
    P=st.integers(0, 30),
    shared=st.booleans(),
    # Triton 3.9's interpreter computes bf16 tl.dot wrongly (tests/ops/test_decode_attention.py): bf16 runs on CUDA.
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference(
    B: int, H: int, C: int, convs: list, extra: int, P: int, shared: bool, dtype: torch.dtype, seed: int
) -> None:
    """Batches that leave a block of rows partly empty, odd channel counts, long rings; logits, rings and validity
    after a few steps agree."""
    layers = _layers(1 if shared else H, C, convs, dtype, seed)
    R = 2 * sum(reach(layer) for layer in layers) + 1 + extra
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, P + 3, H, C, generator=g).to(DEVICE, dtype)
    real = torch.rand(B, P + 3, generator=g).to(DEVICE) < 0.8
    real[:, P:] = True
    ring, valid = _prompt_ring(x[:, :P], real[:, :P], layers, R, g)
    ring_ref, valid_ref = ring.clone(), valid.clone()
    for p in range(P, P + 3):
        pos = torch.tensor(p, device=DEVICE)
        got = router_step_logits(x[:, p], ring, valid, pos, layers, backend="triton")
        ref = router_step_logits(x[:, p], ring_ref, valid_ref, pos, layers, backend="torch")
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert got.dtype == dtype and got.shape == (B, H)
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert torch.equal(valid, valid_ref)
    live = valid[:, None, :, None].expand_as(ring)  # slots never written hold garbage, identical in both
    torch.testing.assert_close(ring[live], ring_ref[live], rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shared", [False, True])
def test_cuda_bf16_matches_full_forward(shared: bool) -> None:
    """The 0.4B GDN+LTE shape at batch 64: 16 heads, 128 channels, the default CNN, a ring of 13 slots."""
    layers = _layers(1 if shared else 16, 128, CONVS["default"], torch.bfloat16, seed=3)
    got, full, real = _stream(layers, 64, 16, 20, 8, 13, [0] * 32 + [3] * 32, torch.bfloat16, "triton", seed=4)
    ref, _, _ = _stream([(w.double(), b.double(), d) for w, b, d in layers], 64, 16, 20, 8, 13, [0] * 32 + [3] * 32,
                        torch.float64, "torch", seed=4)  # fmt: skip
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)


def test_rejects_bad_input() -> None:
    layers = _layers(2, 8, [(3, 1)], torch.float32, seed=0)
    kv = torch.randn(1, 2, 8, device=DEVICE)
    x, valid = torch.zeros(1, 2, 3, 8, device=DEVICE), torch.zeros(1, 3, dtype=torch.bool, device=DEVICE)
    pos = torch.tensor(0, device=DEVICE)
    with pytest.raises(ValueError, match="kv must be float"):
        router_step_logits(kv[0], x, valid, pos, layers)
    with pytest.raises(ValueError, match="layer 0"):
        router_step_logits(kv[..., :6], x, valid, pos, layers)
    with pytest.raises(ValueError, match="x must be"):
        router_step_logits(kv, x[..., :5], valid, pos, layers)
    with pytest.raises(ValueError, match="valid must be bool"):
        router_step_logits(kv, x, valid.float(), pos, layers)
    with pytest.raises(ValueError, match="position must be a 0-d int64"):
        router_step_logits(kv, x, valid, pos.view(1), layers)
    with pytest.raises(ValueError, match="layer 0"):
        router_step_logits(kv, x, valid, pos, [(layers[0][0][:, :2], layers[0][1], 1), layers[1]])
    with pytest.raises(ValueError, match="layer 1's weight"):
        router_step_logits(kv, x, valid, pos, [layers[0], (layers[1][0].double(), layers[1][1].double(), 1)])
    with pytest.raises(ValueError, match="logit projection"):
        router_step_logits(kv, x, valid, pos, [layers[0], (layers[1][0].repeat(1, 3, 1, 1), layers[1][1], 1)])
    with pytest.raises(ValueError, match="same number of CNNs"):  # a shared conv before a per-head projection
        router_step_logits(kv, x, valid, pos, [(layers[0][0][:1], layers[0][1][:1], 1), layers[1]])
    with pytest.raises(ValueError, match="at least one conv"):
        router_step_logits(kv, x, valid, pos, layers[1:])
    with pytest.raises(ValueError, match="the ring"):
        router_step_logits(kv, x[:, :, :2], valid[:, :2], pos, layers)
    with pytest.raises(ValueError, match="backend"):
        router_step_logits(kv, x, valid, pos, layers, backend="cuda")
    with pytest.raises(ValueError, match="no gradient"):
        router_step_logits(kv.requires_grad_(), x, valid, pos, layers)


def test_deeper_cnn_than_the_kernel_runs_the_reference() -> None:
    """Four convs: backend='triton' refuses them by name; the reference computes them (auto picks it on CUDA)."""
    layers = _layers(2, 32, [(3, 1)] * 4, torch.float64, seed=5)
    with pytest.raises(ValueError, match="at most 3 convs"):
        _stream(layers, 2, 2, 0, 1, 9, [0, 0], torch.float64, "triton", seed=6)
    got, full, _ = _stream(layers, 2, 2, 5, 6, 9, [0, 0], torch.float64, None, seed=6)
    torch.testing.assert_close(got, full[:, 1:7], rtol=1e-10, atol=1e-10)  # step s scores token 1 + s
