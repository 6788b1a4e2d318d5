"""NSA layer: prefill + token-by-token decode equals the full forward; parameter names follow the authors."""

from __future__ import annotations

import pytest
import torch

import hlsa.layers.nsa as nsa_layer
from hlsa.layers.nsa import NativeSparseAttention

CASES = [  # (HQ, HKV, D, block_size, block_counts, window, B, T_prefill, T_total, pads)
    pytest.param(4, 2, 8, 8, 16, 3, 2, 3, 7, (0, 1), id="below-one-block-leftpad"),
    pytest.param(4, 1, 8, 4, 1, 2, 2, 6, 19, (0, 3), id="S1-gqa4-leftpad"),
    pytest.param(6, 2, 8, 3, 2, 0, 1, 5, 17, (), id="S2-G3-W0-block3"),
    pytest.param(2, 2, 4, 4, 16, 5, 3, 9, 26, (2, 0, 9), id="S16-mha-all-pad-row"),
]


def _run(layer, x, mask, t0):
    full, _ = layer(x, pad_mask=mask, state=None)
    state = layer.init_state(x.shape[0], device=x.device, dtype=x.dtype)
    outs = [layer(x[:, :t0], pad_mask=None if mask is None else mask[:, :t0], state=state)[0]]
    outs += [layer(x[:, i : i + 1], pad_mask=None, state=state)[0] for i in range(t0, x.shape[1])]
    assert state.seen == x.shape[1]
    return full, torch.cat(outs, dim=1)


def _mask(B, T, pads):
    if not pads:
        return None
    mask = torch.ones(B, T, dtype=torch.bool)
    for b, p in enumerate(pads):
        mask[b, :p] = False
    return mask


@pytest.mark.parametrize("HQ,HKV,D,BS,S,W,B,T0,T,pads", CASES)
def test_prefill_then_decode_equals_full_forward(HQ, HKV, D, BS, S, W, B, T0, T, pads):
    layer = NativeSparseAttention(16, HQ, HKV, D, block_size=BS, block_counts=S, window_size=W, backend="torch")
    x, mask = torch.randn(B, T, 16), _mask(B, T, pads)
    full, stepped = _run(layer, x, mask, T0)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    if mask is not None:
        assert full[~mask].abs().max() == 0  # pad positions output zeros


def test_triton_decode_and_cache_growth(monkeypatch):
    # A 4-slot chunk makes the caches grow (and copy) several times during the decode.
    monkeypatch.setattr(nsa_layer, "_CACHE_CHUNK", 4)
    layer = NativeSparseAttention(16, 4, 2, 16, block_size=4, block_counts=2, window_size=3, backend="triton")
    x, mask = torch.randn(2, 14, 16), _mask(2, 14, (0, 2))
    full, stepped = _run(layer, x, mask, 5)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_reads_the_position_from_the_device(backend: str) -> None:
    """A step replayed from a CUDA graph moves the device `position` but no Python counter: decode steps with the
    host-side `seen` held at the prefill's count still write, pool, rotate and attend at the right positions."""
    layer = NativeSparseAttention(16, 4, 2, 16, block_size=4, block_counts=2, window_size=3, backend=backend)
    x, mask = torch.randn(2, 19, 16), _mask(2, 19, (0, 2))
    full, _ = layer(x, pad_mask=mask, state=None)
    state = layer.init_state(2, device=x.device, dtype=x.dtype)
    layer(x[:, :2], pad_mask=mask[:, :2], state=state)  # below one block, and row 1 all pads
    for i in range(2, 19):
        torch.testing.assert_close(layer(x[:, i : i + 1], state=state)[0][:, 0], full[:, i], rtol=1e-5, atol=1e-5)
        state.seen = 2
    assert int(state.position) == 19


def test_compiled_decode_step_is_one_graph(opaque_nsa_decode: None) -> None:
    """The decode step compiles whole (`fullgraph=True`: no host sync, no Python branch on a device value) with the
    host-side `seen` symbolic, as `benchmarks/e2e_timing.compile_options` marks it, into one graph that serves every
    step (no recompile when the first block completes or at later positions), with the eager step's outputs and the
    full forward's."""
    import copy

    from torch._dynamo.utils import counters

    layer = NativeSparseAttention(16, 4, 2, 16, block_size=4, block_counts=2, window_size=3, backend="triton")
    x, mask = torch.randn(2, 17, 16), _mask(2, 17, (0, 2))
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda layer, x, state: layer(x, state=state)[0], backend="eager", fullgraph=True)
    with torch.no_grad(), torch.compiler.config.patch(dynamic_sources="L['state'].seen"):
        full, _ = layer(x, pad_mask=mask, state=None)
        state = layer.init_state(2, device=x.device, dtype=x.dtype)
        layer(x[:, :2], pad_mask=mask[:, :2], state=state)  # below one block, and row 1 all pads
        eager_state = copy.deepcopy(state)
        for i in range(2, 17):
            got = step(layer, x[:, i : i + 1], state)
            torch.testing.assert_close(got, layer(x[:, i : i + 1], state=eager_state)[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got[:, 0], full[:, i], rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert state.seen == eager_state.seen == 17 and int(state.position) == 17


def test_prefill_longer_than_a_decode_chunk_uses_incremental_cache():
    """The compressed cache written by the decode equals pooling the final history (never re-pooled)."""
    layer = NativeSparseAttention(16, 2, 1, 8, block_size=4, block_counts=3, window_size=2, backend="torch")
    x, mask = torch.randn(2, 23, 16), _mask(2, 23, (0, 3))
    state = layer.init_state(2, device=x.device, dtype=x.dtype)
    layer(x[:, :6], pad_mask=mask[:, :6], state=state)
    for i in range(6, 23):
        layer(x[:, i : i + 1], pad_mask=None, state=state)
    for b, s0 in enumerate((0, 3)):
        n = (23 - s0) // 4
        want = state.k[b, :, s0 : s0 + 4 * n].unflatten(1, (n, 4)).mean(2)
        torch.testing.assert_close(state.k_cmp[b, :, :n], want)


def test_parameters_match_authors_checkpoint():
    # nsa_0.4B (shared/reference/authors_state_dicts.json): hidden 1024, 32 q heads, 2 kv heads, head dim 64.
    layer = NativeSparseAttention(1024, 32, 2, 64, window_size=511)
    shapes = {k: list(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "q_proj.weight": [2048, 1024],
        "k_proj.weight": [128, 1024],
        "v_proj.weight": [128, 1024],
        "g_proj.weight": [96, 1024],
        "o_proj.weight": [1024, 2048],
    }


def test_gate_layout_is_head_major_branch_minor():
    """g_proj rows are (head, branch) with branches cmp, slc, swa: opening only the swa rows gives pure SWA."""
    from hlsa.ops.sparse_attention import sparse_attention_ref

    layer = NativeSparseAttention(8, 2, 1, 4, block_size=2, block_counts=1, window_size=1, backend="torch")
    layer.g_proj = torch.nn.Linear(8, 6)  # a bias lets the test set each (head, branch) gate directly
    with torch.no_grad():
        layer.g_proj.weight.zero_()
        layer.g_proj.bias.copy_(torch.tensor([-1e4, -1e4, 0.0]).repeat(2))  # cmp, slc shut; swa at 1/2
    x = torch.randn(1, 7, 8)
    y, _ = layer(x, pad_mask=None, state=None)
    q = layer.q_proj(x).view(1, 7, 2, 4)
    k = layer.k_proj(x).view(1, 7, 1, 4)
    q, k = layer.rotary(q, k, torch.arange(7))
    o = 0.5 * sparse_attention_ref(q, k, layer.v_proj(x).view(1, 7, 1, 4), window=1)
    torch.testing.assert_close(y, layer.o_proj(o.reshape(1, 7, 8)), rtol=1e-5, atol=1e-6)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="num_kv_heads"):
        NativeSparseAttention(16, 3, 2, 8, window_size=4)
    with pytest.raises(ValueError, match="backend"):
        NativeSparseAttention(16, 2, 2, 8, window_size=4, backend="fla")
