"""lte_evict: the Triton kernel (interpreted on CPU) against the reference step by step, and the streaming buffer
against the per-query top-N rule (`retained_top_n`, plain Python), ties included."""

from __future__ import annotations

import random

import pytest
import torch

from hlsa.ops.lte_evict import lte_evict, lte_evict_ref, retained_top_n

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INF = float("inf")
# Discrete values make ties frequent, in the buffer and between the ring token and the buffer minimum.
TIE_SCORES = [-INF, -1.0, 0.0, 0.5, 1.0, 1.0, 2.0, 3.0, INF]
NAMES = ("k", "v", "score", "valid", "buffer_len", "pos")


def _head_score(kind: str, rng: random.Random) -> float:
    if kind == "nonpositive":
        return rng.choice([-INF, -2.0, -0.5, 0.0])
    if kind == "positive":
        return rng.choice([0.25, 1.0, 2.0, 5.0, INF])
    return rng.choice(TIE_SCORES)


def _random_cache(B: int, HKV: int, ring: int, N: int, D: int, *, start: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A mid-generation cache before the token at `start` arrives: a partly blank ring holding positions
    `start - ring .. start - 1` (at `position % ring`), buffers from empty to full (heads differ) holding distinct
    earlier positions in shuffled slots (slots are reused), and tied buffer scores."""
    g = torch.Generator().manual_seed(seed)
    S = ring + N
    k = torch.randn(B, HKV, S, D, generator=g)
    v = torch.randn(B, HKV, S, D, generator=g)
    score = torch.randn(B, HKV, S, generator=g)
    score[:, :, ring:] = torch.tensor([0.5, 1.0, 1.0, 2.0])[torch.randint(0, 4, (B, HKV, N), generator=g)]
    buffer_len = torch.randint(0, N + 1, (B, HKV), dtype=torch.int32, generator=g)
    if N > 0:
        buffer_len[0, 0] = N  # one head starts full, one empty
        buffer_len[-1, -1] = 0
    valid = torch.zeros(B, HKV, S, dtype=torch.bool)
    valid[:, :, :ring] = torch.rand(B, HKV, ring, generator=g) < 0.7
    valid[:, :, ring:] = torch.arange(N) < buffer_len[:, :, None]
    pos = torch.empty(B, HKV, S, dtype=torch.int32)
    ring_pos = torch.arange(start - ring, start)
    pos[:, :, ring_pos % ring] = ring_pos.int()
    for b in range(B):
        for h in range(HKV):
            pos[b, h, ring:] = torch.randperm(start - ring, generator=g)[:N].int()
    return tuple(t.to(DEVICE) for t in (k, v, score, valid, buffer_len, pos))


# (ring_size, N, steps): ring sizes 1, 2, 6 and 65 (W + 1 for W = 64), buffers 0 (SWA-like), 3 and 17. The caches
# start mid-generation, so tokens leave the ring from the first step; the interpreter costs 10-30 ms per program.
EVICT_CASES = [(1, 3, 30), (2, 17, 40), (6, 0, 10), (6, 3, 30), (65, 17, 66)]


@pytest.mark.parametrize("ring,N,steps", EVICT_CASES, ids=[f"ring{r}-N{n}" for r, n, _ in EVICT_CASES])
def test_triton_matches_reference_step_by_step(ring: int, N: int, steps: int) -> None:
    B, HKV, D = 1, 3, 6
    rng = random.Random(ring * 100 + N)
    kinds = ["nonpositive", "positive", "mixed"]  # head 0 starts full, head 2 empty (see _random_cache)
    start = 1000 + ring
    cache_ref = _random_cache(B, HKV, ring, N, D, start=start, seed=ring * 100 + N)
    cache_tri = tuple(t.clone() for t in cache_ref)
    len_start = cache_ref[4].clone()
    position = torch.zeros((), dtype=torch.int64, device=DEVICE)
    for step in range(steps):
        position.fill_(start + step)
        slot = (start + step) % ring
        # The router refresh scores the token leaving the ring before it goes; make that score per-head random.
        refresh = torch.tensor([[_head_score(kinds[h], rng) for h in range(HKV)]])
        for cache in (cache_ref, cache_tri):
            cache[2][:, :, slot] = refresh.to(DEVICE)
        k_new = torch.randn(B, HKV, D, device=DEVICE)
        v_new = torch.randn(B, HKV, D, device=DEVICE)
        lte_evict_ref(*cache_ref, position=position, k_new=k_new, v_new=v_new, ring_size=ring)
        lte_evict(*cache_tri, position=position, k_new=k_new, v_new=v_new, ring_size=ring, backend="triton")
        for name, a, b in zip(NAMES, cache_tri, cache_ref):
            assert torch.equal(a, b), f"{name} differs at step {step}"
    buffer_len, pos = cache_ref[4], cache_ref[5]
    assert buffer_len[0, 0] == len_start[0, 0]  # no positive score: nothing ever moves
    assert buffer_len[0, 1] == N  # all positive: the buffer fills up
    assert cache_ref[3][:, :, :ring].all()  # every ring slot was written at least once
    last = start + steps - 1
    window = torch.arange(last - ring + 1, last + 1, dtype=torch.int32, device=DEVICE)
    assert pos[0, :, :ring].sort(dim=1).values.equal(window.expand(HKV, ring))  # the ring holds the last positions
    for h in range(HKV):  # buffered positions stay distinct and older than the window
        buf_pos = pos[0, h, ring : ring + int(buffer_len[0, h])]
        assert buf_pos.unique().numel() == buf_pos.numel() and bool((buf_pos <= last - ring).all())


def _stream(scores: torch.Tensor, *, ring: int, N: int, backend: str) -> list[list[set[int]]]:
    """Feed tokens 0..T-1 (score [T, B, HKV]) through ring + eviction; return each head's buffered token ids.

    The token id rides in v[..., 0] (exact in float32) so identity survives the copies; pos_cache must agree.
    """
    T, B, HKV = scores.shape
    D = 4
    S = ring + N
    k = torch.zeros(B, HKV, S, D, device=DEVICE)
    v = torch.full((B, HKV, S, D), -1.0, device=DEVICE)
    score = torch.full((B, HKV, S), -INF, device=DEVICE)
    valid = torch.zeros(B, HKV, S, dtype=torch.bool, device=DEVICE)
    buffer_len = torch.zeros(B, HKV, dtype=torch.int32, device=DEVICE)
    pos = torch.full((B, HKV, S), -7, dtype=torch.int32, device=DEVICE)  # garbage in blank slots
    position = torch.zeros((), dtype=torch.int64, device=DEVICE)
    for t in range(T):
        position.fill_(t)
        token = torch.full((B, HKV, D), float(t), device=DEVICE)
        state = (k, v, score, valid, buffer_len, pos)
        lte_evict(*state, position=position, k_new=token, v_new=token, ring_size=ring, backend=backend)
        score[:, :, t % ring] = scores[t].to(DEVICE)  # the router scores the newcomer (refresh)
    ids = v[:, :, :, 0].long().cpu()
    lens = buffer_len.cpu()
    assert valid[:, :, ring:].cpu().equal(torch.arange(N) < lens[:, :, None])
    in_use = valid.cpu()
    assert pos.cpu().long()[in_use].equal(ids[in_use])  # every position moved with its token
    return [[set(ids[b, h, ring : ring + lens[b, h]].tolist()) for h in range(HKV)] for b in range(B)]


def _scores(T: int, B: int, HKV: int, *, sinks: int, ties: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # three levels, rarer as they rise: the buffer minimum stays tied as the levels above arrive
        u = torch.rand(T, B, HKV, generator=g)
        levels = torch.where(u < 0.04, 3.0, torch.where(u < 0.2, 2.0, 1.0))
        s = torch.where(u < 0.6, levels, torch.where(u < 0.7, 0.0, -INF))
    else:  # continuous positives (no ties among them) mixed with -inf, 0 and negatives
        s = torch.randn(T, B, HKV, generator=g)
        special = torch.rand(T, B, HKV, generator=g)
        s = torch.where(special < 0.1, -INF, torch.where(special < 0.2, 0.0, s))
    s[:sinks] = INF
    s[:, 0, 0] = s[:, 0, 0].abs() + 0.5  # one head with all-positive scores
    s[:, -1, -1] = -s[:, -1, -1].abs()  # and one with none
    return s


def _check_stream(ring: int, N: int, T: int, backend: str, *, ties: bool) -> None:
    B, HKV = (1, 3) if backend == "triton" else (2, 3)
    scores = _scores(T, B, HKV, sinks=2, ties=ties, seed=T + N)
    buffers = _stream(scores, ring=ring, N=N, backend=backend)
    evicted = T - ring  # tokens 0..T-ring-1 have left the ring
    for b in range(B):
        for h in range(HKV):
            assert buffers[b][h] == retained_top_n(scores[:evicted, b, h].tolist(), N), (b, h)


@pytest.mark.parametrize(
    "ring,N,T,backend",
    [(6, 17, 300, "torch"), (65, 17, 400, "torch"), (1, 3, 300, "torch"), (2, 5, 30, "triton")],
)
def test_stream_keeps_top_n_without_ties(ring: int, N: int, T: int, backend: str) -> None:
    _check_stream(ring, N, T, backend, ties=False)


# (ring, N, T, backend): every case but (1, 7) keeps a different set under first-argmin replacement (the old rule).
TIE_CASES = [(6, 17, 300, "torch"), (2, 9, 200, "torch"), (65, 17, 400, "torch"), (1, 7, 400, "torch")]
TIE_CASES += [(1, 5, 30, "triton"), (3, 5, 30, "triton")]


@pytest.mark.parametrize("ring,N,T,backend", TIE_CASES)
def test_stream_keeps_top_n_scores_with_ties(ring: int, N: int, T: int, backend: str) -> None:
    """Tied scores at the buffer minimum: replacing the latest tied token keeps exactly the per-query set."""
    _check_stream(ring, N, T, backend, ties=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_full_buffer_replaces_latest_tied_token(backend: str) -> None:
    """Buffer slot order differs from age: the first minimum slot holds an older token than the last one."""
    ring, N, D = 2, 4, 3
    state = _random_cache(1, 1, ring, N, D, start=100, seed=0)
    score, valid, buffer_len, pos = state[2:]
    score[0, 0, ring:] = torch.tensor([1.0, 3.0, 1.0, 1.0])
    pos[0, 0, ring:] = torch.tensor([40, 10, 70, 55], dtype=torch.int32)
    valid[0, 0, ring:] = True
    buffer_len.fill_(N)
    valid[0, 0, :ring] = True
    score[0, 0, :ring] = torch.tensor([2.0, 1.0])  # positions 98 (slot 0) and 99 (slot 1) leave next
    new = torch.zeros(1, 1, D, device=DEVICE)
    position = torch.tensor(100, device=DEVICE)
    lte_evict(*state, position=position, k_new=new, v_new=new, ring_size=ring, backend=backend)
    assert pos[0, 0, ring:].tolist() == [40, 10, 98, 55]  # position 70 (latest at 1.0) gave way to 98
    assert score[0, 0, ring:].tolist() == [1.0, 3.0, 2.0, 1.0]
    assert pos[0, 0, 0] == 100 and score[0, 0, 0] == -INF
    position.fill_(101)  # 99 ties with the minimum 1.0 but is later than 40 and 55: it does not enter
    lte_evict(*state, position=position, k_new=new, v_new=new, ring_size=ring, backend=backend)
    assert pos[0, 0, ring:].tolist() == [40, 10, 98, 55] and pos[0, 0, 1] == 101


@pytest.mark.parametrize("lag", [0, 1, 4])
def test_recorded_score_is_ranked_after_the_eviction(lag: int) -> None:
    """`new_score`: token `position - lag` gets -inf before its row's padding ends (and while negative), +inf as one of
    the row's first `sink_size` tokens, else its score; Triton equals the reference on every tensor at every step,
    the prompt's first steps included (positions below `lag`)."""
    B, HKV, ring, N, D, sink = 3, 2, 6, 3, 4, 2
    offset = torch.tensor([0, 2, 5], device=DEVICE)  # left padding per row
    strided_offset = torch.stack([offset, torch.full_like(offset, 9)], dim=1)[:, 0]  # Triton gets a strided view
    g = torch.Generator().manual_seed(lag)
    S = ring + N  # a fresh cache, as a prompt of zero tokens leaves it
    cache_ref = (
        torch.zeros(B, HKV, S, D, device=DEVICE),
        torch.zeros(B, HKV, S, D, device=DEVICE),
        torch.full((B, HKV, S), -INF, device=DEVICE),
        torch.zeros(B, HKV, S, dtype=torch.bool, device=DEVICE),
        torch.zeros(B, HKV, dtype=torch.int32, device=DEVICE),
        torch.full((B, HKV, S), -1, dtype=torch.int32, device=DEVICE),
    )
    cache_tri = tuple(t.clone() for t in cache_ref)
    for step in range(12):
        position = torch.tensor(step, device=DEVICE)
        new_score = torch.randn(B, HKV, generator=g).to(DEVICE)
        k_new, v_new = (torch.randn(B, HKV, D, generator=g).to(DEVICE) for _ in range(2))
        kwargs = dict(position=position, k_new=k_new, v_new=v_new, ring_size=ring, new_score=new_score,
                      score_lag=lag, offset=offset, sink_size=sink)  # fmt: skip
        lte_evict_ref(*cache_ref, **kwargs)
        lte_evict(*cache_tri, **{**kwargs, "offset": strided_offset}, backend="triton")
        for name, a, b in zip(NAMES, cache_tri, cache_ref):
            assert torch.equal(a, b), f"{name} differs at step {step}"
        j = step - lag
        for b in range(B):
            since = j - int(offset[b])
            want = [-INF if since < 0 else INF if since < sink else float(new_score[b, h]) for h in range(HKV)]
            assert cache_ref[2][b, :, j % ring].tolist() == want, (step, b)
        if lag > 0:  # the new token's own slot waits for its score
            assert (cache_ref[2][:, :, step % ring] == -INF).all()


def test_retained_top_n_model() -> None:
    assert retained_top_n([1.0, 3.0, 1.0, 0.0, -INF, INF, 2.0], 3) == {5, 1, 6}
    assert retained_top_n([1.0, 2.0, 1.0, 1.0], 2) == {1, 0}  # tie at 1.0: the earliest wins
    assert retained_top_n([0.0, -1.0], 2) == set()


def test_bad_input_raises() -> None:
    k, v, score, valid, buffer_len, pos = _random_cache(1, 2, 4, 3, 8, start=20, seed=0)
    new = torch.zeros(1, 2, 8, device=DEVICE)
    position = torch.tensor(20, device=DEVICE)
    base = (k, v, score, valid, buffer_len)

    def call(*state: torch.Tensor, position: torch.Tensor = position, k_new: torch.Tensor = new, ring: int = 4) -> None:
        lte_evict(*state, position=position, k_new=k_new, v_new=new, ring_size=ring)

    with pytest.raises(ValueError, match="position"):
        call(*base, pos, position=position.int())
    with pytest.raises(ValueError, match="position"):
        call(*base, pos, position=position.view(1))
    with pytest.raises(ValueError, match="pos_cache"):
        call(*base, pos.long())
    with pytest.raises(ValueError, match="pos_cache"):
        call(*base, pos[:, :, :-1])
    with pytest.raises(ValueError, match="ring_size"):
        call(*base, pos, ring=8)
    with pytest.raises(ValueError, match="buffer_len"):
        call(k, v, score, valid, buffer_len.long(), pos)
    with pytest.raises(ValueError, match="k_new"):
        call(*base, pos, k_new=new[:, :1])
    scored = dict(position=position, k_new=new, v_new=new, ring_size=4, offset=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="new_score must be float"):
        lte_evict(*base, pos, **scored, new_score=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="offset must be int64"):
        lte_evict(*base, pos, **{**scored, "offset": None}, new_score=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="score_lag"):
        lte_evict(*base, pos, **scored, new_score=torch.zeros(1, 2), score_lag=4)
    with pytest.raises(ValueError, match="pass both or neither"):
        lte_evict(*base, pos, **scored)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="pos_cache"):
            call(*base, pos.cpu())
        with pytest.raises(ValueError, match="position"):
            call(*base, pos, position=position.cpu())
