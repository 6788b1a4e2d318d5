"""sparse_attention: the reference against a per-query loop, and the blocked PyTorch path and the Triton kernels
(interpreted on CPU) against the reference."""

import math
import threading

import pytest
import torch

from hlsa.ops.lte_retention import lte_column_end_scan
from hlsa.ops.sparse_attention import sparse_attention, sparse_attention_blocked, sparse_attention_ref
from hlsa.ops.triton.rows import use_tma
from hlsa.ops.triton.sparse_attention import column_prologue, column_prologue_ref

INT32_MAX = 2**31 - 1


def make_case(B: int, T: int, HQ: int, HKV: int, D: int, n_cols: int | None, pad: int, dtype=torch.float32):
    """Random q, k, v, a training column_end with `n_cols` selected keys per (b, kv head) ('all' = -1), key_mask."""
    q = torch.randn(B, T, HQ, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, HKV, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, HKV, D, dtype=dtype, requires_grad=True)
    column_end = None
    if n_cols is not None:
        n = T if n_cols < 0 else min(n_cols, T)
        picks = torch.rand(B, HKV, T).argsort(dim=-1)[..., :n]
        column_end = torch.zeros(B, HKV, T, dtype=torch.int32).scatter_(2, picks, INT32_MAX)
        column_end = column_end.permute(0, 2, 1).contiguous()
    key_mask = None
    if pad:
        key_mask = torch.ones(B, T, dtype=torch.bool)
        key_mask[0, : min(pad, T)] = False  # row 0 left-padded, row 1 (if any) not
    return q, k, v, column_end, key_mask


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).double().norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh buffers start as NaN (floats) or -1 (ints), so an output element that a kernel never writes shows."""

    def poison(fn):
        def make(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(float("nan") if t.is_floating_point() else (True if t.dtype == torch.bool else -1))

        return make

    monkeypatch.setattr(torch, "empty", poison(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poison(torch.empty_like))


def loop_attention(q, k, v, window, column_end, key_mask):
    """Per-query python loop over the visibility rule, in float64: checks the reference itself."""
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    out = torch.zeros(B, T, HQ, D, dtype=torch.float64)
    for b in range(B):
        for h in range(HQ):
            for i in range(T):
                keys = []
                for j in range(i + 1):
                    near = window is None or i - j <= window
                    far = column_end is not None and window is not None and i < column_end[b, j, h // G]
                    if (near or far) and (key_mask is None or key_mask[b, j]):
                        keys.append(j)
                if keys:
                    s = torch.stack([q[b, i, h].double() @ k[b, j, h // G].double() for j in keys]) / math.sqrt(D)
                    out[b, i, h] = torch.softmax(s, 0) @ v[b, keys, h // G].double()
    return out


@pytest.mark.parametrize(
    "window,n_cols,pad", [(1, 3, 0), (0, None, 2), (4, -1, 3), (None, None, 4), (2, 2, 11)], ids=lambda x: str(x)
)
def test_reference_matches_loop(window, n_cols, pad) -> None:
    q, k, v, ce, km = make_case(2, 11, 4, 2, 8, n_cols, pad)
    if n_cols == 2:  # finite column ends (the inference rule)
        ce = torch.randint(0, 14, ce.shape, dtype=torch.int32)
    out = sparse_attention_ref(q, k, v, window=window, column_end=ce, key_mask=km)
    torch.testing.assert_close(out.double(), loop_attention(q, k, v, window, ce, km), atol=1e-5, rtol=1e-5)
    blocked = sparse_attention(q, k, v, window=window, column_end=ce, key_mask=km)  # CPU -> the blocked path
    torch.testing.assert_close(blocked.double(), loop_attention(q, k, v, window, ce, km), atol=1e-5, rtol=1e-5)


# (T, window, column_end: None / "max" (training: INT32_MAX or 0) / "finite" (0 .. T + 3), HKV, block rows)
BLOCKED_CASES = [
    (1, 0, None, 2, 1),
    (1, None, "max", 1, 3),
    (7, 1, "finite", 2, 3),
    (7, 0, "max", 1, 2),
    (7, 20, None, 2, 4),
    (130, 5, None, 1, 16),
    (130, 7, "finite", 2, 16),
    (130, 1, "max", 2, 50),
    (130, None, None, 1, 7),
    (300, 5, "max", 2, 64),
    (300, 37, None, 1, 33),
    (300, 400, "finite", 2, 128),
    (300, None, "finite", 1, None),
]


@pytest.mark.parametrize("case", BLOCKED_CASES, ids=lambda c: "T{}-W{}-ce{}-HKV{}-rows{}".format(*c))
def test_blocked_matches_reference(case) -> None:
    """The "torch" backend (query blocks, keys limited to the band for plain SWA) equals the dense reference in the
    output and in dq, dk, dv; rows padded left (row 1 entirely, row 0 partly) output zeros."""
    T, window, ce_kind, HKV, rows = case
    B, HQ, D = 3, 4, 8
    gen = torch.Generator().manual_seed(T * 1000 + (window or 0))
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.float64, generator=gen) for h in (HQ, HKV, HKV))
    q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    column_end = None
    if ce_kind == "max":
        column_end = torch.where(torch.rand(B, T, HKV, generator=gen) < 0.3, INT32_MAX, 0).to(torch.int32)
    elif ce_kind == "finite":
        column_end = torch.randint(0, T + 4, (B, T, HKV), dtype=torch.int32, generator=gen)
        column_end[0, : T // 2, 0] = INT32_MAX
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[0, : T // 3] = False
    key_mask[1] = False
    kwargs = dict(window=window, column_end=column_end, key_mask=key_mask)
    out = sparse_attention_blocked(q, k, v, **kwargs, scale=0.7, block_rows=rows)
    ref = sparse_attention_ref(q, k, v, **kwargs, scale=0.7)
    do = torch.randn(ref.shape, dtype=ref.dtype, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), do)
    grads_ref = torch.autograd.grad(ref, (q, k, v), do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), (out, *grads), (ref, *grads_ref)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)
    assert (out[1] == 0).all() and (out[0, : T // 3] == 0).all()
    assert out[2].abs().sum() > 0


def test_blocked_float32_default_blocks() -> None:
    """fp32 at a length of several default blocks, GQA, the torch and auto backends on CPU."""
    q, k, v, ce, km = make_case(2, 700, 4, 2, 16, 40, 9)
    ref = sparse_attention_ref(q, k, v, window=33, column_end=ce, key_mask=km)
    for backend in ("torch", "auto"):
        out = sparse_attention(q, k, v, window=33, column_end=ce, key_mask=km, backend=backend)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# (B, T, HQ, HKV, D, window, columns per head (None: plain SWA, -1: all), left padding)
CASES = [
    (1, 1, 2, 2, 32, 1, -1, 0),
    (2, 37, 4, 1, 32, 5, 3, 5),
    (1, 50, 2, 2, 32, 1, 17, 0),
    (2, 48, 2, 1, 64, 0, 3, 7),
    (1, 64, 4, 4, 32, 64, 17, 0),
    (1, 100, 4, 1, 32, 64, None, 9),
    (1, 83, 2, 2, 64, 100, 3, 0),
    (2, 45, 2, 1, 32, None, None, 5),
    (1, 70, 4, 1, 32, 5, -1, 3),
    (2, 53, 4, 2, 48, 20, 5, 4),  # D = 48: not a power of two, so pointer loads instead of TMA blocks
    (2, 41, 6, 2, 32, 7, 5, 3),  # G = 3: the forward packs 4 head slots per position, one of them empty
    (1, 33, 32, 1, 32, 4, 3, 0),  # G = 32: more heads than the interpreter's 16-row tile
]
SLOW_CASES = [(1, 300, 4, 1, 32, 5, 17, 21), (1, 201, 2, 2, 64, 100, 17, 0)]


def check_triton(B, T, HQ, HKV, D, window, n_cols, pad, column_end=None) -> None:
    q, k, v, ce, km = make_case(B, T, HQ, HKV, D, n_cols, pad)
    ce = ce if column_end is None else column_end
    out = sparse_attention(q, k, v, window=window, column_end=ce, key_mask=km, backend="triton")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = sparse_attention_ref(q, k, v, window=window, column_end=ce, key_mask=km)
    grads_ref = torch.autograd.grad(ref, (q, k, v), do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), (out, *grads), (ref, *grads_ref)):
        assert torch.isfinite(a).all(), name
        # Relative error in norm, with an absolute floor (a one-key row has dq = 0 exactly in the reference).
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-5, (name, rel_err(a, b))
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    if km is not None:  # queries at padded positions see nothing
        assert (out[0, : min(pad, T)] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-HQ{}-HKV{}-D{}-W{}-cols{}-pad{}".format(*c))
def test_triton_matches_reference(case, poisoned_empty) -> None:
    check_triton(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: "B{}-T{}-HQ{}-HKV{}-D{}-W{}-cols{}-pad{}".format(*c))
def test_triton_matches_reference_long(case, poisoned_empty) -> None:
    check_triton(*case)


def test_triton_logits_that_keep_growing(poisoned_empty) -> None:
    """Keys whose logits grow along the sequence (and a late spike) make row maxima jump by large factors in later
    tiles: the online softmax's rescaling must still give the reference's o and gradients (with the rescale
    disabled, this fails with non-finite outputs)."""
    B, T, HQ, HKV, D = 2, 90, 4, 2, 32
    q, k, v, ce, km = make_case(B, T, HQ, HKV, D, 7, 5)
    ramp = torch.linspace(0.2, 4.0, T)[None, :, None, None]
    with torch.no_grad():
        k.mul_(ramp)
        k[:, 70] *= 40.0  # ~2^180 above the running max: without the rescale, exp2 overflows even in fp32
    out = sparse_attention(q, k, v, window=20, column_end=ce, key_mask=km, backend="triton")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = sparse_attention_ref(q, k, v, window=20, column_end=ce, key_mask=km)
    grads_ref = torch.autograd.grad(ref, (q, k, v), do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), (out, *grads), (ref, *grads_ref)):
        assert torch.isfinite(a).all(), name
        # Logits in the hundreds cost fp32 gradients a few more bits than the other cases.
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-5, (name, rel_err(a, b))


@pytest.mark.parametrize("window,buffer_size", [(5, 3), (1, 17)], ids=lambda x: str(x))
def test_triton_inference_rule(window, buffer_size, poisoned_empty) -> None:
    """column_end from the per-query top-N rule (finite ends), with sinks and left padding."""
    B, T, HKV, pad = 2, 61, 2, 6
    score = torch.randn(B, T, HKV)
    score[:, pad : pad + 2] = float("inf")  # sinks at the first real tokens
    score[0, :pad] = float("-inf")
    column_end = lte_column_end_scan(score, window=window, buffer_size=buffer_size)
    check_triton(B, T, 4, HKV, 32, window, None, pad, column_end=column_end)


@pytest.mark.parametrize("T,window,pad", [(1, 0, 0), (37, 3, 5), (100, 20, 0), (70, 0, 69)])
def test_column_prologue_matches_reference(T: int, window: int, pad: int) -> None:
    """The one-launch prologue (blocks of 16 keys under the interpreter, so the running count crosses blocks)."""
    _, _, _, ce, km = make_case(2, T, 4, 2, 8, T // 3, pad)
    ce[0, -1, 0] = INT32_MAX  # a column at the last position
    cols, ccount = column_prologue(ce, km, window)
    cols_ref, ccount_ref = column_prologue_ref(ce, km, window)
    assert torch.equal(ccount, ccount_ref)
    for r in range(ccount.shape[0]):
        n = ccount[r, -1]
        assert torch.equal(cols[r, :n], cols_ref[r, :n]), r


@pytest.mark.parametrize("T,D", [(1, 8), (70, 48), (100, 32)])
def test_zero_column_rows_zeroes_only_the_used_rows(T: int, D: int) -> None:
    """The dk/dv column partials start uninitialised: rows below each (b, kv head)'s column count must be zeroed (the
    column kernel adds into them, the band kernel reads them) and the rest left alone. Counts include 0 and T, and T
    is not a multiple of the kernel's row block (T = 1 has only the counts 0 and 1). The backward tests above run it
    end to end, on buffers that `poisoned_empty` fills with NaN."""
    from hlsa.ops.triton.sparse_attention_bwd import zero_column_rows

    n_col = torch.tensor([0, T, T // 2, 1, T - 1, torch.randint(0, T + 1, ()).item()])
    ccount = torch.full((len(n_col), T + 1), -7, dtype=torch.int32)  # entries the kernel must not read
    ccount[:, -1] = n_col  # the total, the only entry it reads
    dk_col = torch.full((len(n_col), T, D), float("nan"))
    dv_col = torch.full((len(n_col), T, D), float("nan"))
    zero_column_rows(dk_col, dv_col, ccount)
    for bk, n in enumerate(n_col.tolist()):
        for buf in (dk_col, dv_col):
            assert (buf[bk, :n] == 0).all(), (bk, n)
            assert buf[bk, n:].isnan().all(), (bk, n)


def test_tma_only_where_a_block_is_one_aligned_head() -> None:
    """TMA block loads need a power-of-two head dim of >= 16 bytes and 16-byte aligned, contiguous tensors; the
    interpreter emulates them, so the CPU tests run the TMA path for D = 32 and 64 and pointer loads for D = 48."""
    x = torch.randn(2, 8, 3, 64)
    assert use_tma(x, x.clone())
    assert not use_tma(torch.randn(2, 8, 3, 48))
    assert not use_tma(torch.randn(2, 8, 3, 2))  # 8 bytes per row
    assert not use_tma(x, torch.randn(2 * 8 * 3 * 64 + 1)[1:].view(2, 8, 3, 64))  # 4-byte offset
    assert not use_tma(x.transpose(1, 2))


def test_bad_arguments() -> None:
    q, k, v, ce, km = make_case(1, 8, 4, 2, 8, 2, 1)
    with pytest.raises(ValueError, match="window"):
        sparse_attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="column_end"):
        sparse_attention(q, k, v, window=2, column_end=ce.long())
    with pytest.raises(ValueError, match="key_mask"):
        sparse_attention(q, k, v, window=2, key_mask=km[:, :4])
    with pytest.raises(ValueError, match="HKV"):
        sparse_attention(q, k[:, :, :1].expand(1, 8, 3, 8), v[:, :, :1].expand(1, 8, 3, 8), window=2)
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, k, v, window=2, backend="flash")
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="scale must be > 0"):  # the kernel's running max needs scale > 0
            sparse_attention(q, k, v, window=2, scale=-0.3, backend=backend)
        with pytest.raises(ValueError, match="empty input"):
            sparse_attention(q[:, :0], k[:, :0], v[:, :0], window=2, backend=backend)
        with pytest.raises(ValueError, match="empty input"):
            sparse_attention(q[:0], k[:0], v[:0], window=2, backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# GQA 4 with TMA band loads on Hopper; D=48: pointer loads only; MHA D=128: TMA row loads too, and the fp32 tiles
@pytest.mark.parametrize("HQ,HKV,D", [(8, 2, 64), (8, 2, 48), (4, 4, 128)], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_matches_reference(dtype, HQ, HKV, D) -> None:
    torch.set_default_device("cuda")
    try:
        q, k, v, ce, km = make_case(2, 1000, HQ, HKV, D, 40, 17, dtype=dtype)
        out = sparse_attention(q, k, v, window=100, column_end=ce, key_mask=km)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
        up = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref = sparse_attention_ref(*up, window=100, column_end=ce, key_mask=km)
        grads_ref = torch.autograd.grad(ref, up, do.double())
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        for a, b in zip((out, *grads), (ref, *grads_ref)):
            assert rel_err(a, b) < tol
    finally:
        torch.set_default_device(None)


class FakeDriver:
    """The four CUDA driver calls of `bind_cuda_context`, on a thread whose current context is `current`."""

    def __init__(self, current: int | None) -> None:
        self.current, self.calls = current, []

    def cuCtxGetCurrent(self, out) -> int:  # noqa: N802 (the driver's names)
        self.calls.append("get")
        out._obj.value = self.current
        return 0

    def cuDeviceGet(self, out, index: int) -> int:  # noqa: N802
        self.calls.append(f"device {index}")
        out._obj.value = index
        return 0

    def cuDevicePrimaryCtxRetain(self, out, device) -> int:  # noqa: N802
        self.calls.append(f"retain {device.value}")
        out._obj.value = 1234
        return 0

    def cuCtxSetCurrent(self, context) -> int:  # noqa: N802
        self.calls.append(f"set {context.value}")
        self.current = context.value
        return 0


@pytest.mark.parametrize("current", [None, 99])
def test_bind_cuda_context_only_where_the_thread_has_none(current, monkeypatch: pytest.MonkeyPatch) -> None:
    from hlsa.ops.triton import rows

    driver = FakeDriver(current)
    monkeypatch.setattr(rows, "_cuda_driver", lambda: driver)
    rows.bind_cuda_context(torch.device("cuda", 1))
    if current is None:  # retain device 1's primary context and make it current, as Triton's launcher does
        assert driver.calls == ["get", "device 1", "retain 1", "set 1234"] and driver.current == 1234
    else:
        assert driver.calls == ["get"] and driver.current == 99
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    driver.calls.clear()
    rows.bind_cuda_context(torch.device("cuda", 1))
    assert driver.calls == []  # not while dynamo traces


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_on_a_thread_that_made_no_cuda_call() -> None:
    """The forward's first launch on a fresh thread, with the kernels loaded by this thread and its memory from the
    allocator's cache (so nothing else on that thread touches CUDA first), builds its TMA descriptors and matches
    the launch on this thread (`bind_cuda_context`)."""
    q, k, v, ce, _ = (x.cuda() if x is not None else None for x in make_case(2, 512, 8, 2, 64, 40, 0, torch.bfloat16))
    want = sparse_attention(q, k, v, window=100, column_end=ce)  # compiles and loads the kernels here
    del want
    want = sparse_attention(q, k, v, window=100, column_end=ce)
    got: dict = {}

    def work() -> None:
        try:
            got["o"] = sparse_attention(q, k, v, window=100, column_end=ce)
        except Exception as err:  # reported below, in the test's thread
            got["error"] = err

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert "error" not in got, got.get("error")
    torch.testing.assert_close(got["o"], want)


def test_backward_refuses_sequences_past_32_bit_offsets() -> None:
    """The dk/dv band kernel addresses one sequence's K and V with 32-bit offsets: a sequence of T * HKV * D >= 2**31
    elements is refused before anything is allocated (expanded views here, no memory behind them)."""
    from hlsa.ops.triton.sparse_attention_bwd import dkdv

    T, HKV, D = 2**21, 16, 64
    k = torch.zeros(1, 1, 1, 1, dtype=torch.bfloat16).expand(1, T, HKV, D)
    q = torch.zeros(1, 1, 1, 1, dtype=torch.bfloat16).expand(1, T, HKV, D)
    lse = torch.zeros(1, 1, 1).expand(1, HKV, T)
    with pytest.raises(ValueError, match=r"T \* HKV \* D = 2147483648 must be below 2\*\*31"):
        dkdv(q, k, k, q, lse, lse, q, q, q, q, 64, 0.125, False, config=(16, 16, 1, 1))
