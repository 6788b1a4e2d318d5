"""Eviction policies of an LTE layer at inference: what decides which older tokens its N-slot buffer keeps.

An LTE layer's constant-size cache (sinks + a ring of W+1 + an N-slot buffer) keeps, for each query and kv head, the
top-N positive scores among keys older than the window (docs/design.md, "LTE retained set at inference"). The
policy only supplies that score; the cache layout, the retention rule and the kernels stay the same:

* `learned`: the layer's router (the default, and what training always uses);
* `window`: no score is positive, so the buffer keeps only the sinks: sinks + window (StreamingLLM);
* `random`: a uniform score in (0, 1], a hash of (seed, layer, kv head, position), so that a prefill and a
  token-by-token decode of the same sequence draw the same numbers;
* `key_norm`: keys of small norm first, score `1 / (1 + ||k||)` of the pre-RoPE key (RoPE is a rotation, so the
  post-RoPE norm is the same up to round-off; the pre-RoPE key is what both prefill and decode hold before rotating).
  A positive decreasing function of `||k||`, rather than `-||k||`, because only positive scores are ever retained;
* `oracle`: a reference, not a cache: each query attends to sinks + window + the N older keys to which its kv head's
  query heads give the most attention weight (summed over the G query heads of the group, from full causal attention
  over every real key). It needs every key, so it runs in a full forward only (`oracle_attention`); an LTE layer
  refuses to build a decode cache under it.

Beside the policies, the brute-force definitions that tests check the cached path against: `visible_keys` (for each
query, which keys the per-query top-N rule lets it see, one Python loop per query) and `dense_attention` (softmax
attention under an explicit visibility mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POLICIES = ("learned", "window", "random", "key_norm", "oracle")
_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer mix (two rounds of xorshift-multiply) of an int64 tensor or a Python int, in `[0, 2**32)`.
    Every product stays below 2**59, so int64 arithmetic never overflows on any device."""
    x = x & _MASK32
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def random_scores(seed: int, layer: int, num_kv_heads: int, positions: torch.Tensor) -> torch.Tensor:
    """Uniform scores in (0, 1], float32 `[T, HKV]`, a deterministic function of (seed, layer, kv head, position).

    24 bits of the hash, so every score is exact in float32 (ties are the rule's: the earlier key wins)."""
    base = _hash32(_hash32(seed) + layer)  # on the host: a decode step copies nothing to the device
    h = _hash32(base + torch.arange(num_kv_heads, device=positions.device, dtype=torch.int64))[None, :]  # [1, HKV]
    h = _hash32(h + positions.to(torch.int64)[:, None])  # [T, HKV]
    return ((h >> 8) + 1).float() / 2**24


@dataclass(frozen=True)
class Eviction:
    """The eviction policy of one LTE layer at inference: `policy` (one of `POLICIES`), the `seed` of `random`, and
    the index of the `layer` in its model (so that the random draws differ between layers)."""

    policy: str = "learned"
    seed: int = 0
    layer: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"eviction policy must be one of {POLICIES}; got {self.policy!r}")

    def score_lag(self, margin: int) -> int:
        """How many tokens after a key its score is known: the router reads `margin` tokens of right context; the
        training-free scores read the key alone."""
        return margin if self.policy == "learned" else 0

    def scores(self, router: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The raw scores that rank keys (before sinks and pads are ranked +inf / -inf).

        Args:
            router: `[B, T, HKV]` the router's scores (`learned`, and `oracle`, whose ranking is its own).
            k: `[B, T, HKV, D]` pre-RoPE keys of the same tokens (`key_norm`).
            positions: int64 `[T]` their positions, pads counted (`random`).

        Returns:
            float `[B, T, HKV]`.
        """
        if self.policy in ("learned", "oracle"):
            return router
        if self.policy == "window":
            return torch.zeros_like(router, dtype=torch.float32)
        if self.policy == "random":
            return random_scores(self.seed, self.layer, k.shape[2], positions)[None].expand(k.shape[:3])
        return 1.0 / (1.0 + k.float().norm(dim=-1))  # key_norm


def _gqa(x: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, T, HKV, D]` -> `[B, T, HKV * groups, D]`, each kv head repeated for its query heads."""
    return x.repeat_interleave(groups, dim=2)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax attention under an explicit mask: `q [B, T, HQ, D]`, `k, v [B, T, HKV, D]` (keys rotated),
    `visible bool [B, HKV, T, T]` (query, key) -> `[B, T, HQ, D]`; a query that sees no key outputs zeros."""
    groups = q.shape[2] // k.shape[2]
    logits = torch.einsum("bihd,bjhd->bhij", q, _gqa(k, groups)) * q.shape[-1] ** -0.5
    mask = visible.repeat_interleave(groups, dim=1)
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", weights, _gqa(v, groups).to(weights.dtype)).to(q.dtype)


def _real(pad_mask: torch.Tensor | None, b: int, t: int, device: torch.device) -> torch.Tensor:
    return torch.ones(b, t, dtype=torch.bool, device=device) if pad_mask is None else pad_mask


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    buffer_size: int,
    sink_size: int,
    pad_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The `oracle` policy, dense (O(T^2) memory): per query and kv head, the band `t-W..t`, the sinks, and the
    `buffer_size` keys older than `t - W` of largest attention weight (sinks count among them, as in the cache), the
    weight summed over the kv head's query heads and taken from full causal attention over every real key; ties go to
    the earlier key. Shapes as in `dense_attention`, `pad_mask bool [B, T] | None`."""
    b, t, hkv = k.shape[0], k.shape[1], k.shape[2]
    real = _real(pad_mask, b, t, k.device)
    i = torch.arange(t, device=k.device)
    causal = (i[None, :] <= i[:, None])[None, None] & real[:, None, None, :]  # [B, 1, T, T]
    groups = q.shape[2] // hkv
    logits = torch.einsum("bihd,bjhd->bhij", q, _gqa(k, groups)) * q.shape[-1] ** -0.5
    weights = torch.softmax(logits.float().masked_fill(~causal, float("-inf")), dim=-1).nan_to_num(0.0)
    weight = weights.unflatten(1, (hkv, groups)).sum(2)  # [B, HKV, T, T]
    sinks = (real & (real.cumsum(1) <= sink_size))[:, None, None, :]
    older = (causal & (i[None, :] < (i[:, None] - window))[None, None]).expand(b, hkv, t, t)
    ranked = weight.masked_fill(sinks, float("inf")).masked_fill(~older, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :buffer_size]
    kept = torch.zeros_like(older).scatter_(-1, order, True) & older
    band = causal & ((i[:, None] - i[None, :]) <= window)[None, None]
    return dense_attention(q, k, v, band | kept)


def visible_keys(
    score: torch.Tensor, pad_mask: torch.Tensor | None, *, window: int, buffer_size: int, sink_size: int
) -> torch.Tensor:
    """Brute-force definition of what a constant-cache policy lets each query see, bool `[B, HKV, T, T]` (query, key).

    Query `t` sees the real keys of its band `t-W..t`, and among the real keys `j < t - W` the `buffer_size` best
    ranked, where the first `sink_size` real tokens of the row rank first, then positive scores from high to low,
    ties to the earlier key; keys of non-positive score are never kept. `score [B, T, HKV]` is a policy's raw score.
    One Python loop per (row, kv head, query), so that it shares nothing with the cached path it checks.
    """
    b, t, hkv = score.shape
    real = _real(pad_mask, b, t, score.device).tolist()
    raw = score.tolist()
    out = torch.zeros(b, hkv, t, t, dtype=torch.bool)
    for r in range(b):
        sinks = [j for j in range(t) if real[r][j]][:sink_size]
        for h in range(hkv):
            for q in range(t):
                for j in range(max(0, q - window), q + 1):
                    out[r, h, q, j] = real[r][j]
                candidates = [j for j in range(q - window) if real[r][j] and (j in sinks or raw[r][j][h] > 0)]
                candidates.sort(key=lambda j: (j not in sinks, -raw[r][j][h], j))
                for j in candidates[:buffer_size]:
                    out[r, h, q, j] = True
    return out.to(score.device)
