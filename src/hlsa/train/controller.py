"""The LTE sparsity controller: an L1 penalty on positive router scores whose per-(layer, head)
weight lambda is steered so that each head keeps about `buffer_size` tokens per sequence.

Per optimizer step `s` (1-based, as in the authors' trainer):

1. `begin_step(s)`: routers disabled while `s <= l1_warmup_steps` (full attention, `num_kept := seq_len`),
   router parameters frozen while `s <= routing_freeze_steps`.
2. per micro-batch, `loss(routing)` adds `mean(lambda * relu(score))` over `B * L' * Nl * Hkv` entries and
   `observe(routing)` records the kept fraction `mean_L'(score > 0)` of each (layer, head).
3. `end_step(s)`: `num_kept <- (1 - a) num_kept + a * kept` with `a = min(1, 2 / (1 + U // 2))`, then, when
   `s > l1_lambda_initial_steps` and `s % U == 0`, average `num_kept` over data-parallel ranks and move lambda:
   x`l1_alpha` when the kept count is at or above `tol_hi * N`, x`1 / l1_alpha_neg` at or below `tol_lo * N`,
   unchanged inside the band; the first update sets `lambda = l1_lambda_init` where the count is too large.
   With `l1_lambda_signed` lambda is signed: a negative lambda pulls every score up (see `next_lambda`).
4. with `threshold_step > 0`, `observe` also finds the logit at which each head would keep `N` tokens per row
   (`threshold_logits`) and `end_step(s)` moves the router's output bias `threshold_step` of the way there.

The state (`l1_lambda`, `num_kept`) lives in the model's buffers (`model.model.l1_lambda/num_kept`), so it is
saved with the weights; the per-step accumulator is empty between steps, where checkpoints are taken.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hlsa.config import LTEControllerConfig
from hlsa.errors import UsageError
from hlsa.layers.lte_router import LTERouter


@dataclass(frozen=True)
class SparsitySettings:
    """The controller's constants, read from a `HybridConfig.lte` dict (the authors' key names)."""

    buffer_size: int
    update_steps: int
    initial_steps: int
    warmup_steps: int
    freeze_steps: int
    lambda_init: float
    lambda_min: float
    lambda_max: float
    alpha: float
    alpha_neg: float
    tol_lo: float
    tol_hi: float
    shared: str
    signed: bool
    threshold_step: float
    drop: int  # trailing positions left out of the statistics (see `stats_drop`)

    @classmethod
    def from_lte(cls, lte: Mapping[str, Any]) -> SparsitySettings:
        """Read the constants, checked by the config's own rules (`LTEControllerConfig`): a NaN, a bool or a
        factor below 1 would steer lambda silently wrong."""
        try:
            c = LTEControllerConfig.from_section(lte)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return cls(
            buffer_size=int(lte["buffer_size"]),
            update_steps=c.l1_lambda_update_steps,
            initial_steps=c.l1_lambda_initial_steps,
            warmup_steps=c.l1_warmup_steps,
            freeze_steps=c.routing_freeze_steps,
            lambda_init=float(c.l1_lambda_init),
            lambda_min=float(c.l1_lambda_min),
            lambda_max=float(c.l1_lambda_max),
            alpha=float(c.l1_alpha),
            alpha_neg=float(c.l1_alpha_neg),
            tol_lo=float(c.l1_lambda_tolerate[0]),
            tol_hi=float(c.l1_lambda_tolerate[1]),
            shared=c.l1_lambda_shared,
            signed=c.l1_lambda_signed,
            threshold_step=float(c.threshold_step),
            drop=stats_drop(lte["conv_size"], lte["conv_dilation"]),
        )

    @property
    def ema_alpha(self) -> float:
        # the authors' 2 / (1 + U // 2), capped at 1 (no averaging) for U = 1, where it would be 2
        return min(1.0, 2.0 / (1 + self.update_steps // 2))


def stats_drop(conv_size: Sequence[int], conv_dilation: Sequence[int]) -> int:
    """Trailing positions whose scores are left out of the L1 loss and the kept counts.

    The router CNN is non-causal ('same' padding): a score at position `t` looks `m = RF // 2` tokens ahead, so the
    last `m` positions of a training sequence are scored against zero padding rather than real text, unlike the
    positions a decoder will keep. The authors store `receptive_margin = RF // 2 + 1` (7 for RF = 13) and slice
    `[:-(receptive_margin - 1)]`, i.e. they drop exactly those `m = 6` positions; we do the same.
    """
    rf = 1 + sum((k - 1) * d for k, d in zip(conv_size, conv_dilation, strict=True))
    return rf // 2


def _scores(routing: Sequence[Any], drop: int) -> Tensor:
    """Stack the LTE layers' scores without the last `drop` positions: `[B, L', Nl, Hkv]`."""
    t = routing[0].score.shape[1]
    if t <= drop:
        raise ValueError(f"sequence length {t} must exceed the router's look-ahead margin {drop}; use longer seq_len")
    return torch.stack([r.score[:, : t - drop] for r in routing], dim=2)


def l1_penalty(routing: Sequence[Any], l1_lambda: Tensor, drop: int) -> Tensor:
    """`mean(lambda * relu(score))` over `[B, L', Nl, Hkv]`; lambda is `[]`, `[Nl]` or `[Nl, Hkv]`.

    Where lambda is negative (a signed controller pulling a head back), the term is `lambda * score`: every score
    is rewarded, the negative ones too, so a head that keeps nothing still gets a gradient towards keeping.
    """
    s = _scores(routing, drop).float()
    lam = l1_lambda.to(s.device)
    if lam.dim() == 1:  # per layer: broadcast over heads
        lam = lam[:, None]
    return (lam * torch.where(lam < 0, s, s.relu())).mean()


def kept_counts(routing: Sequence[Any], drop: int) -> Tensor:
    """Expected kept tokens per sequence, `mean_{B,L'}(score > 0) * L'`: `[Nl, Hkv]` float32."""
    s = _scores(routing, drop).detach()
    return (s > 0).float().mean(dim=(0, 1)) * s.shape[1]


def next_lambda(lam: Tensor, kept: Tensor, s: SparsitySettings, *, first: bool) -> Tensor:
    """One multiplicative band-controller update (pure function; `kept` already reduced to lambda's shape)."""
    n = s.buffer_size
    large = kept > s.tol_lo * n  # above the band's lower edge: sparsity is still wanted
    small = kept < s.tol_hi * n  # below the band's upper edge
    if first:
        return s.lambda_init * large.to(lam.dtype)
    if s.signed:
        return _next_signed_lambda(lam, push=~small, pull=~large, s=s)
    factor = torch.ones_like(lam)
    factor = torch.where(~small, torch.full_like(lam, s.alpha), factor)  # too many kept: push harder
    factor = torch.where(~large, torch.full_like(lam, 1.0 / s.alpha_neg), factor)  # too few kept: relax
    new = torch.clamp(lam * factor, max=s.lambda_max)
    new = torch.where(new < s.lambda_min, torch.zeros_like(new), new)
    # a head that was released (lambda = 0) but keeps too much again restarts from the floor
    return torch.where((new == 0) & large, torch.full_like(new, s.lambda_min), new)


def _next_signed_lambda(lam: Tensor, *, push: Tensor, pull: Tensor, s: SparsitySettings) -> Tensor:
    """The signed controller: lambda > 0 pushes scores down, lambda < 0 pulls them up.

    While the count stays on one side of the band, lambda grows by `l1_alpha` in the direction that corrects it.
    When it crosses to the other side, lambda changes sign at once and its size is divided by `l1_alpha_neg`
    (never below `l1_lambda_min`): the controller answers a collapse at the next update instead of decaying a
    push first, and the size settles where the count crosses the band rarely. Inside the band lambda is kept.
    """
    flipped = torch.clamp(lam.abs() / s.alpha_neg, min=s.lambda_min)
    new = torch.where(push, torch.where(lam > 0, lam * s.alpha, flipped), lam)
    new = torch.where(pull, torch.where(lam < 0, lam * s.alpha, -flipped), new)
    return torch.clamp(new, min=-s.lambda_max, max=s.lambda_max)


def threshold_logits(routing: Sequence[Any], drop: int, buffer_size: int) -> Tensor:
    """Per (layer, head), the logit at which this micro-batch would keep `buffer_size` tokens per row: `[Nl, Hkv]`.

    The midpoint between the `k`-th and `(k + 1)`-th largest of the batch's `B * L'` scores, `k = B * N`, mapped
    back from the sigmoid score (`sigmoid(x) - 0.5`) to the logit; subtracting it from the router's bias puts `k`
    scores above 0. The batch's rows share it, so their counts average `N` while each row keeps its own number.
    """
    s = _scores(routing, drop).detach().float()  # [B, L', Nl, Hkv]
    b, lp, nl, h = s.shape
    k = min(b * buffer_size, b * lp - 1)
    top = s.permute(2, 3, 0, 1).reshape(nl, h, b * lp).topk(k + 1, dim=-1).values
    mid = (top[..., k - 1] + top[..., k]) / 2
    return torch.logit(mid + 0.5, eps=1e-6)


def _reduce_kept(kept: Tensor, shared: str) -> Tensor:
    if shared == "head":
        return kept
    if shared == "layer":
        return kept.mean(-1)
    return kept.mean()


def _all_reduce_mean(x: Tensor) -> Tensor:
    """Average over data-parallel ranks (SUM / world: gloo has no AVG)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


class SparsityController:
    """Drives `model.model.l1_lambda` / `num_kept` during training; inert for models without LTE layers."""

    def __init__(self, model: nn.Module, settings: SparsitySettings, *, seq_len: int) -> None:
        self.model = model
        self.core = model.model
        self.s = settings
        self.seq_len = seq_len
        self._kept_sum: Tensor | None = None
        self._threshold_sum: Tensor | None = None
        self._observed = 0
        self.last_l1 = 0.0
        self._biases = self._router_biases() if settings.threshold_step > 0 else []

    def _router_biases(self) -> list[Tensor]:
        """The routers' output biases in layer order (the order of the routing output)."""
        from torch.distributed.tensor import DTensor

        routers = [m for m in self.model.modules() if isinstance(m, LTERouter)]
        if any(r.routing_method != "sigmoid" for r in routers):
            raise UsageError("lte.threshold_step needs lte.routing_method = 'sigmoid' (a relu score hides how far "
                             "below the threshold a token lies)")  # fmt: skip
        biases = [r.conv_stack.proj.bias for r in routers]
        if any(isinstance(b, DTensor) for b in biases):
            raise UsageError("lte.threshold_step edits the routers' biases in place, which needs unsharded "
                             "parameters: use train.parallel = 'ddp' (or one device), not 'fsdp2'")  # fmt: skip
        return biases

    @classmethod
    def for_model(cls, model: nn.Module, *, seq_len: int) -> SparsityController | None:
        config = model.config
        if "lte" not in config.mixers:
            return None
        return cls(model, SparsitySettings.from_lte(config.lte), seq_len=seq_len)

    # ---------------------------------------------------------------- per step
    def in_warmup(self, step: int) -> bool:
        return step <= self.s.warmup_steps

    def frozen(self, step: int) -> bool:
        return step <= self.s.freeze_steps

    def begin_step(self, step: int) -> None:
        """Switch routing on/off for this step (the model's `set_routing_enabled`) and reset the accumulator."""
        warm = self.in_warmup(step)
        setter = getattr(self.model, "set_routing_enabled", None)
        if setter is not None:
            setter(not warm)
        elif warm:
            raise ValueError("lte.l1_warmup_steps > 0 needs HybridForCausalLM.set_routing_enabled(bool)")
        if warm:
            self.core.num_kept.fill_(float(self.seq_len))
        self._kept_sum, self._threshold_sum, self._observed = None, None, 0

    def loss(self, routing: Sequence[Any] | None, step: int) -> Tensor | None:
        """The L1 term for one micro-batch (None during warm-up or without routing output)."""
        if not routing or self.in_warmup(step):
            return None
        l1 = l1_penalty(routing, self.core.l1_lambda, self.s.drop)
        self.last_l1 = float(l1.detach())
        return l1

    def observe(self, routing: Sequence[Any] | None) -> None:
        if not routing:
            return
        kept = kept_counts(routing, self.s.drop).to(self.core.num_kept.device)
        self._kept_sum = kept if self._kept_sum is None else self._kept_sum + kept
        if self._biases:
            at = threshold_logits(routing, self.s.drop, self.s.buffer_size).to(self.core.num_kept.device)
            self._threshold_sum = at if self._threshold_sum is None else self._threshold_sum + at
        self._observed += 1

    def drop_frozen_grads(self, step: int) -> None:
        """Drop, before clipping, the gradients the optimiser must not apply (AdamW skips a parameter without one):
        every router gradient during the freeze, and under `threshold_step` the routers' output biases, which the
        controller alone sets (the optimiser would pull against it, leaving a steady offset from the target).

        Setting `requires_grad=False` mid-run (the authors' way) would desynchronise DDP's reducer, which
        registers its hooks once; dropping the gradients has the same effect on the weights and optimizer state.
        """
        for bias in self._biases:
            bias.grad = None
        if not self.frozen(step):
            return
        for name, p in self.model.named_parameters():
            if ".router." in name:
                p.grad = None

    def end_step(self, step: int, *, valid: bool = True) -> None:
        """EMA of the kept counts, the threshold shift, then the lambda update on its schedule.

        `valid=False` (a skipped non-finite step) discards the step's statistics but keeps the schedule.
        """
        s, core = self.s, self.core
        if valid and self._kept_sum is not None and not self.in_warmup(step):
            kept = self._kept_sum / self._observed
            a = s.ema_alpha
            core.num_kept.mul_(1 - a).add_(a * kept)
            if self._threshold_sum is not None and not self.frozen(step):
                self.shift_thresholds(-s.threshold_step * _all_reduce_mean(self._threshold_sum / self._observed))
        self._kept_sum, self._threshold_sum, self._observed = None, None, 0
        if step <= s.initial_steps or step % s.update_steps != 0:
            return
        core.num_kept.copy_(_all_reduce_mean(core.num_kept.clone()))
        first = step // s.update_steps == s.initial_steps // s.update_steps + 1
        kept = _reduce_kept(core.num_kept, s.shared)
        core.l1_lambda.copy_(next_lambda(core.l1_lambda, kept, s, first=first))

    def shift_thresholds(self, shift: Tensor) -> None:
        """Add `shift` (`[Nl, Hkv]` logits) to the output bias of each LTE layer's router, in layer order; a router
        shared by a layer's heads moves by the mean over its heads. Every data-parallel rank applies the same
        shift (averaged over ranks first), so replicas stay equal."""
        with torch.no_grad():
            for bias, layer_shift in zip(self._biases, shift, strict=True):
                bias.add_(layer_shift.to(bias) if bias.numel() == layer_shift.numel() else layer_shift.mean().to(bias))

    def metrics(self) -> dict[str, float]:
        """Scalars for the logs: mean kept count and lambda, and the last L1 term."""
        core = self.core
        out = {
            "lte/num_kept": float(core.num_kept.mean()),
            "lte/kept_fraction": float(core.num_kept.mean()) / self.seq_len,
            "lte/lambda": float(core.l1_lambda.float().mean()),
            "lte/l1_loss": self.last_l1,
        }
        lam = core.l1_lambda.float()
        nl = core.num_kept.shape[0]
        per_layer = lam.mean(-1) if lam.dim() == 2 else lam if lam.dim() == 1 else lam.expand(nl)
        for i, (kept, lam_i) in enumerate(zip(core.num_kept.mean(-1).tolist(), per_layer.tolist(), strict=True)):
            out[f"lte/num_kept/layer{i}"] = kept
            out[f"lte/lambda/layer{i}"] = lam_i
        return out
