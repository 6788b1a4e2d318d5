"""NSA op: the reference against a per-query loop oracle, gradients, the decode reference against the whole-sequence
reference, and the Triton decode kernel (interpreted on CPU) against the decode reference."""

from __future__ import annotations

import pytest
import torch

from hlsa.ops.nsa import nsa, nsa_decode, nsa_ref


def _attend(qv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """qv [D], keys/values [n, D] -> [D]; zeros when n == 0."""
    if keys.shape[0] == 0:
        return torch.zeros_like(qv)
    return torch.softmax(keys @ qv * scale, dim=0) @ values


def _oracle(q, k, v, gates, key_mask, *, BS, S, W, scale):
    """Per-query loops straight from docs/nsa.md: pool, score, force {0, IC-1, IC}, rank (ties: later block), attend."""
    B, T, HQ, _ = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    out = torch.zeros_like(q)
    for b in range(B):
        s0 = 0 if key_mask is None else T - int(key_mask[b].sum())
        kr, vr = k[b, s0:], v[b, s0:]
        kc = [kr[c * BS : (c + 1) * BS].mean(0) for c in range((T - s0) // BS)]
        vc = [vr[c * BS : (c + 1) * BS].mean(0) for c in range((T - s0) // BS)]
        for t in range(T - s0):
            nvis, ic = (t + 1) // BS, t // BS
            for h in range(HKV):
                imp = [0.0] * (ic + 1)
                o_cmp = {}
                for hq in range(h * G, (h + 1) * G):
                    qv = q[b, s0 + t, hq]
                    if nvis:
                        p = torch.softmax(torch.stack([kc[c][h] for c in range(nvis)]) @ qv * scale, dim=0)
                        for c in range(ic):
                            imp[c] += float(p[c])
                    kcs = torch.stack([kc[c][h] for c in range(nvis)]) if nvis else kr[:0, h]
                    vcs = torch.stack([vc[c][h] for c in range(nvis)]) if nvis else vr[:0, h]
                    o_cmp[hq] = _attend(qv, kcs, vcs, scale)
                for c in {0, ic - 1, ic} - {-1}:
                    imp[c] = float("inf")
                chosen = sorted(range(ic + 1), key=lambda c: (imp[c], c), reverse=True)[:S]
                slc = [j for j in range(t + 1) if j // BS in chosen]
                swa = list(range(max(0, t - W), t + 1))
                for hq in range(h * G, (h + 1) * G):
                    qv = q[b, s0 + t, hq]
                    o_slc = _attend(qv, kr[slc, h], vr[slc, h], scale)
                    o_swa = _attend(qv, kr[swa, h], vr[swa, h], scale)
                    g = [x[b, s0 + t, hq] for x in gates]
                    out[b, s0 + t, hq] = g[0] * o_cmp[hq] + g[1] * o_slc + g[2] * o_swa
    return out


def _inputs(B, T, HQ, HKV, D, *, pads=(), dtype=torch.float32):
    q, k, v = (
        torch.randn(B, T, HQ, D, dtype=dtype),
        torch.randn(B, T, HKV, D, dtype=dtype),
        torch.randn(B, T, HKV, D, dtype=dtype),
    )
    gates = tuple(torch.rand(B, T, HQ, dtype=dtype) for _ in range(3))
    mask = None
    if pads:
        mask = torch.ones(B, T, dtype=torch.bool)
        for b, p in enumerate(pads):
            mask[b, :p] = False
    return q, k, v, gates, mask


CASES = [  # (B, T, HQ, HKV, D, BS, S, W, pads)
    pytest.param(1, 3, 2, 1, 8, 4, 16, 2, (), id="shorter-than-a-block"),
    pytest.param(2, 13, 4, 2, 8, 4, 1, 3, (0, 5), id="S1-gqa-leftpad"),
    pytest.param(2, 17, 6, 2, 6, 3, 2, 0, (2, 0), id="S2-G3-W0-odd-block"),
    pytest.param(1, 22, 4, 1, 8, 4, 16, 5, (), id="S16-all-blocks"),
    pytest.param(2, 23, 2, 2, 4, 2, 3, 4, (7, 1), id="S3-mha-many-blocks"),
]


@pytest.mark.parametrize("B,T,HQ,HKV,D,BS,S,W,pads", CASES)
def test_reference_matches_loop_oracle(B, T, HQ, HKV, D, BS, S, W, pads):
    q, k, v, gates, mask = _inputs(B, T, HQ, HKV, D, pads=pads, dtype=torch.float64)
    got = nsa_ref(q, k, v, *gates, block_size=BS, block_counts=S, window=W, key_mask=mask)
    want = _oracle(q, k, v, gates, mask, BS=BS, S=S, W=W, scale=D**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reference_gradients():
    q, k, v, gates, mask = _inputs(2, 11, 4, 2, 4, pads=(0, 3), dtype=torch.float64)
    args = [x.requires_grad_() for x in (q, k, v, *gates)]

    def f(*xs):
        return nsa_ref(*xs, block_size=3, block_counts=2, window=2, key_mask=mask)

    # fast_mode checks random directional derivatives (the full Jacobian would take minutes).
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, fast_mode=True)


def _decode_inputs(q, k, v, gates, mask, BS, cap=5):
    """Cache layout of the layer: head-major, slot = position, compressed slot c pools start + c*BS...; `cap` unused
    slots (random) after the T used ones, and compressed slots for every block of the cache."""
    B, T = q.shape[:2]
    start = torch.zeros(B, dtype=torch.int32) if mask is None else (T - mask.sum(1)).to(torch.int32)
    kc, vc = (torch.cat([x.transpose(1, 2), torch.randn(B, x.shape[2], cap, x.shape[3])], 2) for x in (k, v))
    nc = (T + cap) // BS + 1
    k_cmp, v_cmp = torch.randn(B, k.shape[2], nc, k.shape[3]), torch.randn(B, k.shape[2], nc, k.shape[3])
    for b in range(B):
        s0 = int(start[b])
        n = (T - s0) // BS
        k_cmp[b, :, :n] = kc[b, :, s0 : s0 + n * BS].unflatten(1, (n, BS)).mean(2)
        v_cmp[b, :, :n] = vc[b, :, s0 : s0 + n * BS].unflatten(1, (n, BS)).mean(2)
    return q[:, -1], kc, vc, k_cmp, v_cmp, tuple(g[:, -1] for g in gates), start


@pytest.mark.parametrize("B,T,HQ,HKV,D,BS,S,W,pads", CASES)
def test_decode_reference_matches_last_query(B, T, HQ, HKV, D, BS, S, W, pads):
    q, k, v, gates, mask = _inputs(B, T, HQ, HKV, D, pads=pads)
    full = nsa_ref(q, k, v, *gates, block_size=BS, block_counts=S, window=W, key_mask=mask)[:, -1]
    qd, kc, vc, k_cmp, v_cmp, gd, start = _decode_inputs(q, k, v, gates, mask, BS)
    got = nsa_decode(qd, kc, vc, k_cmp, v_cmp, *gd, start=start, seq_len=T, block_size=BS, block_counts=S, window=W)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "B,T,HQ,HKV,D,BS,S,W,pads",
    [
        *CASES[1:4],
        pytest.param(2, 40, 4, 2, 24, 5, 3, 7, (0, 33), id="D24-BS5-one-real-token"),
        pytest.param(1, 9, 2, 1, 16, 4, 2, 1, (9,), id="row-of-pads-only"),
    ],
)
def test_triton_decode_matches_reference(B, T, HQ, HKV, D, BS, S, W, pads):
    q, k, v, gates, mask = _inputs(B, T, HQ, HKV, D, pads=pads)
    args = _decode_inputs(q, k, v, gates, mask, BS)
    qd, kc, vc, k_cmp, v_cmp, gd, start = args
    kw = dict(start=start, seq_len=T, block_size=BS, block_counts=S, window=W)
    want = nsa_decode(qd, kc, vc, k_cmp, v_cmp, *gd, **kw, backend="torch")
    got = nsa_decode(qd, kc, vc, k_cmp, v_cmp, *gd, **kw, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triton_decode_reads_a_strided_start() -> None:
    """`start` as a column view of a wider tensor: the kernel must read row b's start, not the b-th element."""
    q, k, v, gates, mask = _inputs(2, 21, 4, 2, 16, pads=(3, 9))
    qd, kc, vc, k_cmp, v_cmp, gd, start = _decode_inputs(q, k, v, gates, mask, 4)
    strided = torch.stack([start, torch.full_like(start, 7)], dim=1)[:, 0]
    assert strided.stride() == (2,)
    kw = dict(seq_len=21, block_size=4, block_counts=3, window=5)
    want = nsa_decode(qd, kc, vc, k_cmp, v_cmp, *gd, start=start, **kw, backend="torch")
    got = nsa_decode(qd, kc, vc, k_cmp, v_cmp, *gd, start=strided, **kw, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_checks_the_compressed_caches(backend: str) -> None:
    q, k, v, gates, _ = _inputs(1, 12, 2, 1, 8)
    qd, kc, vc, k_cmp, v_cmp, gd, start = _decode_inputs(q, k, v, gates, None, 4)
    kw = dict(start=start, seq_len=12, block_size=4, block_counts=2, window=2, backend=backend)
    with pytest.raises(ValueError, match="NC >= seq_len // block_size = 3"):  # 2 slots for 3 complete blocks
        nsa_decode(qd, kc, vc, k_cmp[:, :, :2], v_cmp[:, :, :2], *gd, **kw)
    with pytest.raises(ValueError, match="D=8"):
        nsa_decode(qd, kc, vc, k_cmp[..., :4], v_cmp[..., :4], *gd, **kw)
    with pytest.raises(ValueError, match="dtype"):
        nsa_decode(qd, kc, vc, k_cmp.double(), v_cmp.double(), *gd, **kw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_takes_seq_len_as_a_device_tensor(backend: str) -> None:
    """`seq_len` as an int32/int64 [] tensor gives what the int gives, in a cache of many more slots than used (the
    Triton kernel sizes its candidate keys by the cache, 128 here, not by seq_len) with left-padded rows, one of them
    holding a single real token."""
    q, k, v, gates, mask = _inputs(3, 22, 4, 2, 16, pads=(0, 5, 21))
    qd, kc, vc, k_cmp, v_cmp, gd, start = _decode_inputs(q, k, v, gates, mask, 4, cap=490)
    kw = dict(start=start, block_size=4, block_counts=3, window=5)
    want = nsa_decode(qd, kc, vc, k_cmp, v_cmp, *gd, seq_len=22, **kw, backend="torch")
    assert want.abs().amax(dim=(1, 2)).min() > 0  # every row has a real token: none is trivially zero
    for dtype in (torch.int64, torch.int32):
        seq_len = torch.tensor(22, dtype=dtype)
        got = nsa_decode(qd, kc, vc, k_cmp, v_cmp, *gd, seq_len=seq_len, **kw, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        from_int = nsa_decode(qd, kc, vc, k_cmp, v_cmp, *gd, seq_len=22, **kw, backend=backend)
        assert torch.equal(got, from_int)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_checks_a_tensor_seq_len(backend: str) -> None:
    """A tensor seq_len is checked without reading it: its dtype and shape, and compressed caches that hold the blocks
    of any seq_len up to N (an int seq_len needs only its own blocks)."""
    q, k, v, gates, _ = _inputs(1, 12, 2, 1, 8)
    qd, kc, vc, k_cmp, v_cmp, gd, start = _decode_inputs(q, k, v, gates, None, 4, cap=20)  # N = 32
    kw = dict(start=start, block_size=4, block_counts=2, window=2, backend=backend)
    for bad in (torch.tensor(12.0), torch.tensor([12]), torch.tensor(12, dtype=torch.int16)):
        with pytest.raises(ValueError, match="a tensor seq_len must be int32 or int64"):
            nsa_decode(qd, kc, vc, k_cmp, v_cmp, *gd, seq_len=bad, **kw)
    enough_for_12 = (k_cmp[:, :, :3], v_cmp[:, :, :3])
    nsa_decode(qd, kc, vc, *enough_for_12, *gd, seq_len=12, **kw)
    with pytest.raises(ValueError, match="NC >= N // block_size = 8"):
        nsa_decode(qd, kc, vc, *enough_for_12, *gd, seq_len=torch.tensor(12), **kw)


def test_bad_inputs_raise():
    q, k, v, gates, _ = _inputs(1, 8, 2, 1, 4)
    right_pad = torch.tensor([[True] * 6 + [False] * 2])
    with pytest.raises(ValueError, match="left padding"):
        nsa_ref(q, k, v, *gates, block_size=4, block_counts=2, window=2, key_mask=right_pad)
    with pytest.raises(ValueError, match="window"):
        nsa_ref(q, k, v, *gates, block_size=4, block_counts=2, window=-1)
    with pytest.raises(ValueError, match="g_slc"):
        nsa_ref(q, k, v, gates[0], gates[1][:, :3], gates[2], block_size=4, block_counts=2, window=2)
    with pytest.raises(ValueError, match="backend"):
        nsa(q, k, v, *gates, block_size=4, block_counts=2, window=2, backend="fla")
    with pytest.raises(ValueError, match="seq_len"):
        nsa_decode(q[:, 0], k.transpose(1, 2), v.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                   *(g[:, 0] for g in gates), start=torch.zeros(1, dtype=torch.int32), seq_len=9,
                   block_size=4, block_counts=2, window=2)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and fla-core")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
def test_fla_training_path_matches_reference(dtype, tol):
    pytest.importorskip("fla")
    q, k, v, gates, mask = _inputs(2, 300, 32, 2, 64, pads=(0, 45))
    q, k, v, mask = q.cuda(), k.cuda(), v.cuda(), mask.cuda()
    gates = tuple(g.cuda() for g in gates)
    kw = dict(block_size=32, block_counts=4, window=40, key_mask=mask)
    xs = [x.to(dtype).requires_grad_() for x in (q, k, v, *gates)]
    ys = [x.detach().float().requires_grad_() for x in xs]
    out, ref = nsa(*xs, **kw, backend="fla"), nsa(*ys, **kw, backend="torch")
    do = torch.randn_like(ref)
    (out.float() * do).sum().backward()
    (ref * do).sum().backward()
    for a, b in [(out.float(), ref), *((x.grad.float(), y.grad) for x, y in zip(xs, ys))]:
        assert ((a - b).norm() / b.norm()).item() < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_decode_on_gpu(dtype, tol):
    q, k, v, gates, mask = _inputs(3, 700, 32, 2, 64, pads=(0, 61, 650))
    args = [x.cuda().to(dtype) for x in _decode_inputs(q, k, v, gates, mask, 64)[:5]]
    gd = [g[:, -1].cuda().to(dtype) for g in gates]
    kw = dict(start=(700 - mask.sum(1)).int().cuda(), seq_len=700, block_size=64, block_counts=4, window=100)
    want = nsa_decode(*[x.float() for x in args], *[g.float() for g in gd], **kw, backend="torch")
    got = nsa_decode(*args, *gd, **kw, backend="triton")
    assert ((got.float() - want).norm() / want.norm()).item() < tol
