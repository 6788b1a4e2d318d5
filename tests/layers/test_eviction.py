"""Eviction policies of LTE layers: prefill plus token-by-token decode (and the full forward) equal each policy's
brute-force definition; the oracle is full attention with an unbounded buffer and the window policy with none."""

import pytest
import torch
import torch.nn.functional as F

from hlsa.config import HybridConfig
from hlsa.layers.attention import Attention, KVState
from hlsa.layers.eviction import (
    Eviction,
    EvictionState,
    delta_write_scores,
    delta_write_scores_ref,
    dense_attention,
    random_scores,
    simulate_visible_keys,
    snapkv_visible_keys,
    visible_keys,
)
from hlsa.layers.lte import LTEAttention
from hlsa.model import HybridForCausalLM

WINDOW, SINKS = 6, 2


def make_layer(heads: int = 4, kv_heads: int = 2) -> LTEAttention:
    torch.manual_seed(0)
    layer = LTEAttention(
        32,
        heads,
        kv_heads,
        8,
        window_size=WINDOW,
        buffer_size=5,
        sink_size=SINKS,
        conv_size=(3, 3),
        conv_dilation=(1, 2),  # router margin 3: the learned policy scores a token 3 steps after it arrives
        dropout_prob=0.0,
    ).eval()
    torch.nn.init.normal_(layer.router.conv_stack.proj.bias, 0.0, 1.0)  # mixed-sign router scores
    return layer


def definition(layer: LTEAttention, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """The policy's output from its brute-force visible set: dense attention over the keys `visible_keys` allows
    (`simulate_visible_keys` for the policies that score from attention weights)."""
    t = x.shape[1]
    q, k, v = layer._project(x)
    if layer.eviction.policy == "delta_write":  # the token-by-token definition, not the kernels
        raw = delta_write_scores_ref(k, v, pad)
    else:
        raw = layer.eviction.scores(layer.router(k, v, pad_mask=pad), k, torch.arange(t))
    q_rot, k_rot = layer.rotary(q, k, torch.arange(t))
    sizes = dict(window=WINDOW, buffer_size=layer.buffer_size, sink_size=SINKS)
    if layer.eviction.attention_scored:
        visible = simulate_visible_keys(q_rot, k_rot, pad, policy=layer.eviction.policy, **sizes)
    elif layer.eviction.policy == "snapkv":
        visible = snapkv_visible_keys(q_rot, k_rot, pad, prompt=layer.eviction.prompt_len, **sizes)
    else:
        visible = visible_keys(raw, pad, **sizes)
    return layer.o_proj(dense_attention(q_rot, k_rot, v, visible).flatten(2))


@pytest.mark.parametrize("policy", ["learned", "window", "random", "key_norm", "delta_write", "h2o", "tova", "snapkv"])
@pytest.mark.parametrize("buffer", [SINKS, 4, 12])
@pytest.mark.parametrize("prompt", [1, 9, 20])
@pytest.mark.parametrize("heads", [2, 4], ids=["mha", "gqa"])
def test_prefill_and_decode_equal_the_definition(policy: str, buffer: int, prompt: int, heads: int) -> None:
    layer = make_layer(heads=heads)
    layer.set_eviction(Eviction(policy, seed=3, layer=1, prompt_len=prompt), buffer)
    b, t = 3, 30
    x = torch.randn(b, t, 32, generator=torch.Generator().manual_seed(1))
    pad = torch.ones(b, t, dtype=torch.bool)
    pad[1, : min(3, prompt - 1)] = False  # left padding, inside the prompt
    pad[2, : min(7, prompt - 1)] = False
    x = x * pad[:, :, None]
    with torch.no_grad():
        want = definition(layer, x, pad)
        full, _ = layer(x, pad_mask=pad)
        state = layer.init_state(b, device=torch.device("cpu"), dtype=torch.float32)
        assert state.k.shape[2] == WINDOW + 1 + buffer  # the buffer is allocated at the requested size
        first, _ = layer(x[:, :prompt], pad_mask=pad[:, :prompt], state=state)
        steps = [layer(x[:, i : i + 1], state=state)[0] for i in range(prompt, t)]
    cached = torch.cat([first, *steps], dim=1)
    torch.testing.assert_close(full[pad], want[pad], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[pad], want[pad], rtol=1e-4, atol=1e-4)


def test_policies_keep_different_tokens() -> None:
    """The scores differ between policies (a guard against a hook that ignores the policy)."""
    layer = make_layer()
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(2))
    outs = {}
    with torch.no_grad():
        for policy in ("learned", "window", "random", "key_norm", "delta_write", "h2o", "tova", "oracle"):
            layer.set_eviction(Eviction(policy), 4)
            outs[policy] = layer(x)[0]
    names = list(outs)
    for i, a in enumerate(names):
        for c in names[i + 1 :]:
            assert not torch.allclose(outs[a], outs[c]), (a, c)


def test_random_scores_are_a_function_of_seed_layer_head_and_position() -> None:
    pos = torch.arange(4096)
    s = random_scores(0, 1, 2, pos)
    assert s.shape == (4096, 2) and s.dtype == torch.float32
    assert (s > 0).all() and (s <= 1).all() and abs(float(s.mean()) - 0.5) < 0.02
    assert torch.equal(random_scores(0, 1, 2, pos[1000:1001]), s[1000:1001])  # one decode position = the prefill's
    assert not torch.equal(s[:, 0], s[:, 1])  # heads
    for other in (random_scores(1, 1, 2, pos), random_scores(0, 2, 2, pos)):  # seeds, layers
        assert float((other == s).float().mean()) < 0.01


def test_key_norm_prefers_small_keys() -> None:
    k = torch.zeros(1, 3, 1, 4)
    k[0, :, 0, 0] = torch.tensor([3.0, 0.5, 1.0])
    score = Eviction("key_norm").scores(torch.zeros(1, 3, 1), k, torch.arange(3))
    assert score.flatten().argsort(descending=True).tolist() == [1, 2, 0] and (score > 0).all()


def test_delta_write_scores_what_the_memory_cannot_predict() -> None:
    """By hand: a repeated (key, value) pair scores less each time (the memory has learnt it), a new value at the
    same key scores high again, a pad writes nothing; the kernels continue a memory as the definition does."""
    k = torch.zeros(1, 6, 1, 4)
    v = torch.zeros(1, 6, 1, 4)
    k[0, :, 0, 0] = 2.0  # one direction; its norm does not matter (unit keys)
    v[0, :, 0, 0] = torch.tensor([1.0, 1, 1, 0, 0, 0])
    v[0, :, 0, 1] = torch.tensor([0.0, 0, 0, 1, 1, 1])
    pad = torch.tensor([[True, True, True, True, False, True]])
    want = delta_write_scores_ref(k, v, pad).flatten()
    # beta = 1/2: writes of 1/2, 1/4, 1/8 of the same value; then a new value at the key that holds 7/8 of the old
    assert torch.allclose(want[:3], torch.tensor([0.5, 0.25, 0.125]), atol=1e-6)
    assert torch.isclose(want[3], 0.5 * torch.tensor(1 + 49 / 64).sqrt())
    assert torch.isclose(want[4], want[3] / 2) and want[5] == want[4]  # the pad (4) wrote nothing
    fast = Eviction("delta_write").scores(None, k, torch.arange(6), v=v, pad_mask=pad)
    torch.testing.assert_close(fast[pad].flatten(), want[pad.flatten()])  # a pad's score is never read (-inf)
    # Random keys and values, GQA-shaped, a prompt then single tokens into one memory, against the definition.
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 70, 3, 8, generator=g), torch.randn(2, 70, 3, 8, generator=g)
    pad = torch.ones(2, 70, dtype=torch.bool)
    pad[1, :5] = False
    memory = torch.zeros(2, 3, 8, 8)
    parts = [delta_write_scores(k[:, :65], v[:, :65], pad[:, :65], memory)]  # longer than one chunk of 64
    parts += [delta_write_scores(k[:, i : i + 1], v[:, i : i + 1], None, memory) for i in range(65, 70)]
    torch.testing.assert_close(torch.cat(parts, 1)[pad], delta_write_scores_ref(k, v, pad)[pad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [2, 4], ids=["mha", "gqa"])
def test_oracle_is_full_attention_with_an_unbounded_buffer_and_window_attention_with_none(heads: int) -> None:
    layer = make_layer(heads=heads)
    b, t = 2, 30
    x = torch.randn(b, t, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        layer.set_eviction(Eviction("oracle"), t)
        unbounded = layer(x)[0]
        q, k, v = layer._project(x)
        q, k = layer.rotary(q, k, torch.arange(t))
        g = heads // 2
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2),
            is_causal=True,
        )  # fmt: skip
        torch.testing.assert_close(unbounded, layer.o_proj(o.transpose(1, 2).flatten(2)), rtol=1e-5, atol=1e-5)
        layer.set_eviction(Eviction("oracle"), SINKS)
        none = layer(x)[0]
        layer.set_eviction(Eviction("window"), SINKS)
        torch.testing.assert_close(none, layer(x)[0], rtol=1e-5, atol=1e-5)


def test_oracle_keeps_the_keys_of_largest_attention_weight() -> None:
    """One query, written out: the kept older keys are the sinks and the top weights of the group's query heads."""
    layer = make_layer(heads=4, kv_heads=2)
    t, n = 25, 5
    x = torch.randn(1, t, 32, generator=torch.Generator().manual_seed(4))
    pad = torch.ones(1, t, dtype=torch.bool)
    pad[0, :2] = False
    x = x * pad[:, :, None]
    with torch.no_grad():
        layer.set_eviction(Eviction("oracle"), n)
        got = layer(x, pad_mask=pad)[0]
        q, k, v = layer._project(x)
        q, k = layer.rotary(q, k, torch.arange(t))
        visible = torch.zeros(1, 2, t, t, dtype=torch.bool)
        for i in range(2, t):
            for h in range(2):
                keys = list(range(2, i + 1))  # real keys
                w = sum(torch.softmax(torch.stack([q[0, i, hq] @ k[0, j, h] for j in keys]) / 8**0.5, 0)
                        for hq in (2 * h, 2 * h + 1))  # fmt: skip
                weight = dict(zip(keys, w.tolist()))
                older = [j for j in keys if j < i - WINDOW]
                older.sort(key=lambda j: (j >= 2 + SINKS, -weight[j], j))  # sinks first
                for j in [*older[:n], *(j for j in keys if i - j <= WINDOW)]:
                    visible[0, h, i, j] = True
        want = layer.o_proj(dense_attention(q, k, v, visible).flatten(2))
    torch.testing.assert_close(got[pad], want[pad], rtol=1e-5, atol=1e-5)


def test_oracle_has_no_decode_cache() -> None:
    layer = make_layer()
    layer.set_eviction(Eviction("oracle"), 8)
    state = layer.init_state(1, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="oracle policy reads every key"):
        layer(torch.randn(1, 4, 32), state=state)


def test_model_set_eviction_resizes_the_cache() -> None:
    config = HybridConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        mixers=["gdn", "lte"],
        gdn={"num_heads": 2},
        lte={"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "window_size": 8, "buffer_size": 16, "sink_size": 2,
             "conv_dilation": [1, 1, 1]},
    )  # fmt: skip
    model = HybridForCausalLM(config).eval()
    base = model.allocate_cache(3).nbytes()
    model.set_eviction("random", buffer_size=48, seed=1)
    layer = model.model.layers[1].attn
    assert layer.eviction == Eviction("random", seed=1, layer=1) and layer.buffer_size == 48
    # 32 more slots per (row, kv head): key and value (8 fp32 each), score (fp32), valid (bool), position (int32).
    assert model.allocate_cache(3).nbytes() - base == 3 * 2 * 32 * (2 * 8 * 4 + 4 + 1 + 4)
    model.set_eviction()
    assert model.allocate_cache(3).nbytes() == base and layer.eviction == Eviction(layer=1)
    with pytest.raises(ValueError, match="must be >= sink_size"):
        model.set_eviction("window", buffer_size=1)
    with pytest.raises(ValueError, match="eviction policy must be one of"):
        model.set_eviction("h3o")
    with pytest.raises(ValueError, match="no LTE or full-attention layer"):
        HybridForCausalLM(HybridConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, gdn={"num_heads": 2}))\
            .set_eviction("window")  # fmt: skip


def test_visible_keys_by_hand() -> None:
    """Window 1, buffer 3, one sink: sinks first, then high scores, ties to the earlier key, never a pad or a
    non-positive score."""
    raw = torch.tensor([9.0, 0.5, 0.2, -1.0, 0.5, 0.7, 0.5, 0.1, 0.3])[None, :, None]
    pad = torch.tensor([[False, True, True, True, True, True, True, True, True]])
    visible = visible_keys(raw, pad, window=1, buffer_size=3, sink_size=1)[0, 0]
    assert visible[8].nonzero().flatten().tolist() == [1, 4, 5, 7, 8]  # sink 1, 0.7 at 5, 0.5 at 4 (not 6), band
    assert visible[4].nonzero().flatten().tolist() == [1, 2, 3, 4]  # older: sink 1, 0.2 at 2; band 3..4
    assert visible[0].nonzero().flatten().tolist() == []  # a pad sees nothing but pads


def test_model_decode_equals_its_full_forward_under_each_policy() -> None:
    """Through `set_eviction` on a 2-LTE-layer model: prefill + decode logits equal the full forward's."""
    config = HybridConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        mixers=["lte", "gdn", "lte"],
        gdn={"num_heads": 2},
        lte={"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "window_size": 4, "buffer_size": 16, "sink_size": 2,
             "conv_size": [3], "conv_dilation": [1], "router_bias_init": 0.0, "dropout_prob": 0.0},
    )  # fmt: skip
    torch.manual_seed(0)
    model = HybridForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :4] = 0
    for policy in ("learned", "window", "random", "key_norm", "delta_write", "h2o", "tova", "snapkv"):
        model.set_eviction(policy, buffer_size=6, seed=2, prompt_len=12)
        with torch.no_grad():
            full = model(ids, attention_mask=mask).logits
            out = model(ids[:, :12], attention_mask=mask[:, :12], use_cache=True)
            steps = [out.logits]
            for i in range(12, 40):
                steps.append(model(ids[:, i : i + 1], cache=out.cache).logits)
        real = mask.bool()
        torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-4, atol=1e-4, msg=policy)


def test_simulate_visible_keys_by_hand() -> None:
    """Window 1, buffer 1, no sinks, head dim 1 (logit = q * k): key 0 takes the mass of the early queries, key 1
    that of query 2. When key 1 leaves the window (step 3), h2o keeps key 0 (more mass so far), tova takes key 1
    (query 2 gave it more weight)."""
    q = torch.tensor([1.0, 1.0, -1.0, -1.0])[None, :, None, None]
    k = torch.tensor([5.0, -5.0, 0.0, 0.0])[None, :, None, None]
    sizes = dict(window=1, buffer_size=1, sink_size=0)
    h2o = simulate_visible_keys(q, k, None, policy="h2o", **sizes)[0, 0]
    tova = simulate_visible_keys(q, k, None, policy="tova", **sizes)[0, 0]
    assert h2o[2].nonzero().flatten().tolist() == tova[2].nonzero().flatten().tolist() == [0, 1, 2]
    assert h2o[3].nonzero().flatten().tolist() == [0, 2, 3]
    assert tova[3].nonzero().flatten().tolist() == [1, 2, 3]
    pad = torch.tensor([[False, True, True, True]])
    sink = simulate_visible_keys(q, k, pad, policy="tova", window=1, buffer_size=1, sink_size=1)[0, 0]
    assert sink[3].nonzero().flatten().tolist() == [1, 2, 3]  # the sink (key 1) is kept, the pad never seen
    assert sink[0].nonzero().flatten().tolist() == []


def make_attention(heads: int = 4, kv_heads: int = 2) -> Attention:
    torch.manual_seed(0)
    return Attention(32, heads, kv_heads, 8).eval()


def attention_definition(layer: Attention, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """A full-attention layer under a policy, from the brute-force visible set (as `definition`, without a router)."""
    t = x.shape[1]
    q, k, v = layer._project(x)
    if layer.eviction.policy == "delta_write":
        raw = delta_write_scores_ref(k, v, pad)
    else:
        raw = layer.eviction.scores(None, k, torch.arange(t))
    q, k = layer.rotary(q, k, torch.arange(t))
    sizes = dict(window=WINDOW, buffer_size=layer.buffer_size, sink_size=SINKS)
    if layer.eviction.attention_scored:
        visible = simulate_visible_keys(q, k, pad, policy=layer.eviction.policy, **sizes)
    elif layer.eviction.policy == "snapkv":
        visible = snapkv_visible_keys(q, k, pad, prompt=layer.eviction.prompt_len, **sizes)
    else:
        visible = visible_keys(raw, pad, **sizes)
    return layer.o_proj(dense_attention(q, k, v, visible).flatten(2))


@pytest.mark.parametrize("policy", ["window", "random", "key_norm", "delta_write", "h2o", "tova", "snapkv"])
@pytest.mark.parametrize("buffer", [SINKS, 4, 12])
@pytest.mark.parametrize("prompt", [1, 9, 20])
@pytest.mark.parametrize("heads", [2, 4], ids=["mha", "gqa"])
def test_full_attention_layer_under_a_policy_equals_the_definition(
    policy: str, buffer: int, prompt: int, heads: int
) -> None:
    layer = make_attention(heads=heads)
    layer.set_eviction(
        Eviction(policy, seed=3, layer=1, prompt_len=prompt), window=WINDOW, buffer_size=buffer, sink_size=SINKS
    )
    b, t = 3, 30
    x = torch.randn(b, t, 32, generator=torch.Generator().manual_seed(1))
    pad = torch.ones(b, t, dtype=torch.bool)
    pad[1, : min(3, prompt - 1)] = False
    pad[2, : min(7, prompt - 1)] = False
    x = x * pad[:, :, None]
    with torch.no_grad():
        want = attention_definition(layer, x, pad)
        full, _ = layer(x, pad_mask=pad)
        state = layer.init_state(b, device=torch.device("cpu"), dtype=torch.float32)
        assert isinstance(state, EvictionState) and state.k.shape[2] == WINDOW + 1 + buffer
        first, _ = layer(x[:, :prompt], pad_mask=pad[:, :prompt], state=state)
        steps = [layer(x[:, i : i + 1], state=state)[0] for i in range(prompt, t)]
    cached = torch.cat([first, *steps], dim=1)
    torch.testing.assert_close(full[pad], want[pad], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[pad], want[pad], rtol=1e-4, atol=1e-4)


def test_full_attention_layer_oracle_and_refusals() -> None:
    layer = make_attention()
    x = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = layer(x)[0]
        layer.set_eviction(Eviction("oracle"), window=WINDOW, buffer_size=30, sink_size=SINKS)
        torch.testing.assert_close(layer(x)[0], dense, rtol=1e-5, atol=1e-5)  # a buffer for every key: no eviction
        layer.set_eviction(Eviction("oracle"), window=WINDOW, buffer_size=SINKS, sink_size=SINKS)
        assert not torch.allclose(layer(x)[0], dense)
    with pytest.raises(ValueError, match="oracle policy reads every key"):
        layer(x, state=layer.init_state(2, device=torch.device("cpu"), dtype=torch.float32))
    with pytest.raises(ValueError, match="needs an LTE router"):
        layer.set_eviction(Eviction("learned"), window=WINDOW, buffer_size=4, sink_size=SINKS)
    with pytest.raises(ValueError, match="sliding-window layer"):
        Attention(32, 4, 2, 8, window_size=4).set_eviction(Eviction("h2o"), window=4, buffer_size=4)
    layer.set_eviction(None)
    assert isinstance(layer.init_state(1, device=torch.device("cpu"), dtype=torch.float32), KVState)


def test_transformer_under_each_policy_decodes_its_full_forward_in_constant_bytes() -> None:
    config = HybridConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        mixers=["attn", "gdn", "attn"],
        gdn={"num_heads": 2},
        attn={"num_heads": 4, "num_kv_heads": 2, "head_dim": 8},
    )
    torch.manual_seed(0)
    model = HybridForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :4] = 0
    with pytest.raises(ValueError, match="no LTE layer"):
        model.set_eviction("learned")
    with pytest.raises(ValueError, match="need a window"):
        model.set_eviction("h2o", buffer_size=6)
    for policy in ("window", "random", "key_norm", "delta_write", "h2o", "tova", "snapkv"):
        model.set_eviction(policy, buffer_size=6, seed=2, window=4, sink_size=2, prompt_len=12)
        with torch.no_grad():
            full = model(ids, attention_mask=mask).logits
            out = model(ids[:, :12], attention_mask=mask[:, :12], use_cache=True)
            before = out.cache.nbytes()
            steps = [out.logits]
            for i in range(12, 40):
                steps.append(model(ids[:, i : i + 1], cache=out.cache).logits)
        assert out.cache.nbytes() == before  # constant: 4 + 1 + 6 slots per (row, kv head)
        real = mask.bool()
        torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-4, atol=1e-4, msg=policy)
    layer = model.model.layers[2].attn
    assert layer.eviction == Eviction("snapkv", seed=2, layer=2, prompt_len=12) and layer.buffer_size == 6
    model.set_eviction(None)
    assert model.model.layers[0].attn.eviction is None


@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_attention_scored_policies_through_the_triton_ops(policy: str) -> None:
    """The decode steps on the Triton ops (interpreted on the CPU: evict, attend and return the weights) equal the
    brute-force definition, as the torch ones do."""
    torch.manual_seed(0)
    layer = Attention(32, 4, 2, 8, backend="triton").eval()
    layer.set_eviction(Eviction(policy), window=WINDOW, buffer_size=4, sink_size=SINKS)
    b, t, prompt = 2, 20, 9
    x = torch.randn(b, t, 32, generator=torch.Generator().manual_seed(1))
    pad = torch.ones(b, t, dtype=torch.bool)
    pad[1, :3] = False
    x = x * pad[:, :, None]
    with torch.no_grad():
        want = attention_definition(layer, x, pad)
        state = layer.init_state(b, device=torch.device("cpu"), dtype=torch.float32)
        first, _ = layer(x[:, :prompt], pad_mask=pad[:, :prompt], state=state)
        steps = [layer(x[:, i : i + 1], state=state)[0] for i in range(prompt, t)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1)[pad], want[pad], rtol=1e-4, atol=1e-4)
