"""lte_column_end: rank count vs the per-query top-N definition; torch and Triton scans vs the rank count."""

from functools import partial

import pytest
import torch

from hlsa.ops.lte_retention import (
    INT32_MAX,
    lte_column_end,
    lte_column_end_kernel,
    lte_column_end_ref,
    lte_column_end_scan,
    prefix_buffers,
)


def random_scores(B: int, T: int, H: int, *, levels: int = 4) -> torch.Tensor:
    """Integer-valued scores (many ties), some non-positive, a few +inf sinks and -inf pads."""
    s = torch.randint(-levels + 1, levels + 1, (B, T, H)).float()
    r = torch.rand(B, T, H)
    s[r < 0.08] = float("inf")
    s[r > 0.92] = float("-inf")
    return s


def retained_by_definition(score_row: list[float], t: int, window: int, n: int) -> set[int]:
    """Keys retained for query t: top-n positive scores among keys j < t - W, ties favour the earlier key."""
    cands = [j for j in range(max(t - window, 0)) if score_row[j] > 0]
    return set(sorted(cands, key=lambda j: (-score_row[j], j))[:n])


@pytest.mark.parametrize("window,buffer_size", [(0, 2), (1, 3), (3, 0), (2, 50)], ids=lambda x: str(x))
def test_ref_matches_per_query_definition(window: int, buffer_size: int) -> None:
    T = 23
    score = random_scores(2, T, 2)
    end = lte_column_end_ref(score, window=window, buffer_size=buffer_size)
    for b in range(2):
        for h in range(2):
            row = score[b, :, h].tolist()
            for t in range(T):
                kept = retained_by_definition(row, t, window, buffer_size)
                seen = {j for j in range(max(t - window, 0)) if t < end[b, j, h]}
                assert seen == kept, (b, h, t)
    # The three closed forms of the contract.
    pos = torch.arange(T)[None, :, None]
    assert ((score <= 0) <= (end == 0)).all()
    assert ((end == 0) | (end == INT32_MAX) | (end >= pos + window + 1)).all()


@pytest.mark.parametrize(
    "B,T,H,window,buffer_size",
    [(2, 1, 1, 0, 1), (2, 37, 3, 1, 3), (1, 64, 2, 5, 17), (3, 50, 1, 0, 0), (1, 30, 2, 4, 100), (2, 120, 2, 7, 9)],
    ids=lambda x: str(x),
)
def test_scan_matches_ref(B: int, T: int, H: int, window: int, buffer_size: int) -> None:
    for levels in (2, 50):
        score = random_scores(B, T, H, levels=levels)
        expect = lte_column_end_ref(score, window=window, buffer_size=buffer_size)
        for chunk in (None, 256, 1, 7):  # the default, one chunk (T <= 256), many (keys evicted chunks later)
            got = lte_column_end_scan(score, window=window, buffer_size=buffer_size, chunk=chunk)
            torch.testing.assert_close(got, expect)


def test_cpu_dispatch_switches_to_the_scan_for_large_pair_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend="auto" on the CPU: the brute force while B*HKV*T^2 is small, the scan past the threshold."""
    import hlsa.ops.lte_retention as retention

    score = random_scores(2, 45, 2, levels=3)
    expect = lte_column_end_ref(score, window=3, buffer_size=5)
    used = []
    for name in ("lte_column_end_ref", "lte_column_end_scan"):
        fn = getattr(retention, name)
        monkeypatch.setattr(retention, name, lambda *a, fn=fn, name=name, **k: used.append(name) or fn(*a, **k))
    torch.testing.assert_close(lte_column_end(score, window=3, buffer_size=5), expect)
    monkeypatch.setattr(retention, "BRUTE_FORCE_MAX_PAIRS", 2 * 2 * 45 * 45 - 1)
    torch.testing.assert_close(lte_column_end(score, window=3, buffer_size=5), expect)
    assert used == ["lte_column_end_ref", "lte_column_end_scan"]


IMPLEMENTATIONS = {
    "torch": partial(lte_column_end, backend="torch"),
    "scan": lte_column_end_scan,
    "triton": partial(lte_column_end, backend="triton"),
}


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_all_sinks_and_all_pads(name: str) -> None:
    column_end = IMPLEMENTATIONS[name]
    inf = torch.full((1, 10, 1), float("inf"))
    end = column_end(inf, window=2, buffer_size=3)
    # The first three keys are kept forever; every later sink loses the tie to them and never enters.
    assert end[0, :3, 0].tolist() == [INT32_MAX] * 3
    assert end[0, 3:, 0].tolist() == [j + 3 for j in range(3, 10)]
    assert (column_end(-inf, window=2, buffer_size=3) == 0).all()


def test_backends_rank_fp64_scores_in_fp32() -> None:
    """fp64 scores that differ only below fp32 precision tie in every backend (ties favour the earlier key)."""
    score = torch.tensor([1.0, 1.0 + 1e-12, 0.5, 0.25, 2.0], dtype=torch.float64)[None, :, None]
    ends = {name: f(score, window=0, buffer_size=1) for name, f in IMPLEMENTATIONS.items()}
    assert ends["torch"][0, :, 0].tolist() == [5, 2, 3, 4, INT32_MAX]  # in fp64 key 1 would push key 0 out at 2
    for backend in ("scan", "triton"):
        torch.testing.assert_close(ends[backend], ends["torch"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        lte_column_end(torch.zeros(1, 4, 1), window=1, buffer_size=-1)
    with pytest.raises(ValueError, match="window"):
        lte_column_end(torch.zeros(1, 4, 1), window=-1, buffer_size=1)
    with pytest.raises(ValueError, match="score"):
        lte_column_end(torch.zeros(4, 1), window=1, buffer_size=1)
    with pytest.raises(ValueError, match="backend"):
        lte_column_end(torch.zeros(1, 4, 1), window=1, buffer_size=1, backend="cuda")
    with pytest.raises(ValueError, match="chunk"):
        lte_column_end_scan(torch.ones(1, 4, 1), window=1, buffer_size=1, chunk=0)
    with pytest.raises(ValueError, match="chunk"):
        lte_column_end_kernel(torch.ones(1, 4, 1), window=1, buffer_size=1, chunk=-2)


def test_explicit_triton_on_the_cpu_without_the_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import hlsa.ops

    monkeypatch.setattr(hlsa.ops, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        lte_column_end(torch.ones(1, 4, 1), window=1, buffer_size=1, backend="triton")


@pytest.mark.parametrize(
    "B,T,H,window,buffer_size",
    [(2, 1, 1, 0, 1), (2, 37, 3, 1, 3), (1, 64, 2, 5, 17), (3, 20, 1, 0, 0), (1, 30, 2, 4, 100)],
    ids=lambda x: str(x),
)
def test_triton_scan_matches_ref(B: int, T: int, H: int, window: int, buffer_size: int) -> None:
    score = random_scores(B, T, H, levels=2)
    expect = lte_column_end_ref(score, window=window, buffer_size=buffer_size)
    got = lte_column_end(score, window=window, buffer_size=buffer_size, backend="triton")
    torch.testing.assert_close(got, expect)


@pytest.mark.parametrize("chunk", [1, 3, 8, 16])
@pytest.mark.parametrize(
    "B,T,H,window,buffer_size", [(2, 37, 3, 1, 3), (1, 64, 2, 5, 17), (2, 50, 2, 0, 1)], ids=lambda x: str(x)
)
def test_triton_chunked_scan_matches_ref(B: int, T: int, H: int, window: int, buffer_size: int, chunk: int) -> None:
    """Chunks walked in parallel from the prefix buffers give the single walk's column ends: ties (levels=2),
    evictions of keys that entered in an earlier chunk, chunks that start with a partly empty buffer."""
    for levels in (2, 50):
        score = random_scores(B, T, H, levels=levels)
        expect = lte_column_end_ref(score, window=window, buffer_size=buffer_size)
        got = lte_column_end_kernel(score, window=window, buffer_size=buffer_size, chunk=chunk)
        torch.testing.assert_close(got, expect)


def test_prefix_buffers_are_the_top_n_of_each_prefix() -> None:
    score = random_scores(1, 40, 3, levels=3).permute(0, 2, 1).reshape(3, 40)
    n, chunk = 5, 6
    buf_s, buf_p = prefix_buffers(score, n, chunk)
    for r in range(3):
        for c in range(buf_s.shape[1]):
            row = score[r, : c * chunk].tolist()
            top = sorted((j for j in range(len(row)) if row[j] > 0), key=lambda j: (-row[j], j))[:n]
            got = sorted(p for p in buf_p[r, c].tolist() if p >= 0)
            assert got == sorted(top), (r, c)
            assert buf_s[r, c][buf_p[r, c] >= 0].tolist() == [row[p] for p in buf_p[r, c].tolist() if p >= 0]
            assert (buf_s[r, c][buf_p[r, c] < 0] == float("-inf")).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_matches_ref() -> None:
    score = random_scores(2, 500, 4, levels=3).cuda()
    for buffer_size in (0, 5, 64, 1000):
        expect = lte_column_end_ref(score, window=17, buffer_size=buffer_size)
        torch.testing.assert_close(lte_column_end(score, window=17, buffer_size=buffer_size), expect)
