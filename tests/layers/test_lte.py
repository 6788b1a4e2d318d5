"""The LTE layer's attention pattern equals a brute-force per-(query, key) rule, in training and at inference, and its
cached decode on the Triton ops equals its decode on the reference ops."""

import pytest
import torch

from hlsa.layers.lte import LTEAttention


def make_layer(
    window, *, heads=4, kv_heads=2, head_dim=8, buffer=5, sinks=2, conv=(3,), dilation=(1,), train_selection="positive"
):
    torch.manual_seed(0)
    layer = LTEAttention(
        32,
        heads,
        kv_heads,
        head_dim,
        window_size=window,
        buffer_size=buffer,
        sink_size=sinks,
        conv_size=conv,
        conv_dilation=dilation,
        dropout_prob=0.0,
        train_selection=train_selection,
    )
    torch.nn.init.normal_(layer.router.conv_stack.proj.bias, 0.0, 1.0)  # mixed-sign scores
    return layer


def brute_force(layer, x, pad, visible_fn):
    """Attention computed one (query, key) pair at a time from the layer's own projections."""
    b, t, _ = x.shape
    q, k, v = layer._project(x)
    q, k = layer.rotary(q, k, torch.arange(t))
    g = layer.num_heads // layer.num_kv_heads
    out = torch.zeros(b, t, layer.num_heads, layer.head_dim)
    for bi in range(b):
        for h in range(layer.num_heads):
            for i in range(t):
                keys = [j for j in range(i + 1) if pad[bi, j] and visible_fn(bi, h // g, i, j)]
                if not keys:
                    continue
                s = torch.stack([q[bi, i, h] @ k[bi, j, h // g] for j in keys]) * layer.head_dim**-0.5
                p = torch.softmax(s, 0)
                out[bi, i, h] = sum(pj * v[bi, j, h // g] for pj, j in zip(p, keys))
    return layer.o_proj(out.flatten(2))


CASES = [  # (window, conv sizes, T)
    (1, (1,), 19),
    (7, (3, 3), 37),
    (64, (3, 3, 3), 70),
]


@pytest.mark.parametrize("window, conv, t", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("gqa", [1, 2])
def test_training_mask_matches_brute_force(window, conv, t, gqa):
    layer = make_layer(window, heads=2 * gqa, kv_heads=2, conv=conv, dilation=(1,) * len(conv)).train()
    x = torch.randn(2, t, 32)
    pad = torch.ones(2, t, dtype=torch.bool)
    pad[1, :5] = False  # left padding
    x = x * pad[:, :, None]
    y, routing = layer(x, pad_mask=pad)
    sel = routing.selected
    # Sinks: the first 2 real tokens of every row, whatever their score.
    assert sel[0, :2].all() and sel[1, 5:7].all() and not sel[1, :5].any()

    def visible(b, h, i, j):
        return i - j <= window or bool(sel[b, j, h])

    expected = brute_force(layer, x, pad, visible)
    torch.testing.assert_close(y[pad], expected[pad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, conv, t", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("mode", ["eval", "train_buffer"])
def test_inference_rule_matches_brute_force(window, conv, t, mode):
    """Eval mode, and training with `train_selection="buffer"`, both follow the per-query top-N buffer rule."""
    layer = make_layer(window, conv=conv, dilation=(1,) * len(conv), buffer=4, train_selection="buffer")
    layer.train(mode == "train_buffer")
    x = torch.randn(2, t, 32)
    pad = torch.ones(2, t, dtype=torch.bool)
    pad[0, :3] = False
    x = x * pad[:, :, None]
    y, routing = layer(x, pad_mask=pad)
    if mode == "train_buffer":  # the router still learns through the value gain
        y[pad].square().sum().backward()
        assert layer.router.conv_stack.proj.weight.grad.abs().sum() > 0
    y = y.detach()
    with torch.no_grad():
        ranked = layer.inference_scores(routing.score, pad)  # sinks +inf, pads -inf

        def visible(b, h, i, j):
            if i - j <= window:
                return True
            older = ranked[b, : i - window, h]  # keys j' < i - W
            order = sorted(range(len(older)), key=lambda jj: (-float(older[jj]), jj))  # ties: earlier first
            kept = [jj for jj in order[: layer.buffer_size] if older[jj] > 0]
            return j in kept

        expected = brute_force(layer, x, pad, visible)
    torch.testing.assert_close(y[pad], expected[pad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train_selection", ["positive", "buffer"])
def test_routing_disabled_is_full_causal_in_training(train_selection):
    layer = make_layer(1, conv=(1,), train_selection=train_selection).train()
    layer.routing_enabled = False
    x = torch.randn(1, 15, 32)
    y, _ = layer(x)
    expected = brute_force(layer, x, torch.ones(1, 15, dtype=torch.bool), lambda *_: True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_window_must_cover_router_margin():
    with pytest.raises(ValueError, match="must be >= the router margin"):
        make_layer(2, conv=(3, 3), dilation=(2, 2))


def test_train_selection_must_be_known():
    with pytest.raises(ValueError, match="train_selection must be 'positive' or 'buffer'"):
        make_layer(4, train_selection="topk")


@pytest.mark.parametrize(("conv", "dilation"), [((1,), (1,)), ((3, 3), (1, 2))], ids=["pointwise", "mixed"])
def test_triton_decode_matches_reference_decode(conv, dilation):
    """Prefill then token-by-token decode through the Triton ops (interpreted on the CPU) against the same layer on the
    reference ops: every output, and at the end the whole cache. Row 1's pads end inside the window, row 2's inside
    the router's last `margin` prompt positions (3 for "mixed"), so its first decode steps score a pad, then sinks;
    "pointwise" (margin 0) scores each new token in the slot the eviction has just freed."""
    ref = make_layer(6, buffer=4, conv=conv, dilation=dilation).eval()
    tri = make_layer(6, buffer=4, conv=conv, dilation=dilation).eval()
    tri.backend = "triton"
    tri.load_state_dict(ref.state_dict())
    b, p, t = 3, 10, 12
    x = torch.randn(b, p + t, 32, generator=torch.Generator().manual_seed(1))
    pad = torch.ones(b, p, dtype=torch.bool)
    pad[1, :3] = False
    pad[2, :8] = False
    states = [layer.init_state(b, device="cpu", dtype=torch.float32) for layer in (ref, tri)]
    with torch.no_grad():
        (y_ref, _), (y_tri, _) = (layer(x[:, :p], pad_mask=pad, state=s) for layer, s in zip((ref, tri), states))
        torch.testing.assert_close(y_tri[pad], y_ref[pad], rtol=1e-4, atol=1e-4)
        for i in range(p, p + t):
            (y_ref, r_ref), (y_tri, r_tri) = (layer(x[:, i : i + 1], state=s) for layer, s in zip((ref, tri), states))
            torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(r_tri.score, r_ref.score, rtol=1e-4, atol=1e-4)
    want, got = states
    for name in ("valid", "buffer_len", "token_pos", "router_valid", "position"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.score.isinf(), want.score.isinf()) and (want.score == float("inf")).any()
    for name in ("k", "v", "score", "router_x"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4)


def test_bf16_layer_selects_what_fp32_selects():
    """Scores just above zero (logits in (0, 8e-3), where bf16's `sigmoid(x) - 0.5` is exactly 0) are selected in a
    bf16 layer as in fp32, in training, in prefill and in each decode step, and scores are float32 throughout."""
    layer = make_layer(8, buffer=4, conv=(3, 3), dilation=(1, 1)).eval()
    proj = layer.router.conv_stack.proj
    with torch.no_grad():
        proj.weight.normal_(0.0, 1e-4)
        proj.bias.fill_(4e-3)
    half = make_layer(8, buffer=4, conv=(3, 3), dilation=(1, 1)).eval().to(torch.bfloat16)
    half.load_state_dict(layer.state_dict())
    x = torch.randn(2, 40, 32)
    for train in (True, False):
        _, want = layer.train(train)(x)
        _, got = half.train(train)(x.bfloat16())
        assert got.score.dtype == torch.float32
        assert want.selected.all() and torch.equal(got.selected, want.selected)
    p = 20  # prompt, then decode: each step reports the score of token `position - margin`
    state = half.init_state(2, device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        half(x[:, :p].bfloat16(), state=state)
        scores = [half(x[:, i : i + 1].bfloat16(), state=state)[1].score for i in range(p, x.shape[1])]
    assert state.router_x.dtype == torch.float32 and all(s.dtype == torch.float32 for s in scores)
    assert all(bool((s > 0).all()) for s in scores)


def test_bf16_router_matches_fp32_on_mixed_scores():
    """Mixed-sign scores: a bf16 layer selects the same tokens as the fp32 layer wherever the fp32 score is not
    within bf16 round-off of zero (its keys and values are rounded, so scores that close may flip)."""
    layer = make_layer(8, buffer=4, conv=(3, 3), dilation=(1, 1)).eval()
    half = make_layer(8, buffer=4, conv=(3, 3), dilation=(1, 1)).eval().to(torch.bfloat16)
    half.load_state_dict(layer.state_dict())
    x = torch.randn(2, 64, 32)
    _, want = layer(x)
    _, got = half(x.bfloat16())
    clear = want.score.abs() > 5e-3
    assert clear.float().mean() > 0.9 and (want.score > 0).any() and (want.score < 0).any()
    assert torch.equal(got.selected[clear], want.selected[clear])
    torch.testing.assert_close(got.score, want.score, rtol=0.0, atol=2e-2)


def test_bf16_gdn_lte_logits_as_close_to_fp32_as_gdn_swa():
    """A bf16 model's logits differ from those of the fp32 model with the same (bf16) weights by round-off: for
    GDN+LTE (router scores centred on zero, so many are small) about as much as for GDN+SWA, the same model without
    eviction. The median over three models: the keys and values themselves are rounded, so a score within round-off
    of zero or of a rank tie can still flip one selection and move one model's logits by a few percent."""
    from tests.model.conftest import tiny_model

    errors = {"gdn_swa": [], "gdn_lte": []}
    for seed in range(3):
        ids = torch.randint(0, 512, (2, 96), generator=torch.Generator().manual_seed(seed))
        for arch, errs in errors.items():
            half = tiny_model(arch, seed=seed).to(torch.bfloat16)
            full = tiny_model(arch, seed=seed).to(torch.bfloat16).float()
            with torch.no_grad():
                want, got = full(ids).logits, half(ids).logits.float()
            errs.append(((got - want).norm() / want.norm()).item())
    median = {arch: sorted(errs)[1] for arch, errs in errors.items()}
    assert median["gdn_lte"] < 2 * median["gdn_swa"], errors
