"""decode_attention: the Triton kernel (interpreted on CPU) against the reference, the reference against SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hlsa.ops.decode_attention import decode_attention, decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _valid_mask(B: int, HKV: int, S: int, *, empty_row: bool) -> torch.Tensor:
    """Per-head different valid prefixes with random holes; optionally one (b, head) with no valid slot."""
    lengths = torch.randint(0, S + 1, (B, HKV))
    valid = torch.arange(S)[None, None, :] < lengths[:, :, None]
    valid &= torch.rand(B, HKV, S) < 0.8
    valid[0, -1, : max(1, S // 2)] = True  # at least one head with a long valid run
    if empty_row:
        valid[-1, 0] = False
    return valid.to(DEVICE)


def _inputs(
    B: int, HQ: int, HKV: int, S: int, D: int, dtype: torch.dtype, *, empty_row: bool = True
) -> tuple[torch.Tensor, ...]:
    q = torch.randn(B, HQ, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, HKV, S, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, HKV, S, D, device=DEVICE, dtype=dtype)
    return q, k, v, _valid_mask(B, HKV, S, empty_row=empty_row)


def _ref64(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    return decode_attention_ref(q.double(), k.double(), v.double(), valid=valid, scale=scale)


# (B, HQ, HKV, D, S): GQA ratios 1, 4 and 16, head dims 32/64/128, S not a multiple of the block (16 interpreted).
CASES = [
    (2, 4, 4, 32, 1),
    (2, 4, 4, 64, 7),
    (3, 4, 4, 128, 100),
    (2, 8, 2, 32, 300),
    (2, 8, 2, 64, 7),
    (1, 8, 2, 128, 100),
    (2, 16, 1, 32, 100),
    (2, 16, 1, 64, 1),
    (1, 16, 1, 128, 300),
]


@pytest.mark.parametrize("num_splits", [1, None], ids=["nosplit", "split"])
@pytest.mark.parametrize("B,HQ,HKV,D,S", CASES, ids=[f"B{c[0]}-G{c[1] // c[2]}-D{c[3]}-S{c[4]}" for c in CASES])
def test_triton_matches_reference(B: int, HQ: int, HKV: int, D: int, S: int, num_splits: int | None) -> None:
    from hlsa.ops.triton.decode_attention import decode_attention_triton

    q, k, v, valid = _inputs(B, HQ, HKV, S, D, torch.float32)
    scale = 0.3
    o = decode_attention_triton(q, k, v, valid=valid, scale=scale, num_splits=num_splits)
    ref = _ref64(q, k, v, valid, scale)
    assert o.dtype == q.dtype and o.shape == (B, HQ, D)
    torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=1e-5)
    # Queries of a kv-head with no valid slot are exactly zero.
    G = HQ // HKV
    empty = ~valid.any(dim=-1)  # [B, HKV]
    assert empty.any()
    assert (o.view(B, HKV, G, D)[empty] == 0).all()


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        # Triton 3.9's interpreter computes bf16 tl.dot wrongly (garbage of order 1e9), so bf16 runs on CUDA only.
        pytest.param(
            torch.bfloat16, marks=[pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cpu", reason="interpreter bf16 dot")]
        ),
    ],
    ids=["fp16", "bf16"],
)
def test_triton_half_precision(dtype: torch.dtype) -> None:
    q, k, v, valid = _inputs(2, 8, 2, 70, 64, dtype)
    o = decode_attention(q, k, v, valid=valid, backend="triton")
    ref = _ref64(q, k, v, valid)
    assert o.dtype == dtype
    err = (o.double() - ref).norm() / ref.norm()
    assert err < 1e-2, err


def test_triton_narrow_tiles_match_reference() -> None:
    """The tiles a full GPU takes at D <= 64 (32 slots, unsplit), over a cache whose length is no multiple of 32."""
    from hlsa.ops.triton.decode_attention import decode_attention_triton

    q, k, v, valid = _inputs(3, 8, 4, 77, 64, torch.float32)
    o = decode_attention_triton(q, k, v, valid=valid, scale=0.125, num_splits=1, config=(32, 2, 4))
    torch.testing.assert_close(o.double(), _ref64(q, k, v, valid, 0.125), atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA")
def test_triton_at_the_04b_decode_shape() -> None:
    """The GDN+LTE 0.4B batch-64 step's cache in bf16, with the default tiles and splits (narrow and unsplit on an
    H200: 1024 programs)."""
    q, k, v, valid = _inputs(64, 16, 16, 1281, 64, torch.bfloat16)
    o = decode_attention(q, k, v, valid=valid, backend="triton")
    ref = _ref64(q, k, v, valid)
    assert ((o.double() - ref).norm() / ref.norm()) < 1e-2


def test_launch_heuristics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Narrow unsplit tiles once the programs fill the GPU; splits only below that (the H200's 132 SMs)."""
    from hlsa.ops.triton import decode_attention as kernels

    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    assert kernels._pick_config(64, torch.bfloat16, 64 * 16, 132) == (32, 2, 4)
    assert kernels._pick_config(64, torch.bfloat16, 16 * 16, 132) == (128, 4, 2)
    assert kernels._pick_config(64, torch.float32, 64 * 16, 132) == (64, 4, 2)
    assert kernels._pick_config(128, torch.bfloat16, 64 * 16, 132) == (64, 4, 3)
    assert kernels._resident((32, 2, 4), 64, 2, 132) == 6 * 132
    assert kernels._pick_num_splits(64 * 16, 41, 6 * 132) == 1
    assert kernels._pick_num_splits(128 * 4, 11, 3 * 132) == 1
    assert kernels._pick_num_splits(16, 11, 3 * 132) > 1
    # The Transformer's 64K cache at B=16 (256 programs, 512 blocks, 396 places): 4 splits (962 us on the H200), not
    # the 3 that a wave count over non-powers of two picks (1,107 us).
    assert kernels._pick_num_splits(16 * 16, 512, 3 * 132) == 4
    for n_programs, n_blocks in [(1, 1024), (16, 32), (16, 513), (64, 11), (256, 11), (4, 3)]:
        ns = kernels._pick_num_splits(n_programs, n_blocks, 3 * 132)
        assert ns == n_blocks or ns & (ns - 1) == 0, (n_programs, n_blocks, ns)


def test_triton_public_api_and_strided_cache() -> None:
    """A cache view with a longer physical S (non-contiguous) and the default split heuristic."""
    B, HQ, HKV, D, S = 2, 8, 2, 64, 45
    q, k_big, v_big, _ = _inputs(B, HQ, HKV, S + 19, D, torch.float32)
    k, v = k_big[:, :, :S], v_big[:, :, :S]
    valid = _valid_mask(B, HKV, S, empty_row=False)
    o = decode_attention(q, k, v, valid=valid, backend="triton")
    torch.testing.assert_close(o.double(), _ref64(q, k, v, valid), atol=2e-5, rtol=1e-5)


def test_reference_matches_sdpa() -> None:
    """The reference against PyTorch's attention with a boolean mask (rows with at least one valid slot)."""
    B, HQ, HKV, D, S = 3, 8, 2, 32, 50
    q, k, v, valid = _inputs(B, HQ, HKV, S, D, torch.float64, empty_row=False)
    valid[:, :, 0] = True
    o = decode_attention(q, k, v, valid=valid, scale=0.2, backend="torch")
    G = HQ // HKV
    mask = valid.repeat_interleave(G, dim=1)[:, :, None, :]  # [B, HQ, 1, S]
    k_rep, v_rep = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    expected = F.scaled_dot_product_attention(q[:, :, None], k_rep, v_rep, attn_mask=mask, scale=0.2)[:, :, 0]
    torch.testing.assert_close(o, expected)


def test_reference_empty_row_is_zero() -> None:
    q, k, v, _ = _inputs(1, 4, 2, 5, 8, torch.float32)
    valid = torch.zeros(1, 2, 5, dtype=torch.bool, device=DEVICE)
    valid[0, 1, 2] = True
    o = decode_attention_ref(q, k, v, valid=valid)
    assert (o[0, :2] == 0).all()
    torch.testing.assert_close(o[0, 2:], v[0, 1, 2].expand(2, 8))


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("valid", {"valid_shape": (2, 2, 9)}),
        ("valid", {"valid_dtype": torch.uint8}),
        ("HQ divisible", {"hq": 6, "hkv": 4}),
        ("dtype", {"k_dtype": torch.float64}),
        ("backend", {"backend": "cuda"}),
    ],
)
def test_bad_input_raises(field: str, kwargs: dict) -> None:
    hq, hkv = kwargs.get("hq", 4), kwargs.get("hkv", 2)
    q = torch.randn(2, hq, 8)
    k = torch.randn(2, hkv, 10, 8, dtype=kwargs.get("k_dtype", torch.float32))
    valid = torch.ones(kwargs.get("valid_shape", (2, hkv, 10)), dtype=kwargs.get("valid_dtype", torch.bool))
    with pytest.raises(ValueError, match=field):
        decode_attention(q, k, k, valid=valid, backend=kwargs.get("backend", "torch"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_cache_or_batch_raises(backend: str) -> None:
    """No slots or no rows: a clear error on both paths (the reference's softmax and the kernel's launch differ)."""
    for B, S in [(2, 0), (0, 10)]:
        q, k = torch.randn(B, 4, 8), torch.randn(B, 2, S, 8)
        with pytest.raises(ValueError, match="empty input"):
            decode_attention(q, k, k, valid=torch.ones(B, 2, S, dtype=torch.bool), backend=backend)


def test_return_weights_are_each_groups_softmax_summed_over_its_query_heads() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen), torch.randn(2, 2, 5, 8)
    valid = torch.rand(2, 2, 5, generator=gen) > 0.3
    valid[0, 1] = False  # a kv head with no valid slot: no weight anywhere
    o, weights = decode_attention(q, k, v, valid=valid, return_weights=True)
    torch.testing.assert_close(o, decode_attention(q, k, v, valid=valid, backend="torch"))
    for b in range(2):
        for h in range(2):
            want = torch.zeros(5)
            for g in (2 * h, 2 * h + 1):
                slots = valid[b, h].nonzero().flatten()
                if len(slots):
                    want[slots] += torch.softmax(k[b, h, slots] @ q[b, g] / 8**0.5, dim=0)
            torch.testing.assert_close(weights[b, h], want)


@pytest.mark.parametrize("num_splits", [1, None], ids=["nosplit", "split"])
@pytest.mark.parametrize(
    "B,HQ,HKV,D,S", CASES[::2], ids=[f"B{c[0]}-G{c[1] // c[2]}-D{c[3]}-S{c[4]}" for c in CASES[::2]]
)
def test_triton_weights_match_the_reference(B: int, HQ: int, HKV: int, D: int, S: int, num_splits: int | None) -> None:
    """The weights the Triton path returns (logits and log-sum-exp from the kernels) against the reference's."""
    from hlsa.ops.triton.decode_attention import decode_attention_triton

    q, k, v, valid = _inputs(B, HQ, HKV, S, D, torch.float32)
    o, weights = decode_attention_triton(q, k, v, valid=valid, scale=0.3, num_splits=num_splits, return_weights=True)
    ref_o, ref_weights = decode_attention_ref(q, k, v, valid=valid, scale=0.3, return_weights=True)
    torch.testing.assert_close(o, ref_o, atol=2e-5, rtol=1e-5)
    assert weights.shape == (B, HKV, S) and weights.dtype == torch.float32
    torch.testing.assert_close(weights, ref_weights, atol=2e-5, rtol=1e-5)
    assert (weights[~valid] == 0).all()
