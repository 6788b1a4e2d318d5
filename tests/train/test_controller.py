"""The LTE sparsity controller, rule by rule, on hand-made router outputs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hlsa.config import LTE_DEFAULTS
from hlsa.errors import UsageError
from hlsa.train.controller import (
    SparsityController,
    SparsitySettings,
    kept_counts,
    l1_penalty,
    next_lambda,
    stats_drop,
    threshold_logits,
)

N = 512
REPO = Path(__file__).resolve().parents[2]


def settings(**over: object) -> SparsitySettings:
    return SparsitySettings.from_lte({**LTE_DEFAULTS, **over})


def routing(scores: list[torch.Tensor]) -> tuple[SimpleNamespace, ...]:
    return tuple(SimpleNamespace(score=s, selected=s > 0) for s in scores)


def test_settings_from_authors_config() -> None:
    s = settings()
    assert (s.buffer_size, s.update_steps, s.tol_lo, s.tol_hi) == (512, 32, 0.95, 1.0)
    assert s.ema_alpha == pytest.approx(2 / 17)
    assert s.drop == 6  # RF = 1 + 3 * (3 - 1) * 2 = 13, look-ahead 6 (the authors: receptive_margin 7, last 6 dropped)
    assert stats_drop([3, 3, 3], [1, 1, 1]) == 3
    with pytest.raises(ValueError, match="l1_lambda_tolerate"):
        settings(l1_lambda_tolerate=[1.0, 0.5])


@pytest.mark.parametrize("shared", ["head", "layer", "all"])
def test_l1_penalty_matches_explicit_sum(shared: str) -> None:
    b, t, nl, h, drop = 2, 11, 3, 4, 2
    scores = [torch.randn(b, t, h) for _ in range(nl)]
    lam = {"head": torch.rand(nl, h), "layer": torch.rand(nl), "all": torch.rand(())}[shared]
    total = 0.0
    for layer, s in enumerate(scores):
        for head in range(h):
            w = lam[layer, head] if shared == "head" else lam[layer] if shared == "layer" else lam
            total += float((w * s[:, : t - drop, head].clamp(min=0)).sum())
    expect = total / (b * (t - drop) * nl * h)
    assert float(l1_penalty(routing(scores), lam, drop)) == pytest.approx(expect, rel=1e-5)


def test_kept_counts_ignore_the_last_positions() -> None:
    s = -torch.ones(2, 10, 2)
    s[:, :4, 0] = 1.0  # 4 kept of L' = 7 on head 0
    s[:, 7:, :] = 1.0  # inside the dropped margin: ignored
    s[0, 0, 1] = 1.0  # batch mean: 0.5 kept on head 1
    kept = kept_counts(routing([s]), drop=3)
    torch.testing.assert_close(kept, torch.tensor([[4.0, 0.5]]))
    with pytest.raises(ValueError, match="seq_len"):
        kept_counts(routing([s[:, :3]]), drop=3)


def test_first_update_starts_only_heads_that_keep_too_much() -> None:
    s = settings()
    kept = torch.tensor([600.0, 490.0, 100.0])  # above the band, inside it, below it
    lam = next_lambda(torch.zeros(3), kept, s, first=True)
    torch.testing.assert_close(lam, torch.tensor([1e-9, 1e-9, 0.0]))  # large = K > 0.95 N (490 > 486.4)


def test_band_rules() -> None:
    s = settings()
    lam = torch.full((4,), 1e-3)
    kept = torch.tensor([N + 1.0, N * 0.97, N * 0.95, N * 0.5])  # over, in band, at lower edge, under
    out = next_lambda(lam, kept, s, first=False)
    torch.testing.assert_close(out, torch.tensor([1.5e-3, 1e-3, 0.5e-3, 0.5e-3]))
    at_top = next_lambda(lam[:1], torch.tensor([float(N)]), s, first=False)  # K == N is not "small": grow
    torch.testing.assert_close(at_top, torch.tensor([1.5e-3]))


def test_clamps_and_restart_from_floor() -> None:
    s = settings()
    big = next_lambda(torch.tensor([0.9]), torch.tensor([2.0 * N]), s, first=False)
    torch.testing.assert_close(big, torch.tensor([1.0]))  # min(0.9 * 1.5, lambda_max)
    tiny = next_lambda(torch.tensor([1.5e-9]), torch.tensor([10.0]), s, first=False)
    torch.testing.assert_close(tiny, torch.tensor([0.0]))  # 0.75e-9 < lambda_min -> released
    again = next_lambda(torch.tensor([0.0]), torch.tensor([2.0 * N]), s, first=False)
    torch.testing.assert_close(again, torch.tensor([1e-9]))  # 0 and too many kept -> lambda_min


class FakeLM(nn.Module):
    """The controller's view of HybridForCausalLM: buffers, a router parameter, a routing switch."""

    def __init__(self, shared: str, nl: int = 2, h: int = 3) -> None:
        super().__init__()
        self.config = SimpleNamespace(mixers=["gdn", "lte"] * nl, lte={**LTE_DEFAULTS, "l1_lambda_shared": shared})
        self.model = nn.Module()
        shape = {"head": (nl, h), "layer": (nl,), "all": ()}[shared]
        self.model.register_buffer("l1_lambda", torch.zeros(shape))
        self.model.register_buffer("num_kept", torch.zeros(nl, h))
        self.model.attn = nn.Module()
        self.model.attn.router = nn.Linear(2, 2)
        self.model.other = nn.Linear(2, 2)
        self.enabled: list[bool] = []

    def set_routing_enabled(self, enabled: bool) -> None:
        self.enabled.append(enabled)


def constant_routing(kept_per_head: list[float], seq: int = 4096, drop: int = 6) -> tuple[SimpleNamespace, ...]:
    """Two layers whose head `j` keeps `kept_per_head[j]` of the `seq - drop` counted positions."""
    lp = seq - drop
    s = -torch.ones(1, seq, len(kept_per_head))
    for j, k in enumerate(kept_per_head):
        s[0, : int(k), j] = 1.0
    assert lp >= max(kept_per_head)
    return routing([s, s])


def run_steps(ctl: SparsityController, steps: range, kept: list[float]) -> None:
    r = constant_routing(kept)
    for step in steps:
        ctl.begin_step(step)
        ctl.observe(r)
        ctl.end_step(step)


def test_ema_and_update_schedule() -> None:
    lm = FakeLM("head")
    ctl = SparsityController.for_model(lm, seq_len=4096)
    run_steps(ctl, range(1, 32), [1000.0, 500.0, 10.0])
    a = 2 / 17
    ema = 1000.0 * (1 - (1 - a) ** 31)  # from num_kept = 0
    torch.testing.assert_close(lm.model.num_kept[0, 0], torch.tensor(ema), rtol=1e-5, atol=1e-3)
    assert lm.model.l1_lambda.abs().sum() == 0  # no update before step 32
    lm.model.num_kept.fill_(0)
    lm.model.num_kept[:, 0] = 1000.0  # head 0 keeps too much at the update
    run_steps(ctl, range(32, 33), [1000.0, 0.0, 0.0])
    torch.testing.assert_close(lm.model.l1_lambda[:, 0], torch.full((2,), 1e-9))
    assert lm.model.l1_lambda[:, 1:].abs().sum() == 0
    run_steps(ctl, range(33, 65), [1000.0, 0.0, 0.0])
    torch.testing.assert_close(lm.model.l1_lambda[:, 0], torch.full((2,), 1.5e-9))


def test_initial_steps_keep_lambda_zero_and_shift_the_first_update() -> None:
    lm = FakeLM("layer")
    lm.config.lte["l1_lambda_initial_steps"] = 40
    ctl = SparsityController.for_model(lm, seq_len=4096)
    lm.model.num_kept.fill_(2000.0)
    run_steps(ctl, range(1, 64), [2000.0] * 3)
    assert lm.model.l1_lambda.abs().sum() == 0  # steps 32 is within the initial steps
    run_steps(ctl, range(64, 65), [2000.0] * 3)  # 64 // 32 == 40 // 32 + 1: the first update
    torch.testing.assert_close(lm.model.l1_lambda, torch.full((2,), 1e-9))


def test_shared_all_uses_the_global_mean() -> None:
    lm = FakeLM("all")
    ctl = SparsityController.for_model(lm, seq_len=4096)
    lm.model.num_kept.copy_(torch.tensor([[600.0] * 3, [400.0] * 3]))  # mean 500 > 486.4, layer 1 alone is not
    ctl.begin_step(32)
    ctl.end_step(32)
    assert float(lm.model.l1_lambda) == pytest.approx(1e-9)
    lm.model.num_kept.copy_(torch.tensor([[1000.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))  # mean 167: release
    ctl.begin_step(64)
    ctl.end_step(64)
    assert float(lm.model.l1_lambda) == 0.0


def test_warmup_disables_routing_and_skips_the_penalty() -> None:
    lm = FakeLM("head")
    lm.config.lte["l1_warmup_steps"] = 2
    ctl = SparsityController.for_model(lm, seq_len=100)
    lm.model.l1_lambda.fill_(0.5)
    r = constant_routing([10.0, 10.0, 10.0], seq=100)
    ctl.begin_step(2)
    assert lm.enabled == [False] and float(lm.model.num_kept.min()) == 100.0
    assert ctl.loss(r, 2) is None
    ctl.observe(r)
    ctl.end_step(2)
    assert float(lm.model.num_kept.min()) == 100.0  # the EMA does not run during warm-up
    ctl.begin_step(3)
    assert lm.enabled[-1] is True and float(ctl.loss(r, 3)) > 0


def test_freeze_drops_router_gradients_only() -> None:
    lm = FakeLM("head")
    lm.config.lte["routing_freeze_steps"] = 1
    ctl = SparsityController.for_model(lm, seq_len=100)
    for p in lm.parameters():
        p.grad = torch.ones_like(p)
    ctl.drop_frozen_grads(2)  # after the freeze: untouched
    assert lm.model.attn.router.weight.grad is not None
    ctl.drop_frozen_grads(1)
    assert lm.model.attn.router.weight.grad is None and lm.model.other.weight.grad is not None


def test_skipped_step_discards_its_statistics() -> None:
    lm = FakeLM("head")
    ctl = SparsityController.for_model(lm, seq_len=4096)
    ctl.begin_step(1)
    ctl.observe(constant_routing([1000.0, 1000.0, 1000.0]))
    ctl.end_step(1, valid=False)
    assert lm.model.num_kept.abs().sum() == 0


def test_no_controller_without_lte_layers() -> None:
    lm = FakeLM("head")
    lm.config.mixers = ["gdn", "swa"]
    assert SparsityController.for_model(lm, seq_len=10) is None


def test_metrics_per_layer() -> None:
    lm = FakeLM("layer")
    ctl = SparsityController.for_model(lm, seq_len=100)
    lm.model.num_kept.copy_(torch.tensor([[1.0, 3.0, 5.0], [10.0, 10.0, 10.0]]))
    lm.model.l1_lambda.copy_(torch.tensor([0.5, 0.25]))
    m = ctl.metrics()
    assert m["lte/num_kept/layer0"] == 3.0 and m["lte/num_kept/layer1"] == 10.0 and m["lte/lambda/layer1"] == 0.25
    assert m["lte/num_kept"] == pytest.approx(6.5) and m["lte/kept_fraction"] == pytest.approx(0.065)


def test_zero_cap_keeps_the_penalty_off() -> None:
    """lambda_init = lambda_min = lambda_max = 0 (the demo's `lte_lambda_max = 0`): lambda never leaves zero, even
    for heads that keep far more than the buffer, so the L1 term is off for the whole run."""
    lm = FakeLM("head")
    lm.config.lte.update(l1_lambda_init=0.0, l1_lambda_min=0.0, l1_lambda_max=0.0)
    ctl = SparsityController.for_model(lm, seq_len=4096)
    run_steps(ctl, range(1, 200), [4000.0, 500.0, 10.0])
    assert lm.model.l1_lambda.abs().sum() == 0


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("l1_alpha", float("nan"), "a finite number >= 1"),
        ("l1_alpha", 0.5, "a finite number >= 1"),
        ("l1_alpha_neg", float("inf"), "a finite number >= 1"),
        ("l1_lambda_update_steps", 0, "an integer >= 1"),
        ("l1_lambda_update_steps", True, "an integer >= 1"),
        ("l1_lambda_init", -1e-3, "a finite number >= 0"),
        ("l1_lambda_max", float("nan"), "a finite number >= 0"),
        ("buffer_size", 8.5, "an integer >= 0"),
        ("l1_warmup_steps", -1, "an integer >= 0"),
        ("l1_lambda_tolerate", [0.9, float("nan")], "\\[lo, hi\\]"),
        ("l1_lambda_min", 2.0, "<= lte.l1_lambda_max"),
    ],
)
def test_bad_controller_constants_are_named(key: str, value: object, words: str) -> None:
    with pytest.raises(ValueError, match=f"lte.{key}.* must be {words}"):
        settings(**{key: value})


def test_ema_alpha_never_exceeds_one() -> None:
    assert settings(l1_lambda_update_steps=1).ema_alpha == 1.0  # 2 / (1 + 0) would flip the average's sign
    assert settings(l1_lambda_update_steps=2).ema_alpha == 1.0
    assert settings(l1_lambda_update_steps=8).ema_alpha == pytest.approx(0.4)


def test_negative_lambda_rewards_every_score() -> None:
    b, t, h, drop = 2, 9, 3, 2
    score = torch.randn(b, t, h, requires_grad=True)
    lam = torch.tensor([[2e-3, -1e-3, 0.0]])
    out = l1_penalty(routing([score]), lam, drop)
    kept = score[:, : t - drop]
    expect = (2e-3 * kept[..., 0].clamp(min=0).sum() - 1e-3 * kept[..., 1].sum()) / (b * (t - drop) * h)
    assert float(out.detach()) == pytest.approx(float(expect.detach()), rel=1e-5)
    out.backward()
    g = score.grad
    assert (g[:, : t - drop, 1] < 0).all()  # descent raises every score of the pulled head, negative ones too
    assert (g[:, : t - drop, 0][kept[..., 0] <= 0] == 0).all() and (g[..., 2] == 0).all()


def test_signed_controller_flips_at_once_and_grows_on_one_side() -> None:
    s = settings(l1_lambda_signed=True, l1_lambda_min=1e-5)
    lam = torch.tensor([1e-3, 1e-3, -1e-3, -1e-3, 1e-3, 0.0, 0.0, 0.9])
    kept = torch.tensor([N + 1.0, N * 0.5, N * 0.5, N + 1.0, N * 0.97, N * 0.5, N * 0.97, N * 2.0])
    out = next_lambda(lam, kept, s, first=False)
    # over: grow; under: flip to a pull of half the size; under while pulling: pull harder; over while pulling:
    # flip to a push of half the size; in band: kept; zero and under: pull from the floor; zero in band: kept;
    # growth stops at lambda_max
    expect = torch.tensor([1.5e-3, -0.5e-3, -1.5e-3, 0.5e-3, 1e-3, -1e-5, 0.0, 1.0])
    torch.testing.assert_close(out, expect)
    tiny = next_lambda(torch.tensor([2e-5]), torch.tensor([10.0]), s, first=False)
    torch.testing.assert_close(tiny, torch.tensor([-1e-5]))  # never smaller than lambda_min once moving
    deep = next_lambda(torch.tensor([-0.9]), torch.tensor([10.0]), s, first=False)
    torch.testing.assert_close(deep, torch.tensor([-1.0]))  # a pull is bounded by lambda_max too
    first = next_lambda(torch.zeros(2), torch.tensor([N * 2.0, 10.0]), s, first=True)
    torch.testing.assert_close(first, torch.tensor([1e-9, 0.0]))  # the first update is the authors'


def test_unsigned_controller_never_goes_negative() -> None:
    s = settings(l1_lambda_min=1e-5)
    lam = next_lambda(torch.tensor([1e-3, 0.0]), torch.tensor([10.0, 10.0]), s, first=False)
    torch.testing.assert_close(lam, torch.tensor([0.5e-3, 0.0]))


def test_threshold_logits_put_n_tokens_per_row_above_zero() -> None:
    torch.manual_seed(0)
    b, t, h, drop, n = 3, 40, 2, 4, 5
    logits = torch.randn(b, t, h) * torch.tensor([1.0, 7.0])  # two scales: the answer is a logit, not a step
    score = torch.sigmoid(logits) - 0.5
    at = threshold_logits(routing([score, score[:, :, [1, 0]]]), drop, n)
    assert at.shape == (2, h)
    for layer, perm in enumerate(([0, 1], [1, 0])):
        shifted = logits[:, : t - drop, perm] - at[layer]
        assert ((shifted > 0).sum(dim=(0, 1)) == b * n).all()  # the batch keeps N per row on average


def test_threshold_shift_moves_the_router_biases_in_layer_order() -> None:
    from hlsa.config import HybridConfig
    from hlsa.model import HybridForCausalLM

    config = json.loads((REPO / "configs" / "tiny" / "gdn_lte.json").read_text())
    config["lte"].update(buffer_size=6, threshold_step=0.5)
    lm = HybridForCausalLM(HybridConfig(**config))
    ctl = SparsityController.for_model(lm, seq_len=48)
    routers = [m.attn.router.conv_stack.proj.bias for m in lm.model.layers if m.kind == "lte"]
    before = [b.detach().clone() for b in routers]
    ctl.shift_thresholds(torch.tensor([[0.0, -0.1], [0.1, 0.0]]))
    torch.testing.assert_close(routers[0] - before[0], torch.tensor([0.0, -0.1]))
    torch.testing.assert_close(routers[1] - before[1], torch.tensor([0.1, 0.0]))
    config["lte"]["routing_method"] = "relu"
    with pytest.raises(UsageError, match="sigmoid"):
        SparsityController.for_model(HybridForCausalLM(HybridConfig(**config)), seq_len=48)
