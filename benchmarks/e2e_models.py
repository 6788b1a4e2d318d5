"""The models and caches that benchmarks/e2e.py measures: the plan of a run, random-weight 0.4B models, synthetic
decode caches of any context, and the bytes a decode step must move (the roofline)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchlib import REPO
from hlsa.cache import HybridCache
from hlsa.config import HybridConfig
from hlsa.layers.linear import Linear
from hlsa.model import HybridForCausalLM
from hlsa.ops.router_step import step_ring_bytes

K = 1024
ARCHS = ("gdn", "gdn_swa", "gdn_attn", "gdn_lte", "gdn_nsa", "transformer", "nsa")
FULL_CONTEXTS = (4 * K, 16 * K, 64 * K, 128 * K)
# Decode steps beyond C that a synthetic growing cache (full attention, NSA) holds without regrowing. Their decode
# steps read the position from the device; their only host-side decision, growing the cache when it is full, then
# never fires within a point (checked in `e2e_timing.decode_point`), so a step replayed from a CUDA graph stays right.
# A generation that outgrows its cache reallocates, which a captured graph cannot follow.
HEADROOM = 256
INIT_STD = 0.02  # scale of random cache contents (keeps softmax and the delta rule in a normal range)


@dataclass(frozen=True)
class Plan:
    """What to measure (defaults: GPU runs); PASS/MISS use `target_contexts` (short, mid, long), `target_batches`."""

    mode: str
    decode_archs: tuple[str, ...]
    contexts: tuple[int, ...]
    prefill_archs: tuple[str, ...]
    prefill_lengths: tuple[int, ...]
    budget_s: float
    extra_contexts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-architecture extra contexts
    # Archs whose shortest context is timed again after their longest, per batch: a step's time drifts over a
    # process's lifetime (up to +18% after the first points, whatever the context), so the context ratio of
    # target 1 compares the long context with the mean of the two short-context timings that bracket it.
    bracket_archs: tuple[str, ...] = ("gdn_lte",)
    batches: tuple[int, ...] = (1, 16, 64)
    steps: int = 8  # decode steps per timed repeat
    repeats: int = 3
    prefill_repeats: int = 2
    copy_bytes: int = 2**31
    target_contexts: tuple[int, int, int] = (4 * K, 64 * K, 128 * K)
    target_batches: tuple[int, int] = (16, 64)
    memory_contexts: tuple[int, ...] = FULL_CONTEXTS
    config_dir: Path = REPO / "configs"
    suffix: str = "_0.4B"
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    # torch.compile the graph-captured decode steps (Inductor fuses the elementwise glue between kernels; it halved
    # the GDN+LTE 0.4B step at batch 1, docs/efficiency.md). Off with --no-compile.
    compile: bool = True
    # Inductor freezing for the compiled steps: weights become constants, so the concatenated weights of the
    # projections that share an input (`hlsa.layers.linear.fused_linear`) are folded once at compile time instead of
    # copied every step. Inference only; off with --no-freeze.
    freeze: bool = True
    # Inductor combo kernels for the compiled steps: independent small kernels (e.g. an LTE layer's sum of the k|v
    # partials and its rotations of q and k) share one launch; in a replayed CUDA graph a step costs the sum of its
    # kernels, ~1 us even for the smallest (docs/efficiency.md). Off with --no-combo-kernels.
    combo_kernels: bool = True
    # The projections' backend: "auto" lets `hlsa.ops.linear` pick (its split-K decode GEMM inside compiled or
    # captured steps); "torch" keeps every projection on `F.linear` (cuBLAS), the peer it was measured against
    # (docs/efficiency.md). --cublas-projections.
    projections: str = "auto"


def make_plan(args: argparse.Namespace) -> Plan:
    if args.smoke:
        return Plan(
            mode="smoke", config_dir=REPO / "configs" / "tiny", suffix="", device="cpu", decode_archs=ARCHS,
            contexts=(32, 64), extra_contexts={"gdn_lte": (128,)}, batches=(1, 2, 3), prefill_archs=ARCHS,
            prefill_lengths=(16, 48), steps=2, repeats=1, prefill_repeats=1, budget_s=args.budget_s or 60.0,
            copy_bytes=2**22, target_contexts=(32, 64, 128), target_batches=(2, 3), memory_contexts=(256, 512, 1024),
            dtype=torch.float32,  # CPU bf16 kernels are ~50x slower than fp32; the GPU run is bf16
        )  # fmt: skip
    if args.quick:
        four = ("gdn_lte", "transformer", "gdn_swa", "gdn")
        return Plan(
            mode="quick", decode_archs=four, contexts=(4 * K, 64 * K), extra_contexts={"gdn_lte": (128 * K,)},
            prefill_archs=four, prefill_lengths=(4 * K, 16 * K, 64 * K), budget_s=args.budget_s or 470.0,
        )  # fmt: skip
    return Plan(mode="full", decode_archs=ARCHS, contexts=FULL_CONTEXTS, prefill_archs=ARCHS,
                prefill_lengths=FULL_CONTEXTS, budget_s=args.budget_s or 3600.0)  # fmt: skip


# --- models and synthetic caches -------------------------------------------------------------------------------------
def build_model(arch: str, plan: Plan, device: str | None = None) -> HybridForCausalLM:
    """Random-weight model in eval mode and `plan.dtype`, initialised directly on `device` (default the plan's), its
    projections on `plan.projections`."""
    config = HybridConfig.from_json_file(str(plan.config_dir / f"{arch}{plan.suffix}.json"))
    with torch.device(device or plan.device):
        model = HybridForCausalLM(config)
    for module in model.modules():
        if isinstance(module, Linear):
            module.backend = plan.projections
    return model.to(plan.dtype).eval()


def retained_slots(mixer: torch.nn.Module) -> int:
    """Buffer slots of an LTE layer that a long prompt leaves holding a token under the layer's eviction policy: all
    `buffer_size` (every policy but `window` scores older tokens positively, so the top-N fill the buffer), or under
    `window`, which scores no token positively, only the sinks (`hlsa.layers.eviction`)."""
    return mixer.sink_size if mixer.eviction.policy == "window" else mixer.buffer_size


def _fill_lte(state: object, context: int, ring: int, buffer: int, kept: int) -> None:
    """Ring full and the first `kept` of the `buffer` slots holding positively scored older tokens, the others empty,
    as after a long prompt. With `kept < buffer` (a policy that scores no token positively) the ring's tokens score
    0, so that decode steps leave the buffer as it is, as they do under that policy."""
    state.score.uniform_(0.1, 1.0)
    if kept < buffer:
        state.score[..., :ring] = 0.0
    state.valid.fill_(True)
    state.buffer_len.fill_(kept)
    # Ring slot s holds the token at the position p in [C - ring, C) with p % ring == s; buffer: older tokens.
    p = torch.arange(context - ring, context, device=state.k.device)
    ring_pos = torch.empty(ring, dtype=torch.int32, device=state.k.device)
    ring_pos[p % ring] = p.to(torch.int32)
    older = torch.linspace(0, max(0, context - ring - 1), buffer, device=state.k.device).to(torch.int32)
    state.token_pos.copy_(torch.cat([ring_pos, older])[None, None].expand_as(state.token_pos))
    empty = slice(ring + kept, ring + buffer)  # as an empty cache has them
    state.score[..., empty] = float("-inf")
    state.valid[..., empty] = False
    state.token_pos[..., empty] = -1
    state.router_x.normal_(0.0, INIT_STD)
    state.router_valid.fill_(True)
    state.offset.zero_()


def synthetic_cache(model: HybridForCausalLM, batch: int, context: int, headroom: int = HEADROOM) -> HybridCache:
    """A cache holding `context` tokens per sequence, with random contents of the size a real prefill leaves.

    Growing caches (full attention, NSA) get `context + headroom` slots (rounded up) so that the timed decode steps
    never reallocate; the first `context` slots are valid. An LTE buffer holds the tokens its layer's eviction policy
    keeps (`retained_slots`: full, or only the sinks under `window`). Every state's `seen`/`position` is set to
    `context`.
    """
    cache = model.allocate_cache(batch)
    for block, state in zip(model.model.layers, cache.states):
        for name in ("k", "v", "recurrent", "conv"):
            tensor = getattr(state, name, None)
            if tensor is not None:
                tensor.normal_(0.0, INIT_STD)
        kind, mixer = block.kind, block.attn
        if kind == "swa":
            state.valid.fill_(True)
        elif kind == "attn":
            slots = -(-(context + headroom) // 256) * 256
            shape = (batch, mixer.num_kv_heads, slots, mixer.head_dim)
            state.k = torch.empty(shape, device=state.k.device, dtype=state.k.dtype).normal_(0.0, INIT_STD)
            state.v = torch.empty_like(state.k).normal_(0.0, INIT_STD)
            state.valid = torch.zeros(shape[:3], device=state.k.device, dtype=torch.bool)
            state.valid[:, :, :context] = True
        elif kind == "nsa":
            mixer._grow(state, context + headroom)  # zero-filled, rounded up to whole chunks
            for tensor in (state.k, state.v, state.k_cmp, state.v_cmp):
                tensor.normal_(0.0, INIT_STD)
        elif kind == "lte":
            _fill_lte(state, context, mixer.window_size + 1, mixer.buffer_size, retained_slots(mixer))
        if hasattr(state, "position"):
            state.position.fill_(context)
        state.seen = context
    cache.seen = context
    return cache


# The tensors of a growing cache (full attention, NSA) whose dim 2 is its slots: sized by the context.
GROWING_SLOTS = {"attn": ("k", "v", "valid"), "nsa": ("k", "v", "k_cmp", "v_cmp")}


def mark_growing_dynamic(model: HybridForCausalLM, cache: HybridCache) -> None:
    """Let dynamo treat the slots of growing caches as a dynamic size from the first compile. A compiled decode step
    then serves every context of a model and batch; without this, dynamo specialises on the first context's slots
    and compiles again, dynamic, at the second (~1 min each with freezing). `maybe_`: a size the code does
    specialise on is not an error, only a recompile."""
    for block, state in zip(model.model.layers, cache.states):
        for name in GROWING_SLOTS.get(block.kind, ()):
            torch._dynamo.maybe_mark_dynamic(getattr(state, name), 2)


def step_bytes_per_seq(model: HybridForCausalLM, cache: HybridCache, context: int, batch: int) -> int:
    """Cache bytes one decode step must move per sequence.

    GDN: its whole state is read and rewritten (x2). SWA/LTE: the whole fixed-size state is read (ring/buffer slots,
    scores, validity), except LTE's router ring, of which a step reads each conv's older taps and writes each conv's
    fresh input (`hlsa.ops.router_step`; the ring holds 2m+1 positions of every conv's input), and the K and V of the
    buffer slots its eviction policy leaves empty (`retained_slots`), which decode attention does not fetch, and
    the memory of `delta_write`, read and rewritten (x2). Full
    attention: K, V and validity of the `context` valid slots. NSA: K and V of the compressed blocks, the selected
    blocks and the window. Scalar counters (positions) are shared by the batch, not per sequence, and are left out.
    """

    def batched_bytes(state: object) -> int:
        tensors = (v for v in vars(state).values() if isinstance(v, torch.Tensor) and v.ndim > 0)
        return sum(t.nbytes for t in tensors)

    total = 0
    for block, state in zip(model.model.layers, cache.states):
        kind, mixer = block.kind, block.attn
        if kind == "gdn":
            total += 2 * batched_bytes(state) // batch
        elif kind == "swa":
            total += batched_bytes(state) // batch
        elif kind == "lte":
            ring = state.router_x.nbytes + state.router_valid.nbytes
            layers = mixer.router.conv_stack.decode_layers(state.router_x.dtype)
            moved = step_ring_bytes(layers, mixer.num_kv_heads, state.router_x.element_size())
            empty = (mixer.buffer_size - retained_slots(mixer)) * mixer.num_kv_heads * 2 * mixer.head_dim
            total += (batched_bytes(state) - ring) // batch + moved - empty * state.k.element_size()
            if state.memory is not None:  # delta_write's memory: read (counted above) and rewritten
                total += state.memory.nbytes // batch
        elif kind == "attn":
            total += context * mixer.num_kv_heads * (2 * mixer.head_dim * state.k.element_size() + 1)
        else:
            slots = context // mixer.block_size + min(context, mixer.block_counts * mixer.block_size)
            slots += min(context, mixer.window_size + 1)
            total += slots * mixer.num_kv_heads * 2 * mixer.head_dim * state.k.element_size()
    return total


def weight_bytes(model: HybridForCausalLM) -> int:
    """Bytes of distinct parameters, read once per decode step: `parameters()` yields a shared parameter once (the
    tied embedding / LM head), and, unlike storage pointers, that also holds on the meta device."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def roofline_tokens_per_s(weights: int, step_bytes_per_seq: int, batch: int, bandwidth: float) -> float:
    """Best decode tokens/s: a step must move the weights once and every sequence's cache bytes, at `bandwidth`."""
    return batch * bandwidth / (weights + batch * step_bytes_per_seq)


def memory_table(plan: Plan) -> list[dict]:
    """Cache bytes per sequence, decode-step bytes per sequence and weight bytes against context for every
    architecture (shapes only: meta-device models), at the memory contexts and the targets' contexts."""
    rows = []
    for arch in ARCHS:
        model = build_model(arch, plan, device="meta")
        weights = weight_bytes(model)
        for c in sorted(set(plan.memory_contexts) | set(plan.target_contexts)):
            cache = synthetic_cache(model, 1, c, headroom=0)
            step = step_bytes_per_seq(model, cache, c, 1)
            rows.append({"arch": arch, "context": c, "cache_bytes_per_seq": cache.nbytes(), "step_bytes_per_seq": step,
                         "weight_bytes": weights})  # fmt: skip
    return rows


def model_info(model: HybridForCausalLM) -> dict:
    config, kinds = model.config, [block.kind for block in model.model.layers]
    return {"mixers": {kind: kinds.count(kind) for kind in sorted(set(kinds))}, "hidden_size": config.hidden_size,
            "num_layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()), "weight_bytes": weight_bytes(model)}  # fmt: skip
