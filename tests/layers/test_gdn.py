"""GatedDeltaNet layer: hand-written forward, prefill + decode through GDNState, left padding, names, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hlsa.layers.gdn import GatedDeltaNet, GDNState
from hlsa.ops.gated_delta import gated_delta_rule_ref

# The attention-layer entries of the authors' `gated_delta_net_0.4B` state dict
# (/work/shared/reference/authors_state_dicts.json, `model.layers.0.attn.*`), in their order.
AUTHORS_0_4B = [
    ("A_log", (8,)),
    ("dt_bias", (8,)),
    ("q_proj.weight", (1024, 1024)),
    ("k_proj.weight", (1024, 1024)),
    ("v_proj.weight", (1024, 1024)),
    ("a_proj.weight", (8, 1024)),
    ("b_proj.weight", (8, 1024)),
    ("q_conv1d.weight", (1024, 1, 4)),
    ("k_conv1d.weight", (1024, 1, 4)),
    ("v_conv1d.weight", (1024, 1, 4)),
    ("g_proj.weight", (1024, 1024)),
    ("o_norm.weight", (128,)),
    ("o_proj.weight", (1024, 1024)),
]


def small_layer(**overrides) -> GatedDeltaNet:
    kwargs = dict(hidden_size=32, num_heads=2, head_dim=8, expand_v=1.5, conv_size=4, backend="torch")
    kwargs.update(overrides)
    layer = GatedDeltaNet(**kwargs)
    with torch.no_grad():  # make the norm weight matter (it starts at ones)
        layer.o_norm.weight.uniform_(0.5, 1.5)
    return layer.eval()


def reference_forward(layer: GatedDeltaNet, x: torch.Tensor) -> torch.Tensor:
    """The GDN mixer written out from its definition, with the step-by-step recurrence."""
    B, T, _ = x.shape
    H, K, Vh = layer.num_heads, layer.head_k_dim, layer.head_v_dim

    def causal_conv_silu(y, weight):  # y [B, T, C], weight [C, 1, W]: out_t = sum_j weight[:, 0, j] * y_{t-W+1+j}
        W = weight.shape[-1]
        padded = F.pad(y, (0, 0, W - 1, 0))
        return F.silu(sum(weight[:, 0, j] * padded[:, j : j + T] for j in range(W)))

    q = causal_conv_silu(layer.q_proj(x), layer.q_conv1d.weight)
    k = causal_conv_silu(layer.k_proj(x), layer.k_conv1d.weight)
    v = causal_conv_silu(layer.v_proj(x), layer.v_conv1d.weight)
    q = F.normalize(q.view(B, T, H, K), dim=-1)
    k = F.normalize(k.view(B, T, H, K), dim=-1)
    beta = torch.sigmoid(layer.b_proj(x))
    g = -torch.exp(layer.A_log) * F.softplus(layer.a_proj(x) + layer.dt_bias)
    o, _ = gated_delta_rule_ref(q, k, v.view(B, T, H, Vh), g, beta)
    gate = layer.g_proj(x).view(B, T, H, Vh)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight * F.silu(gate)
    return layer.o_proj(o.reshape(B, T, H * Vh))


def test_forward_matches_written_out_definition():
    layer = small_layer()
    x = torch.randn(2, 70, 32)
    with torch.no_grad():
        y, aux = layer(x, pad_mask=None, state=None)
        torch.testing.assert_close(y, reference_forward(layer, x), rtol=1e-5, atol=1e-5)
    assert aux is None


@pytest.mark.parametrize("splits", [(1,), (7,), (3, 9), (20,)], ids=lambda s: "split" + "_".join(map(str, s)))
@pytest.mark.parametrize("variant", ["default", "no_conv_no_gate", "conv2"])
def test_prefill_then_decode_equals_full_forward(splits, variant):
    overrides = {"default": {}, "no_conv_no_gate": {"use_short_conv": False, "use_gate": False}}
    layer = small_layer(**overrides.get(variant, {"conv_size": 2}))
    B, T = 2, 23
    x = torch.randn(B, T, 32)
    with torch.no_grad():
        y_full, _ = layer(x, pad_mask=None, state=None)
        state = layer.init_state(B, device="cpu", dtype=torch.float32)
        # prefill [0, s0), then chunks [s0, s1), ..., then one token at a time
        bounds = [0, *splits]
        pieces = [layer(x[:, a:b], pad_mask=None, state=state)[0] for a, b in zip(bounds, bounds[1:])]
        pieces += [layer(x[:, t : t + 1], pad_mask=None, state=state)[0] for t in range(splits[-1], T)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), y_full, rtol=1e-5, atol=1e-5)
    assert state.seen == T


def test_left_padding_gives_the_unpadded_outputs():
    # The Block zeroes hidden states at pads; the layer then needs no mask (its docstring explains why).
    layer = small_layer()
    P, T = 5, 12
    x = torch.randn(2, T, 32)
    x_padded = x.clone()
    x_padded[0, :P] = 0.0  # row 0: P left pads, then T - P real tokens
    pad_mask = torch.ones(2, T, dtype=torch.bool)
    pad_mask[0, :P] = False
    with torch.no_grad():
        state = layer.init_state(2, device="cpu", dtype=torch.float32)
        y_padded, _ = layer(x_padded, pad_mask=pad_mask, state=state)
        state_real = layer.init_state(1, device="cpu", dtype=torch.float32)
        y_real, _ = layer(x[:1, P:], pad_mask=None, state=state_real)
        torch.testing.assert_close(y_padded[0, P:], y_real[0], rtol=1e-5, atol=1e-5)
        assert torch.all(y_padded[0, :P] == 0)
        torch.testing.assert_close(state.recurrent[:1], state_real.recurrent, rtol=1e-5, atol=1e-6)
        # the next decode step agrees too
        x_next = torch.randn(1, 1, 32)
        y_next_padded, _ = layer(torch.cat([x_next, x_next]), pad_mask=None, state=state)
        y_next_real, _ = layer(x_next, pad_mask=None, state=state_real)
        torch.testing.assert_close(y_next_padded[:1], y_next_real, rtol=1e-5, atol=1e-5)


def test_parameter_names_and_shapes_match_authors_0_4b():
    with torch.device("meta"):
        layer = GatedDeltaNet(hidden_size=1024, num_heads=8, head_dim=128, expand_v=1, conv_size=4, norm_eps=1e-6)
    assert [(n, tuple(p.shape)) for n, p in layer.state_dict().items()] == AUTHORS_0_4B
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay


def test_decay_initialisation_follows_fla():
    layer = GatedDeltaNet(hidden_size=16, num_heads=512, head_dim=4)
    A = layer.A_log.exp()
    dt = F.softplus(layer.dt_bias)
    assert A.min() >= 0 and A.max() <= 16 and A.mean().item() == pytest.approx(8, abs=1)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    # log-uniform: the mean of log(dt) sits halfway between log(1e-3) and log(1e-1)
    assert dt.log().mean().item() == pytest.approx(math.log(1e-2), abs=0.3)


def test_gradients_reach_every_parameter():
    layer = small_layer().train()
    y, _ = layer(torch.randn(2, 9, 32), pad_mask=None, state=None)
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_init_state_shapes():
    layer = small_layer()
    state = layer.init_state(3, device="cpu", dtype=torch.bfloat16)
    assert isinstance(state, GDNState) and state.seen == 0
    assert state.conv.shape == (3, 16 + 16 + 24, 3) and state.conv.dtype == torch.bfloat16
    assert state.recurrent.shape == (3, 2, 8, 12) and state.recurrent.dtype == torch.float32
    assert small_layer(use_short_conv=False).init_state(1, device="cpu", dtype=torch.float32).conv is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden_size": 0}, "hidden_size must be a positive"),
        ({"num_heads": 0}, "num_heads must be a positive"),
        ({"expand_v": 1.3}, "expand_v \\* head_dim must be a positive integer"),
        ({"conv_size": 0}, "conv_size must be >= 1"),
    ],
    ids=["hidden_size", "num_heads", "expand_v", "conv_size"],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_layer(**kwargs)


def test_bad_forward_arguments_raise():
    layer = small_layer()
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="x must be"):
        layer(x[..., :31], pad_mask=None, state=None)
    with pytest.raises(ValueError, match="pad_mask must be bool"):
        layer(x, pad_mask=torch.ones(2, 5), state=None)
    with pytest.raises(ValueError, match="state.recurrent must be"):
        layer(x, pad_mask=None, state=layer.init_state(3, device="cpu", dtype=torch.float32))
    with pytest.raises(ValueError, match="no conv history"):
        layer(x, pad_mask=None, state=small_layer(use_short_conv=False).init_state(2, device="cpu", dtype=x.dtype))
    with pytest.raises(ValueError, match="batch_size must be positive"):
        layer.init_state(0, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        small_layer(backend="cuda")(x, pad_mask=None, state=None)
