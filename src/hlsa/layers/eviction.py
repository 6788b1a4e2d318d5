"""Eviction policies at inference: what decides which older tokens the N-slot buffer of a constant cache keeps.

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
* `delta_write`: how much a token would change a linear memory of the layer's own keys and values, the size of its
  delta-rule write (the write magnitude by which HOLA evicts inside GDN layers). Per kv head a memory `S [D, D]`
  (float32, zero at the start, part of the cache) reads the unit pre-RoPE key `k^_t`; the token's score is
  `||beta (v_t - S^T k^_t)||`, what the memory fails to predict of its value, and the memory then takes that write,
  `S += k^_t (beta (v_t - S^T k^_t))^T`, with `beta = DELTA_WRITE_BETA` and no decay (pads write nothing). A token the
  memory already predicts scores low: the memory stands in for it, the buffer keeps what the memory cannot hold;
* `h2o` (heavy hitters): the attention mass a token has received, summed over the queries (and the G query heads of
  its kv head) that saw it while it was in the cache; the mass a token got before it entered the buffer counts,
  what it would have got while evicted does not (a constant-memory cache cannot know it);
* `tova`: the attention weight the latest query gave the token, summed over the G query heads of its kv head (the
  sum ranks as the average does); at each step the token leaving the window enters the buffer if its weight beats
  the buffer's smallest, which it then replaces;
* `snapkv`: the attention the prompt's last `SNAPKV_OBSERVE` queries (its observation window) gave each prompt
  token, summed over those queries and the G query heads of its kv head, then max-pooled over the
  `SNAPKV_POOL` neighbouring positions (SnapKV keeps the neighbours of a hit); fixed after the prompt. As in SnapKV
  the prompt itself is attended in full (a prefill holds every prompt key anyway), so its queries see every earlier
  key; the cache it leaves, and every query after it, follow the rule. Tokens after the prompt score 0: they leave
  with the window and the buffer keeps the prompt's selection (SnapKV keeps every generated token, which a constant
  cache cannot). The prompt is a prefill's input; in a full forward, the first `Eviction.prompt_len` tokens (None:
  all of them, hence full attention). The prefill recomputes the attention of its last queries densely
  (O(SNAPKV_OBSERVE x T)), as the sparse-attention kernels return no weights;
* `oracle`: a reference, not a cache: each query attends to sinks + window + the N older keys to which its kv head's
  query heads give the most attention weight (summed over the G query heads of the group, from full causal attention
  over every real key). It needs every key, so it runs in a full forward only (`oracle_attention`); a layer refuses
  to build a decode cache under it.

`h2o` and `tova` score from attention weights, so their scores change at every step: the cache's float32 score per
slot (counted in the cache bytes as for every policy) holds the accumulated mass or the latest weight, and each
decode step updates it from the probabilities of the attention that step computes anyway (`decode_attention(...,
return_weights=True)`: no second pass over the cache, no host sync). A query's selection then uses weights of
earlier queries only. There is no parallel form of that recurrence, so a full forward or a prefill under these
policies runs the decode step token by token (`attend_sequentially`: T steps of O(W + N) work each, instead of one
sparse-attention call); their brute-force definition is a plain simulation of the cache (`simulate_visible_keys`).
Both decode-attention paths return the weights: the torch reference from its probabilities, the Triton kernel from
the logits and log-sum-exp it writes beside its output (one more pass over `[B, HQ, S]` floats, none over K/V).

Beside the policies, the brute-force definitions that tests check the cached path against: `visible_keys` (for each
query, which keys the per-query top-N rule lets it see, one Python loop per query), `simulate_visible_keys` and
`snapkv_visible_keys` (the same for the policies scored from attention), and `dense_attention` (softmax attention
under an explicit visibility mask).

The same constant cache (`EvictionState`, the LTE slot layout updated by `hlsa.ops.lte_evict`) can replace the
growing cache of a full-attention layer of any trained model at inference (`Attention.set_eviction`), under every
policy but `learned`, which needs an LTE router.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hlsa.layers.lte_router import sink_mask
from hlsa.layers.slots import fill_ring
from hlsa.ops.decode_attention import decode_attention
from hlsa.ops.gated_delta import L2NORM_EPS, chunk_gated_delta_rule, l2norm
from hlsa.ops.lte_evict import lte_evict
from hlsa.ops.lte_retention import lte_column_end
from hlsa.ops.sparse_attention import sparse_attention

POLICIES = ("learned", "window", "random", "key_norm", "delta_write", "h2o", "tova", "snapkv", "oracle")
# Policies whose scores come from the attention weights of the queries so far.
ATTENTION_SCORED = ("h2o", "tova")
# Policies that keep state beside the slots (`Eviction.state_extra`), which their cache bytes count.
STATEFUL = ("delta_write",)
# snapkv: the observation window (the prompt's last queries) and the max-pooling kernel (odd).
SNAPKV_OBSERVE, SNAPKV_POOL = 16, 5
# delta_write: the memory's step size (the delta rule's beta; under 1, so that a token's write can be read back from
# the rule's output, `hlsa.ops.gated_delta`).
DELTA_WRITE_BETA = 0.5
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


@torch.no_grad()  # a ranking, with no gradient; and the cache's memory must not keep an autograd graph
def delta_write_scores(
    k: torch.Tensor, v: torch.Tensor, pad_mask: torch.Tensor | None, memory: torch.Tensor | None
) -> torch.Tensor:
    """`delta_write` scores, float32 `[B, T, HKV]`, through the gated delta rule's kernels (`hlsa.ops.gated_delta`:
    queries = keys = the unit keys, no decay, `beta` at real tokens, 0 at pads). The rule's output at t is the memory
    read after the write, `S_t^T k^_t = v_t - (1 - beta) u_t` with `u_t = v_t - S_{t-1}^T k^_t` (a unit key reads
    back `beta u_t` of its own write), so the write `beta u_t` comes from the output. `memory` (`[B, HKV, D, D]`,
    float32, or None: empty) is updated in place. Definition: `delta_write_scores_ref`."""
    b, t, hkv, d = k.shape
    unit, v = l2norm(k.float()), v.float()
    beta = _real(pad_mask, b, t, k.device)[:, :, None].float().expand(b, t, hkv) * DELTA_WRITE_BETA
    o, final = chunk_gated_delta_rule(
        unit, unit, v, torch.zeros_like(beta), beta, scale=1.0, initial_state=memory, output_final_state=True
    )
    if memory is not None:
        memory.copy_(final)
    write = (v - o) * (DELTA_WRITE_BETA / (1.0 - DELTA_WRITE_BETA))
    return write.norm(dim=-1)


def delta_write_scores_ref(k: torch.Tensor, v: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """`delta_write` by its definition, one token at a time from an empty memory: float32 `[B, T, HKV]`."""
    b, t, hkv, d = k.shape
    real = _real(pad_mask, b, t, k.device)
    memory = torch.zeros(b, hkv, d, d, device=k.device)  # [B, HKV, key dim, value dim]
    scores = torch.zeros(b, t, hkv, device=k.device)
    for i in range(t):
        key = k[:, i].float()
        key = key / (key.pow(2).sum(-1, keepdim=True) + L2NORM_EPS).sqrt()
        write = DELTA_WRITE_BETA * (v[:, i].float() - torch.einsum("bhkv,bhk->bhv", memory, key))
        scores[:, i] = write.norm(dim=-1)
        memory += real[:, i, None, None, None] * key[..., :, None] * write[..., None, :]
    return scores


@dataclass(frozen=True)
class Eviction:
    """The eviction policy of one layer at inference: `policy` (one of `POLICIES`), the `seed` of `random`, the
    index of the `layer` in its model (so that the random draws differ between layers), and the `prompt_len` of a
    full forward under `snapkv` (None: the whole input)."""

    policy: str = "learned"
    seed: int = 0
    layer: int = 0
    prompt_len: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"eviction policy must be one of {POLICIES}; got {self.policy!r}")

    @property
    def attention_scored(self) -> bool:
        return self.policy in ATTENTION_SCORED

    def score_lag(self, margin: int) -> int:
        """How many tokens after a key its score is known: the router reads `margin` tokens of right context; the
        training-free scores read the key alone."""
        return margin if self.policy == "learned" else 0

    def scores(
        self,
        router: torch.Tensor | None,
        k: torch.Tensor,
        positions: torch.Tensor,
        *,
        v: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The raw scores that rank keys (before sinks and pads are ranked +inf / -inf); for `h2o` and `tova` the
        score a token starts with (0), to which `update` adds the attention it gets.

        Args:
            router: `[B, T, HKV]` the router's scores (`learned`); None in a layer without a router.
            k: `[B, T, HKV, D]` pre-RoPE keys of the same tokens (`key_norm`, `delta_write`).
            positions: int64 `[T]` their positions, pads counted (`random`).
            v: `[B, T, HKV, D]` their values (`delta_write`).
            pad_mask: bool `[B, T]`, False at pads (`delta_write`: a pad writes nothing); None: no pads.
            memory: `delta_write`'s float32 `[B, HKV, D, D]` memory before these tokens, a cache's (`state_extra`),
                which takes their writes in place; None: an empty memory, discarded afterwards (a full forward).

        Returns:
            float `[B, T, HKV]`.
        """
        if self.policy == "learned":
            if router is None:
                raise ValueError("eviction policy 'learned' needs an LTE router; this layer has none")
            return router
        # The oracle ranks by its own weights; snapkv's prompt scores come from the prompt's queries
        # (`snapkv_scores`), and tokens after it score 0.
        if self.policy in ("window", "oracle", "snapkv", *ATTENTION_SCORED):
            return torch.zeros(k.shape[:3], device=k.device)
        if self.policy == "random":
            return random_scores(self.seed, self.layer, k.shape[2], positions)[None].expand(k.shape[:3])
        if self.policy == "delta_write":
            if v is None:
                raise ValueError("eviction policy 'delta_write' scores keys with their values; pass v")
            return delta_write_scores(k, v, pad_mask, memory)
        return 1.0 / (1.0 + k.float().norm(dim=-1))  # key_norm

    def state_extra(
        self, batch_size: int, num_kv_heads: int, head_dim: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The cache fields the policy keeps beside the slots (`EvictionState.empty(**extra)`): `delta_write`'s
        memory, none for the others."""
        if self.policy not in STATEFUL:
            return {}
        return {"memory": torch.zeros(batch_size, num_kv_heads, head_dim, head_dim, device=device)}

    def update(self, score: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`h2o`, `tova`: the cache's ranked scores after a query gave `weights` (float32, summed over the query heads
        of each kv head, 0 on slots it did not see); sinks (+inf) and empty or pad slots (-inf) keep theirs."""
        new = score + weights if self.policy == "h2o" else weights
        return torch.where(score.isfinite(), new, score)


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


def simulate_visible_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    pad_mask: torch.Tensor | None,
    *,
    policy: str,
    window: int,
    buffer_size: int,
    sink_size: int,
) -> torch.Tensor:
    """Brute-force definition of `h2o` and `tova`, bool `[B, HKV, T, T]` (query, key): a plain simulation of one
    constant cache per (row, kv head), one Python step per query, sharing nothing with the cached path.

    At step `t` the token `t - W - 1` leaves the window; if its score is positive it joins the buffer (a set), or,
    when the buffer holds `buffer_size` tokens, replaces the one of smallest score (the latest among ties) if it
    scores strictly more. Token `t` arrives with score +inf if it is one of the row's first `sink_size` real tokens,
    else 0. Query `t` sees the buffer and the real tokens of `t-W..t`; its softmax weights over them (scaled dot
    products of `q [B, T, HQ, D]` and `k [B, T, HKV, D]`, keys rotated), summed over the query heads of the kv head,
    then update the score of every token it saw: `h2o` adds them, `tova` replaces the score with them.
    """
    b, t, hkv, d = k.shape
    groups = q.shape[2] // hkv
    real = _real(pad_mask, b, t, k.device).tolist()
    out = torch.zeros(b, hkv, t, t, dtype=torch.bool)
    for r in range(b):
        sinks = [j for j in range(t) if real[r][j]][:sink_size]
        for h in range(hkv):
            buffer: set[int] = set()
            score: dict[int, float] = {}
            for i in range(t):
                leaving = i - window - 1
                if leaving >= 0 and real[r][leaving] and score[leaving] > 0:
                    if len(buffer) < buffer_size:
                        buffer.add(leaving)
                    elif buffer_size > 0:
                        victim = min(buffer, key=lambda j: (score[j], -j))
                        if score[leaving] > score[victim]:
                            buffer = (buffer - {victim}) | {leaving}
                if real[r][i]:
                    score[i] = float("inf") if i in sinks else 0.0
                seen = sorted(buffer | {j for j in range(max(0, i - window), i + 1) if real[r][j]})
                if not seen:
                    continue
                out[r, h, i, seen] = True
                logits = q[r, i, h * groups : (h + 1) * groups].float() @ k[r, seen, h].float().T * d**-0.5
                weights = torch.softmax(logits, dim=-1).sum(0).tolist()
                for j, w in zip(seen, weights):
                    if score[j] != float("inf"):
                        score[j] = score[j] + w if policy == "h2o" else w
    return out.to(k.device)


def snapkv_scores(q: torch.Tensor, k: torch.Tensor, pad_mask: torch.Tensor | None, prompt: int) -> torch.Tensor:
    """`snapkv`'s raw scores, float32 `[B, T, HKV]`: for the first `prompt` tokens the pooled attention of the
    prompt's last `SNAPKV_OBSERVE` queries (full causal attention over the real keys), 0 after them. `q [B, T, HQ,
    D]`, `k [B, T, HKV, D]` rotated."""
    b, t, hkv, d = k.shape
    out = torch.zeros(b, t, hkv, device=k.device)
    if prompt == 0:
        return out
    first = max(0, prompt - SNAPKV_OBSERVE)
    groups = q.shape[2] // hkv
    logits = torch.einsum("bihd,bjhd->bhij", q[:, first:prompt].float(), _gqa(k[:, :prompt].float(), groups))
    i, j = torch.arange(first, prompt, device=k.device), torch.arange(prompt, device=k.device)
    seen = (j[None, :] <= i[:, None])[None, None] & _real(pad_mask, b, t, k.device)[:, None, None, :prompt]
    weights = torch.softmax((logits * d**-0.5).masked_fill(~seen, float("-inf")), dim=-1).nan_to_num(0.0)
    mass = weights.unflatten(1, (hkv, groups)).sum((2, 3))  # [B, HKV, prompt]
    pooled = F.max_pool1d(mass, SNAPKV_POOL, stride=1, padding=SNAPKV_POOL // 2)
    out[:, :prompt] = pooled.transpose(1, 2)
    return out


def snapkv_visible_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    pad_mask: torch.Tensor | None,
    *,
    prompt: int,
    window: int,
    buffer_size: int,
    sink_size: int,
) -> torch.Tensor:
    """Brute-force definition of `snapkv`, bool `[B, HKV, T, T]` (query, key): the prompt's queries see every real
    key up to themselves; the later ones what `visible_keys` allows under the scores below, one Python loop per
    (row, kv head, observing query, key), sharing nothing with `snapkv_scores`.

    The score of prompt token `j`: the largest, over the prompt tokens `j'` with `|j' - j| <= SNAPKV_POOL // 2`, of
    the softmax weight that the queries `prompt - SNAPKV_OBSERVE .. prompt - 1` gave `j'` (over their real keys, up
    to themselves), summed over those queries and the query heads of the kv head; 0 for later tokens.
    """
    b, t, hkv, d = k.shape
    groups = q.shape[2] // hkv
    real = _real(pad_mask, b, t, k.device).tolist()
    raw = torch.zeros(b, t, hkv)
    for r in range(b):
        for h in range(hkv):
            mass = [0.0] * prompt
            for i in range(max(0, prompt - SNAPKV_OBSERVE), prompt):
                keys = [j for j in range(i + 1) if real[r][j]]
                for g in range(h * groups, (h + 1) * groups):
                    if keys:
                        logits = torch.stack([q[r, i, g].float() @ k[r, j, h].float() for j in keys]) * d**-0.5
                        for j, w in zip(keys, torch.softmax(logits, dim=0).tolist()):
                            mass[j] += w
            radius = SNAPKV_POOL // 2
            for j in range(prompt):
                raw[r, j, h] = max(mass[max(0, j - radius) : j + radius + 1])
    visible = visible_keys(raw, pad_mask, window=window, buffer_size=buffer_size, sink_size=sink_size)
    for r in range(b):
        for i in range(prompt):
            visible[r, :, i] = torch.tensor([real[r][j] and j <= i for j in range(t)])
    return visible


def rank_scores(raw: torch.Tensor, pad_mask: torch.Tensor | None, sink_size: int) -> torch.Tensor:
    """Scores that rank keys at inference, float32 `[B, T, HKV]`: a policy's raw score, sinks +inf (always kept),
    pads -inf (never kept)."""
    real = _real(pad_mask, raw.shape[0], raw.shape[1], raw.device)
    ranked = raw.detach().float().masked_fill(sink_mask(real, sink_size)[:, :, None], float("inf"))
    return ranked.masked_fill(~real[:, :, None], float("-inf"))


@dataclass
class EvictionState:
    """The constant decode cache of a full-attention layer under an eviction policy: the slots of an LTE cache
    (`hlsa.layers.lte.LTEState` adds the router's rings to these fields)."""

    k: torch.Tensor  # [B, HKV, W+1+N, D] post-RoPE keys: ring slots first, then the compact buffer
    v: torch.Tensor  # [B, HKV, W+1+N, D]
    score: torch.Tensor  # float32 [B, HKV, W+1+N]: the policy's score (h2o: accumulated mass); -inf empty/pad
    valid: torch.Tensor  # bool [B, HKV, W+1+N]
    buffer_len: torch.Tensor  # int32 [B, HKV]
    token_pos: torch.Tensor  # int32 [B, HKV, W+1+N]
    offset: torch.Tensor  # int64 [B] left-padding length of each row
    position: torch.Tensor  # int64 [], next token's position
    seen: int = 0
    memory: torch.Tensor | None = None  # float32 [B, HKV, D, D]: delta_write's memory (Eviction.state_extra)

    @classmethod
    def empty(
        cls,
        batch_size: int,
        num_kv_heads: int,
        slots: int,
        head_dim: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
        **extra: torch.Tensor,
    ) -> EvictionState:
        """An empty cache of `slots` slots; `extra` holds a subclass's own fields (`LTEState`'s router rings)."""
        b, h = batch_size, num_kv_heads
        return cls(
            k=torch.zeros(b, h, slots, head_dim, device=device, dtype=dtype),
            v=torch.zeros(b, h, slots, head_dim, device=device, dtype=dtype),
            score=torch.full((b, h, slots), float("-inf"), device=device),
            valid=torch.zeros(b, h, slots, device=device, dtype=torch.bool),
            buffer_len=torch.zeros(b, h, device=device, dtype=torch.int32),
            token_pos=torch.full((b, h, slots), -1, device=device, dtype=torch.int32),
            offset=torch.zeros(b, device=device, dtype=torch.long),
            position=torch.zeros((), device=device, dtype=torch.long),
            **extra,
        )


def fill_cache(
    state: EvictionState,
    k: torch.Tensor,
    v: torch.Tensor,
    ranked: torch.Tensor,
    pad_mask: torch.Tensor | None,
    *,
    ring_size: int,
) -> None:
    """Fill an empty constant cache (an `EvictionState` or an `LTEState`) from a prompt of `T` tokens: the ring of
    `ring_size = W + 1` slots holds the last W+1 tokens, the buffer (the other slots) the top-N positive `ranked`
    scores among the older tokens, ties to the earlier token. `k` (rotated), `v`: `[B, T, HKV, D]`; `ranked` float32
    `[B, T, HKV]` (`rank_scores`). Also sets the row offsets (left padding), the position and `seen`."""
    b, t, hkv, d = k.shape
    real = _real(pad_mask, b, t, k.device)
    fill_ring(state.k[:, :, :ring_size], k)
    fill_ring(state.v[:, :, :ring_size], v)
    fill_ring(state.score[:, :, :ring_size], ranked)
    fill_ring(state.valid[:, :, :ring_size], real[:, :, None].expand(b, t, hkv))
    positions = torch.arange(t, device=k.device, dtype=torch.int32)
    fill_ring(state.token_pos[:, :, :ring_size], positions[None, :, None].expand(b, t, hkv))
    buffer_size = state.k.shape[2] - ring_size
    older = max(0, t - ring_size)
    if older > 0 and buffer_size > 0:
        cand = ranked[:, :older].transpose(1, 2)  # [B, HKV, older]
        order = torch.sort(cand, dim=-1, descending=True, stable=True).indices[..., :buffer_size]
        top = cand.gather(-1, order)
        keep = top > 0
        n = order.shape[-1]
        idx = order[..., None].expand(-1, -1, -1, d)
        state.k[:, :, ring_size : ring_size + n] = k.transpose(1, 2).gather(2, idx)
        state.v[:, :, ring_size : ring_size + n] = v.transpose(1, 2).to(state.v.dtype).gather(2, idx)
        # Kept entries are a prefix (sorted descending, positives first).
        state.score[:, :, ring_size : ring_size + n] = torch.where(keep, top, float("-inf"))
        state.valid[:, :, ring_size : ring_size + n] = keep
        state.token_pos[:, :, ring_size : ring_size + n] = order.to(torch.int32)
        state.buffer_len.copy_(keep.sum(-1).to(torch.int32))
    state.offset.copy_((~real).sum(1))
    state.seen = t
    state.position.fill_(t)


def evict_step(
    state: EvictionState,
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    new_score: torch.Tensor,
    *,
    eviction: Eviction,
    ring_size: int,
    sink_size: int,
    score_lag: int = 0,
    real: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step of a constant cache at `state.position`: evict and write (`hlsa.ops.lte_evict`, which ranks
    `new_score [B, HKV]`, the raw score of token `position - score_lag`), attend, and for `h2o` / `tova` update the
    slot scores from that same attention's weights. `q [B, HQ, D]`, `k_new` (rotated), `v_new`: `[B, HKV, D]`.
    `real bool [B]`, in a prefill only: False marks the new token a pad, which no query sees. Returns `[B, HQ, D]`;
    does not advance the position."""
    lte_evict(
        state.k,
        state.v,
        state.score,
        state.valid,
        state.buffer_len,
        state.token_pos,
        position=state.position,
        k_new=k_new.to(state.k.dtype),
        v_new=v_new.to(state.v.dtype),
        ring_size=ring_size,
        new_score=new_score,
        score_lag=score_lag,
        offset=state.offset,
        sink_size=sink_size,
        backend=backend,
    )
    if real is not None:
        slot = state.position.remainder(ring_size).view(1)
        state.valid.index_copy_(2, slot, real[:, None, None].expand(-1, state.valid.shape[1], 1))
    if not eviction.attention_scored:
        return decode_attention(q, state.k, state.v, valid=state.valid, backend=backend)
    o, weights = decode_attention(q, state.k, state.v, valid=state.valid, backend=backend, return_weights=True)
    state.score.copy_(eviction.update(state.score, weights))
    return o


def attend_sequentially(
    state: EvictionState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pad_mask: torch.Tensor | None,
    *,
    eviction: Eviction,
    ring_size: int,
    sink_size: int,
) -> torch.Tensor:
    """A full forward or prefill under `h2o` / `tova`: `evict_step` once per token from an emptied cache, which it
    leaves filled as a prefill does. `q [B, T, HQ, D]`, `k` (rotated), `v`: `[B, T, HKV, D]` -> `[B, T, HQ, D]`."""
    b, t, hkv, _ = k.shape
    real = _real(pad_mask, b, t, k.device)
    state.valid.fill_(False)
    state.score.fill_(float("-inf"))
    state.buffer_len.zero_()
    state.token_pos.fill_(-1)
    state.offset.copy_((~real).sum(1))
    start = torch.zeros(b, hkv, device=k.device)  # the score every token starts with
    outs = []
    for i in range(t):
        state.position.fill_(i)
        outs.append(
            evict_step(
                state, q[:, i], k[:, i], v[:, i], start, eviction=eviction, ring_size=ring_size,
                sink_size=sink_size, real=real[:, i],
            )
        )  # fmt: skip
    state.position.fill_(t)
    state.seen = t
    return torch.stack(outs, dim=1)


def inference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    raw: torch.Tensor,
    pad_mask: torch.Tensor | None,
    *,
    eviction: Eviction,
    window: int,
    buffer_size: int,
    sink_size: int,
    state: EvictionState | None,
    empty_state: Callable[[], EvictionState],
    score_lag: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of a full forward or a prefill under the constant-cache rule of `eviction`, and with `state` (empty)
    the cache it leaves for decoding; the one path of LTE layers at inference and of evicting attention layers.

    `q [B, T, HQ, D]`, `k` (rotated), `v`: `[B, T, HKV, D]`; `raw [B, T, HKV]` the policy's raw scores
    (`Eviction.scores`). The scores of the last `score_lag` tokens are not known yet (the router's margin): the cache
    leaves them unranked for the decode steps to score. `empty_state()` makes a cache for the policies that attend
    through one (`h2o`, `tova`) when no `state` is given. Returns `[B, T, HQ, D]`.
    """
    if eviction.policy == "oracle":
        if state is not None:
            raise ValueError("the oracle policy reads every key, so it has no cache; use a full forward")
        return oracle_attention(q, k, v, window=window, buffer_size=buffer_size, sink_size=sink_size, pad_mask=pad_mask)
    if eviction.attention_scored:  # scores from attention: one step per token
        slots = state if state is not None else empty_state()
        return attend_sequentially(
            slots, q, k, v, pad_mask, eviction=eviction, ring_size=window + 1, sink_size=sink_size
        )
    t = k.shape[1]
    prompt = min(t, t if eviction.prompt_len is None else eviction.prompt_len)
    if eviction.policy == "snapkv":  # scored from the rotated queries and keys, which `Eviction.scores` lacks
        raw = snapkv_scores(q, k, pad_mask, prompt)
    ranked = rank_scores(raw, pad_mask, sink_size)
    column_end = lte_column_end(ranked, window=window, buffer_size=buffer_size)
    o = sparse_attention(q, k, v, window=window, column_end=column_end, key_mask=pad_mask, backend=backend)
    if eviction.policy == "snapkv" and prompt > 0:  # the prompt is attended in full
        prompt_mask = None if pad_mask is None else pad_mask[:, :prompt]
        full = sparse_attention(
            q[:, :prompt], k[:, :prompt], v[:, :prompt], window=None, key_mask=prompt_mask, backend=backend
        )
        o = torch.cat([full, o[:, prompt:]], dim=1)
    if state is not None:
        ranked[:, max(0, t - score_lag) :] = float("-inf")
        fill_cache(state, k, v, ranked, pad_mask, ring_size=window + 1)
    return o
