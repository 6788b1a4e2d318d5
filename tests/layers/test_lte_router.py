"""LTE router: grouped CNN vs a per-head loop, padding, sinks, the straight-through gradient, streaming scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hlsa.layers.lte_router import LTERouter, select, sink_mask, value_gain
from hlsa.layers.slots import fill_ring

CONFIGS = {  # name -> (conv_size, conv_dilation)
    "default": ((3, 3, 3), (2, 2, 2)),
    "mixed": ((5, 3), (1, 3)),
    "pointwise": ((1,), (1,)),
}


def _router(H: int, D: int, config: str = "default", **kwargs: object) -> LTERouter:
    conv_size, conv_dilation = CONFIGS[config]
    router = LTERouter(H, D, conv_size=conv_size, conv_dilation=conv_dilation, **kwargs)
    with torch.no_grad():  # non-trivial biases, so that a wrong bias slice or a missing mask shows
        for conv in router.conv_stack.convs:
            conv.bias.normal_(0.0, 0.5)
        router.conv_stack.proj.bias.normal_(0.0, 0.5)
    return router.eval()


def _left_pad_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] >= torch.tensor([T - n for n in lengths])[:, None]


def _per_head_reference(router: LTERouter, k: torch.Tensor, v: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """Each head through its own small CNN (PyTorch's 'same' padding), with weights sliced from the grouped convs."""
    x = torch.cat([k, v], dim=-1)
    mask = pad_mask.to(x.dtype)[:, None, :]
    logits = []
    for h in range(x.shape[2]):
        g = 0 if router.routing_shared == "layer" else h
        xh = x[:, :, h, :].transpose(1, 2) * mask  # [B, 2D, T]
        for conv in router.conv_stack.convs:
            c_out = conv.out_channels // conv.groups
            w, b = conv.weight[g * c_out : (g + 1) * c_out], conv.bias[g * c_out : (g + 1) * c_out]
            xh = F.silu(F.conv1d(xh, w, b, padding="same", dilation=conv.dilation) * mask)
        proj = router.conv_stack.proj
        logits.append(F.conv1d(xh, proj.weight[g : g + 1], proj.bias[g : g + 1])[:, 0])
    logits = torch.stack(logits, dim=-1)  # [B, T, H]
    return torch.sigmoid(logits) - 0.5 if router.routing_method == "sigmoid" else torch.relu(logits)


@pytest.mark.parametrize("shared", ["head", "layer"])
@pytest.mark.parametrize("method", ["sigmoid", "relu"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("H,D,T", [(1, 4, 7), (3, 8, 19), (2, 16, 2)], ids=["H1-D4-T7", "H3-D8-T19", "H2-D16-T2"])
def test_router_equals_per_head_loop(shared: str, method: str, config: str, H: int, D: int, T: int) -> None:
    router = _router(H, D, config, routing_method=method, routing_shared=shared).double()
    k = torch.randn(3, T, H, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, T, H, D, dtype=torch.float64, requires_grad=True)
    pad_mask = _left_pad_mask([T, max(T - 2, 1), 1], T)
    score = router(k, v, pad_mask=pad_mask)
    ref = _per_head_reference(router, k, v, pad_mask)
    assert score.shape == (3, T, H)
    torch.testing.assert_close(score, ref, rtol=1e-10, atol=1e-12)
    inputs = [k, v, *router.parameters()]
    g = torch.randn_like(score)
    grads = torch.autograd.grad(score, inputs, g)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shared", ["head", "layer"])
def test_left_padded_rows_equal_unpadded_rows(shared: str) -> None:
    H, D, T = 2, 8, 17
    router = _router(H, D, routing_shared=shared)
    lengths = [17, 12, 5, 1]
    k, v = torch.randn(len(lengths), T, H, D), torch.randn(len(lengths), T, H, D)  # garbage at the pads
    score = router(k, v, pad_mask=_left_pad_mask(lengths, T))
    for b, n in enumerate(lengths):
        alone = router(k[b : b + 1, T - n :], v[b : b + 1, T - n :])
        torch.testing.assert_close(score[b, T - n :], alone[0], rtol=1e-5, atol=1e-6)


def _select_reference(score: torch.Tensor, pad_mask: torch.Tensor, sink_size: int) -> torch.Tensor:
    """The authors' rule: sinks at `[offset, offset + s)` with `offset` the first real token, then `& pad_mask`."""
    selected = score > 0
    for b in range(score.shape[0]):
        offset = int(pad_mask[b].int().argmax())
        selected[b, offset : offset + sink_size] = True
    return selected & pad_mask[:, :, None]


@pytest.mark.parametrize("sink_size", [0, 1, 4, 9])
def test_select_matches_the_authors_rule(sink_size: int) -> None:
    T = 8
    score = torch.randn(5, T, 3)
    pad_mask = _left_pad_mask([8, 6, 3, 1, 0], T)
    selected = select(score, pad_mask, sink_size)
    assert selected.dtype == torch.bool and selected.shape == (5, T, 3)
    assert torch.equal(selected, _select_reference(score, pad_mask, sink_size))


def test_select_explicit_cases() -> None:
    score = torch.full((2, 6, 1), -1.0)
    score[0, 0, 0] = 2.0  # a positive score at a pad is never selected
    score[1, 5, 0] = 0.5
    pad_mask = _left_pad_mask([4, 6], 6)
    selected = select(score, pad_mask, 2)[..., 0]
    assert selected.tolist() == [[False, False, True, True, False, False], [True, True, False, False, False, True]]
    assert sink_mask(_left_pad_mask([2], 6), 4).tolist() == [[False] * 4 + [True] * 2]  # row shorter than s
    assert select(score, None, 1)[..., 0].tolist() == [[True] + [False] * 5, [True] + [False] * 4 + [True]]
    assert torch.equal(select(score, pad_mask, 0, enabled=False), pad_mask[:, :, None])  # L1 warm-up: every real token


def test_value_gain_equals_the_explicit_gain_exactly() -> None:
    # Dyadic values make every sum exact, so both formulations must give bit-identical gradients.
    v = (torch.randint(-64, 64, (2, 5, 3, 4)) / 16).double().requires_grad_()
    score = (torch.randint(-4, 4, (2, 5, 3)) / 8).double().requires_grad_()
    g = torch.randint(-64, 64, (2, 5, 3, 4)).double() / 32
    out = value_gain(v, score)
    assert torch.equal(out, v)
    grads = torch.autograd.grad(out, [v, score], g)
    ref = torch.autograd.grad(v * (1 + score - score.detach())[..., None], [v, score], g)
    assert torch.equal(grads[0], ref[0]) and torch.equal(grads[1], ref[1])
    assert torch.equal(grads[1], (g * v).sum(-1))


def test_centred_value_gain_removes_the_mean_over_real_positions() -> None:
    v = torch.randn(2, 7, 3, 4, dtype=torch.float64, requires_grad=True)
    score = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    pad_mask = _left_pad_mask([7, 4], 7)
    (gv, gs) = torch.autograd.grad(value_gain(v, score, centered=True, pad_mask=pad_mask), [v, score], g)
    assert torch.equal(gv, g)
    plain = (g * v).sum(-1).detach()
    for b, n in enumerate([7, 4]):
        real = plain[b, 7 - n :]
        torch.testing.assert_close(gs[b, 7 - n :], real - real.mean(0))
        assert (gs[b, : 7 - n] == 0).all()  # pads get nothing
    (gs_all,) = torch.autograd.grad(value_gain(v, score, centered=True), [score], g)
    torch.testing.assert_close(gs_all, plain - plain.mean(1, keepdim=True))
    assert gs_all.sum(1).abs().max() < 1e-12  # no push on the level of every score of a row and head


def test_value_gain_reaches_the_router_parameters() -> None:
    router = _router(2, 4)
    k, v = torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4, requires_grad=True)
    score = router(k, v)
    g = torch.randn(1, 6, 2, 4)
    value_gain(v, score).backward(g)
    ref_router = _router(2, 4)
    ref_router.load_state_dict(router.state_dict())
    ref_score = ref_router(k, v)
    (v * (1 + ref_score - ref_score.detach())[..., None]).backward(g)
    for p, q in zip(router.parameters(), ref_router.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])  # "triton" runs interpreted on CPU (tests/conftest.py)
@pytest.mark.parametrize("shared", ["head", "layer"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize(("P", "extra"), [(0, 0), (3, 2), (20, 0), (20, 2)])
@torch.no_grad()  # decode scoring has no gradient
def test_score_step_equals_full_forward(backend: str, shared: str, config: str, P: int, extra: int) -> None:
    """As the LTE prefill does: the last R positions of a P-token prompt go into the ring through `ring_inputs` run
    on just those, then T tokens are decoded through `score_step`. Every score equals the full forward's for the
    token it scores. Rows: no pads, pads inside the window, a prompt of pads; rings of 2m+1 slots and longer."""
    H, D, T = 3, 8, 16
    router = _router(H, D, config, routing_shared=shared)
    m = router.margin
    R = 2 * m + 1 + extra
    pad_mask = _left_pad_mask([P + T, P + T - min(2, P), T], P + T)
    x = torch.randn(3, P + T, H, 2 * D)
    x = torch.where(pad_mask[:, :, None, None], x, 100 * x)  # garbage at the pads: must be ignored
    k, v = x.split(D, dim=-1)
    full = router(k, v, pad_mask=pad_mask)
    ring = torch.randn(3, H, R, router.ring_channels) * 100  # garbage in slots never written
    valid = torch.zeros(3, 1, R, dtype=torch.bool)
    tail = slice(max(0, P - R), P)
    fill_ring(ring, router.ring_inputs(k[:, tail], v[:, tail], pad_mask=pad_mask[:, tail]), start=tail.start)
    fill_ring(valid, pad_mask[:, :P, None])
    steps = [router.score_step(x[:, p], ring, valid[:, 0], torch.tensor(p), backend=backend) for p in range(P, P + T)]
    scored = torch.arange(P, P + T) - m  # the token each step scores
    ok = scored >= 0
    got, want = torch.stack(steps, 1)[:, ok], full[:, scored[ok]]
    real = pad_mask[:, scored[ok], None].expand_as(want)  # a pad's score is meaningless (the layer masks it)
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-6)


def test_eval_is_deterministic_and_training_drops_out() -> None:
    router = _router(2, 8, dropout_prob=0.5)
    k, v = torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    assert torch.equal(router(k, v), router(k, v))
    router.train()
    assert not torch.equal(router(k, v), router(k, v))


@pytest.mark.parametrize("routing_grad", [True, False])
def test_routing_grad(routing_grad: bool) -> None:
    router = _router(2, 4, routing_grad=routing_grad)
    k, v = torch.randn(1, 7, 2, 4, requires_grad=True), torch.randn(1, 7, 2, 4, requires_grad=True)
    router(k, v).sum().backward()
    assert all(p.grad is not None for p in router.parameters())
    assert (k.grad is not None and k.grad.abs().sum() > 0) == routing_grad
    assert (v.grad is not None and v.grad.abs().sum() > 0) == routing_grad


def test_receptive_field_and_margin() -> None:
    assert (LTERouter(2, 4).receptive_field, LTERouter(2, 4).margin) == (13, 6)
    router = LTERouter(2, 4, conv_size=(5, 3), conv_dilation=(1, 2))
    assert (router.receptive_field, router.margin) == (9, 4)


def test_init() -> None:
    router = LTERouter(16, 64)
    stack = router.conv_stack
    assert torch.equal(stack.proj.bias, torch.full((16,), 0.5))
    for conv in [*stack.convs, stack.proj]:
        fan_in = conv.weight[0].numel()
        assert torch.isfinite(conv.weight).all() and (conv.weight != 0).all()
        assert abs(conv.weight.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.15  # kaiming normal, relu gain
    for conv in stack.convs:  # PyTorch's default uniform bias
        bound = 1 / conv.weight[0].numel() ** 0.5
        assert conv.bias.abs().max() <= bound and conv.bias.std() > bound / 4
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
    router.reset_parameters()
    assert torch.equal(stack.proj.bias, torch.full((16,), 0.5)) and (stack.convs[0].weight != 0).all()


# Shapes of `model.layers.1.attn.router.*` in the authors' checkpoints (Conv2d weights `[C_out, C_in/groups, 1, k]`).
AUTHORS_SHAPES = {
    "0.4B": (
        16,
        {"convs.0": [1024, 128, 1, 3], "convs.1": [512, 64, 1, 3], "convs.2": [256, 32, 1, 3], "proj": [16, 16, 1, 1]},
    ),
    "1.4B": (
        8,
        {"convs.0": [512, 128, 1, 3], "convs.1": [256, 64, 1, 3], "convs.2": [128, 32, 1, 3], "proj": [8, 16, 1, 1]},
    ),
}


@pytest.mark.parametrize("model", list(AUTHORS_SHAPES))
def test_parameter_names_and_shapes_match_the_authors_checkpoints(model: str) -> None:
    num_kv_heads, shapes = AUTHORS_SHAPES[model]
    with torch.device("meta"):
        router = LTERouter(num_kv_heads, 64)
    expected = {}
    for name, shape in shapes.items():
        expected[f"conv_stack.{name}.weight"] = [shape[0], shape[1], shape[3]]  # the converter squeezes the 1
        expected[f"conv_stack.{name}.bias"] = [shape[0]]
    assert {n: list(p.shape) for n, p in router.named_parameters()} == expected


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"routing_shared": "all"}, "routing_shared must be one of"),
        ({"routing_method": "softmax"}, "routing_method must be one of"),
        ({"conv_size": (3, 4), "conv_dilation": (1, 1)}, "odd"),
        ({"conv_size": (3,), "conv_dilation": (1, 1)}, "one entry per conv"),
        ({"conv_dilation": (2, 0, 2)}, "conv_dilation"),
        ({"dropout_prob": 1.0}, "dropout_prob"),
        ({"head_dim": 2}, "head_dim"),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    kwargs = {"num_kv_heads": 2, "head_dim": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        LTERouter(**kwargs)


@torch.no_grad()
def test_input_errors() -> None:
    router = _router(2, 4)
    k = torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match="k and v"):
        router(k, torch.randn(1, 5, 2, 3))
    with pytest.raises(ValueError, match="pad_mask"):
        router(k, k, pad_mask=torch.ones(1, 5))
    kv, ring, valid, zero = (
        torch.randn(1, 2, 8),
        torch.randn(1, 2, 13, 14),
        torch.ones(1, 13, dtype=torch.bool),
        torch.tensor(0),
    )
    with pytest.raises(ValueError, match="x_ring"):  # a ring shorter than the receptive field (13)
        router.score_step(kv, ring[:, :, :12], valid[:, :12], zero)
    with pytest.raises(ValueError, match="x_ring"):  # 14 = 8 + 4 + 2 channels: every conv's input
        router.score_step(kv, ring[..., :8], valid, zero)
    with pytest.raises(ValueError, match="kv must have shape"):
        router.score_step(kv[..., :6], ring, valid, zero)
    with pytest.raises(ValueError, match="valid"):
        router.score_step(kv, ring, valid.float(), zero)
    with pytest.raises(ValueError, match="position"):
        router.score_step(kv, ring, valid, zero.float())
    with pytest.raises(ValueError, match="sink_size"):
        select(torch.randn(1, 5, 2), None, -1)
    with pytest.raises(ValueError, match="score"):
        select(torch.randn(1, 5), None, 1)
    with pytest.raises(ValueError, match="pad_mask"):
        select(torch.randn(1, 5, 2), torch.ones(1, 4, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="score"):
        value_gain(torch.randn(1, 5, 2, 4), torch.randn(1, 5, 4))


@pytest.mark.parametrize("bias", [0.5, -1.0])
def test_bias_init_sets_where_selection_starts(bias: float) -> None:
    """The authors' +0.5 keeps most tokens at first (training attends to them all); a negative bias starts with
    only the sinks (training starts as SWA), and `reset_parameters` keeps the configured bias."""
    torch.manual_seed(0)
    router = LTERouter(2, 8, bias_init=bias, dropout_prob=0.0)
    router.reset_parameters()
    assert torch.equal(router.conv_stack.proj.bias, torch.full((2,), bias))
    k, v = torch.randn(2, 64, 2, 8) * 0.1, torch.randn(2, 64, 2, 8) * 0.1
    kept = select(router(k, v), None, sink_size=2)[:, 2:].float().mean()
    assert (kept > 0.9) if bias > 0 else (kept < 0.1)


def test_relu_routing_needs_a_positive_bias() -> None:
    from hlsa.config import HybridConfig

    base = {
        "num_hidden_layers": 1,
        "mixers": ["lte"],
        "lte": {"num_heads": 2, "num_kv_heads": 2, "head_dim": 8, "window_size": 16},
    }
    assert HybridConfig(**base).lte["router_bias_init"] == 0.5  # the authors' default
    with pytest.raises(ValueError, match="router_bias_init must be > 0 with routing_method 'relu'"):
        HybridConfig(**{**base, "lte": {**base["lte"], "routing_method": "relu", "router_bias_init": -1.0}})


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "bf16-autocast"])
def test_bf16_inputs_are_scored_in_fp32(autocast):
    """bf16 keys and values (and bf16 weights) are scored as their exact float32 values are by a float32 router, also
    under bf16 autocast (the trainer's GPU mode), in a whole sequence and in streaming decode."""
    torch.manual_seed(0)
    half = _router(2, 8).to(torch.bfloat16)
    full = _router(2, 8)
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    k, v = (torch.randn(2, 30, 2, 8).bfloat16() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = half(k, v)
    want = full(k.float(), v.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.0, atol=1e-6)

    assert half.ring_inputs(k, v).dtype == torch.float32
    p = 20
    x_ring = torch.zeros(2, 2, 2 * half.margin + 1, half.ring_channels)
    valid = torch.zeros(2, 2 * half.margin + 1, dtype=torch.bool)
    want = full(k[:, :p].float(), v[:, :p].float())
    for pos in range(p):
        kv = torch.cat([k[:, pos], v[:, pos]], dim=-1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            score = half.score_step(kv, x_ring, valid, torch.tensor(pos))
        assert score.dtype == torch.float32
        if pos >= half.margin:  # token pos - margin now has its full right context
            torch.testing.assert_close(score, want[:, pos - half.margin], rtol=0.0, atol=1e-5)
