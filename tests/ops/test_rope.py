"""RoPE: the shared math against the complex-number rotation, and the decode kernels that rotate their new token
in-kernel (decode_attention's query, lte_evict's key; interpreted on CPU) against their references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hlsa.ops.decode_attention import decode_attention, decode_attention_ref
from hlsa.ops.lte_evict import lte_evict, lte_evict_ref
from hlsa.ops.rope import rope_cos_sin, rope_inv_freq, rope_rotate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Decode positions from the first token to past a 128K context.
POSITIONS = st.sampled_from([0, 1, 767, 4097, 131_071]) | st.integers(0, 2**20)


def test_rotation_is_the_complex_product() -> None:
    """Channel pair (i, i + dim/2) as the complex number x_i + 1j x_(i+dim/2), times exp(1j * position * f_i)."""
    D, dim = 10, 8
    x = torch.randn(3, 5, D, dtype=torch.float64)
    positions = torch.tensor([0, 3, 17, 1000, 123_456])
    freq = rope_inv_freq(dim, 500.0).double()
    cos, sin = rope_cos_sin(positions, freq, dtype=torch.float64)
    got = rope_rotate(x, cos, sin)
    z = torch.complex(x[..., : dim // 2], x[..., dim // 2 : dim]) * torch.exp(1j * positions[:, None] * freq)
    torch.testing.assert_close(got[..., : dim // 2], z.real)
    torch.testing.assert_close(got[..., dim // 2 : dim], z.imag)
    assert torch.equal(got[..., dim:], x[..., dim:])  # channels beyond `dim` pass through
    assert freq[0] == 1.0 and torch.isclose(freq[-1], torch.tensor(500.0 ** (-(dim - 2) / dim), dtype=freq.dtype))


@settings(max_examples=6, deadline=None)
@given(position=POSITIONS, case=st.sampled_from([(2, 4, 4, 32, 37), (1, 8, 2, 64, 100), (2, 6, 3, 16, 5)]))
def test_decode_attention_rotates_q_in_kernel(position: int, case: tuple[int, ...]) -> None:
    B, HQ, HKV, D, S = case
    q = torch.randn(B, HQ, D, device=DEVICE)
    k, v = torch.randn(2, B, HKV, S, D, device=DEVICE).unbind(0)
    valid = torch.rand(B, HKV, S, device=DEVICE) < 0.7
    rope = {"rope_inv_freq": rope_inv_freq(D, 10000.0, DEVICE), "rope_position": torch.tensor(position, device=DEVICE)}
    got = decode_attention(q, k, v, valid=valid, backend="triton", **rope)
    want = decode_attention_ref(q, k, v, valid=valid, **rope)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    unrotated = decode_attention_ref(q, k, v, valid=valid)
    assert position == 0 or not torch.allclose(want, unrotated)  # the rotation is not a no-op


@settings(max_examples=6, deadline=None)
@given(position=POSITIONS, N=st.sampled_from([0, 3]))
def test_lte_evict_rotates_the_new_key_in_kernel(position: int, N: int) -> None:
    B, HKV, D, ring = 2, 3, 8, 5
    S = ring + N
    cache = (
        torch.randn(B, HKV, S, D, device=DEVICE),
        torch.randn(B, HKV, S, D, device=DEVICE),
        torch.rand(B, HKV, S, device=DEVICE) - 0.3,
        torch.rand(B, HKV, S, device=DEVICE) < 0.8,
        torch.randint(0, N + 1, (B, HKV), device=DEVICE, dtype=torch.int32),
        torch.randint(0, max(1, position), (B, HKV, S), device=DEVICE, dtype=torch.int32),
    )
    k_new, v_new = torch.randn(2, B, HKV, D, device=DEVICE).unbind(0)
    args = {
        "position": torch.tensor(position, device=DEVICE),
        "k_new": k_new,
        "v_new": v_new,
        "ring_size": ring,
        "rope_inv_freq": rope_inv_freq(D, 10000.0, DEVICE),
    }
    ref, tri = [t.clone() for t in cache], [t.clone() for t in cache]
    lte_evict_ref(*ref, **args)
    lte_evict(*tri, backend="triton", **args)
    torch.testing.assert_close(tri[0], ref[0], atol=1e-6, rtol=1e-6)  # keys: cos/sin of two libraries
    for a, b in zip(tri[1:], ref[1:]):
        assert torch.equal(a, b)
    slot = position % ring
    assert position == 0 or not torch.allclose(ref[0][:, :, slot], k_new)  # the stored key is rotated


def test_bad_rope_arguments_are_named() -> None:
    q, k = torch.randn(1, 2, 8), torch.randn(1, 2, 3, 8)
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    position = torch.tensor(5)
    with pytest.raises(ValueError, match=r"rope_inv_freq must be float32 \[D / 2\] = \[4\]"):
        decode_attention(q, k, k, valid=valid, rope_inv_freq=torch.ones(3), rope_position=position)
    with pytest.raises(ValueError, match="together"):
        decode_attention(q, k, k, valid=valid, rope_inv_freq=torch.ones(4))
    with pytest.raises(ValueError, match="0-d int64"):
        decode_attention(q, k, k, valid=valid, rope_inv_freq=torch.ones(4), rope_position=position.int())
