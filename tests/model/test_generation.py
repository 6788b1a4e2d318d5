"""Cached inference: prefill + token-by-token decode reproduces the full forward in inference mode, for every
architecture, with constant-size caches for GDN, SWA and LTE."""

import pytest
import torch

from .conftest import CONSTANT_MEMORY, tiny_config, tiny_model

# Tiny LTE: sinks 2, router margin 3 (RF 7), window 8, buffer 6 -> lengths below the sinks, below the receptive field,
# exactly W, and beyond W + N; NSA: blocks of 4.
PROMPT_LENGTHS = [1, 5, 8, 23]


def decode_logits(model, ids, prompt_len, attention_mask=None):
    cache = model.allocate_cache(ids.shape[0])
    mask = None if attention_mask is None else attention_mask[:, :prompt_len]
    logits = [model(ids[:, :prompt_len], attention_mask=mask, cache=cache).logits]
    for t in range(prompt_len, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], cache=cache).logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("prompt_len", PROMPT_LENGTHS)
def test_prefill_decode_equals_full_forward(arch, prompt_len):
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (2, prompt_len + 14))
    with torch.no_grad():
        full = model(ids).logits
        cached, cache = decode_logits(model, ids, prompt_len)
    assert cache.seen == ids.shape[1]
    assert (cached - full).abs().max() <= 1e-4


def test_cached_forward_without_no_grad(arch):
    """An eval loop that forgets torch.no_grad still decodes, as it does with it (LTE's decode scoring has no gradient
    and runs under no_grad itself)."""
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    cached, _ = decode_logits(model, ids, 5)
    with torch.no_grad():
        want, _ = decode_logits(model, ids, 5)
    torch.testing.assert_close(cached.detach(), want, rtol=1e-4, atol=1e-5)  # autograd may pick other kernels


def test_left_padded_prefill_decode_equals_full_forward(arch):
    """Row 3's pads reach into the last `margin` prompt positions of the tiny LTE (3), so its first decode step scores
    a pad, and the next two its sinks."""
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (4, 30))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :2] = 0
    mask[3, :10] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cached, _ = decode_logits(model, ids, 12, attention_mask=mask)
    real = mask.bool()
    assert (cached - full)[real].abs().max() <= 1e-4


@pytest.mark.parametrize(("conv", "dilation"), [([1], [1]), ([5, 3], [1, 2])], ids=["pointwise", "mixed"])
def test_lte_routers_prefill_decode_equals_full_forward(conv, dilation):
    """Router CNNs other than the tiny config's. Pointwise (margin 0): each step scores the new token itself, whose
    ring slot the eviction takes over from the token leaving the window, so its score must be written after the
    eviction (it once went before, and the cache diverged). Mixed: two convs of different reach, dilated, with a
    prompt shorter than the margin (4), so the first steps score no token."""
    lte = {**tiny_config("gdn_lte").lte, "conv_size": conv, "conv_dilation": dilation}
    model = tiny_model("gdn_lte", lte=lte)
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        for prompt_len in (2, 12):
            cached, _ = decode_logits(model, ids, prompt_len)
            assert (cached - full).abs().max() <= 1e-4


def test_lte_with_qkv_bias_prefill_decode_equals_full_forward():
    """Decode projects q and each kv head's [k || v] with one GEMM whose k and v rows (and biases) are interleaved per
    head; random biases, under GQA (4 query heads on 2 kv heads), must land on the same heads as the full forward's."""
    model = tiny_model("gdn_lte", lte={**tiny_config("gdn_lte").lte, "qkv_bias": True})
    with torch.no_grad():
        names = ("q_proj.bias", "k_proj.bias", "v_proj.bias")
        biases = [p for name, p in model.named_parameters() if name.endswith(names)]
        assert biases
        for p in biases:
            p.normal_()
        ids = torch.randint(0, model.config.vocab_size, (2, 30))
        full = model(ids).logits
        cached, _ = decode_logits(model, ids, 12)
    assert (cached - full).abs().max() <= 1e-4


def test_batched_left_padded_greedy_equals_single(arch):
    model = tiny_model(arch)
    prompts = [torch.randint(3, model.config.vocab_size, (n,)) for n in (5, 17, 11)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    batched = model.generate(ids, attention_mask=mask, **kwargs)[:, width:]
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert torch.equal(batched[i], alone[0, len(p) :]), i


def _decode_steps(model, cache, steps):
    token = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(steps):
            model(token, cache=cache)


@pytest.mark.parametrize("arch_name", CONSTANT_MEMORY + ["gdn_attn"])
def test_cache_bytes_constant_or_growing(arch_name):
    model = tiny_model(arch_name)
    cache = model.allocate_cache(1)
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 16)), cache=cache)
    _decode_steps(model, cache, 10)
    early = cache.nbytes()
    _decode_steps(model, cache, 1990)
    late = cache.nbytes()
    if arch_name in CONSTANT_MEMORY:
        assert late == early
    else:  # full attention keeps every token: its slots grow with the context
        assert late > 4 * early
        slots = [s.k.shape[2] for s, kind in zip(cache.states, model.config.mixers) if kind == "attn"]
        assert slots and all(cache.seen <= n < 2 * cache.seen for n in slots)


def test_lte_buffer_is_top_n_of_full_forward_scores():
    model = tiny_model("gdn_lte")
    cfg = model.config.lte
    window, n = cfg["window_size"], cfg["buffer_size"]
    ids = torch.randint(0, model.config.vocab_size, (2, 60))
    with torch.no_grad():
        routing = model(ids).routing
        _, cache = decode_logits(model, ids, 20)
    total, ring = ids.shape[1], window + 1
    for layer, r in zip(model.config.lte_layers, routing):
        ranked = model.model.layers[layer].attn.inference_scores(r.score, None)  # sinks +inf
        state = cache.states[layer]
        for b in range(ids.shape[0]):
            for h in range(cfg["num_kv_heads"]):
                # Brute force: keys older than the last query's window, best first, earlier first on ties.
                older = ranked[b, : total - 1 - window, h].tolist()
                best = sorted((j for j, s in enumerate(older) if s > 0), key=lambda j: (-older[j], j))[:n]
                length = int(state.buffer_len[b, h])
                assert set(state.token_pos[b, h, ring : ring + length].tolist()) == set(best), (layer, b, h)


def test_generate_sampling_and_stopping():
    model = tiny_model("gdn_lte")
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    torch.manual_seed(1)
    a = model.generate(
        ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=6, pad_token_id=0
    )
    torch.manual_seed(1)
    b = model.generate(
        ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=6, pad_token_id=0
    )
    assert a.shape == (2, 15) and torch.equal(a, b)
    greedy = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    first = int(greedy[0, 9])
    stopped = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=first)
    assert stopped.shape[1] == 10


def test_beam_search_is_refused():
    model = tiny_model("gdn")
    with pytest.raises(ValueError, match="beam search is not supported"):
        model.generate(torch.ones(1, 3, dtype=torch.long), num_beams=2, max_new_tokens=2)


def test_cache_needs_eval_mode():
    model = tiny_model("gdn_lte").train()
    with pytest.raises(ValueError, match="call model.eval"):
        model(torch.ones(1, 3, dtype=torch.long), cache=model.allocate_cache(1))


@pytest.mark.parametrize("arch_name", CONSTANT_MEMORY + ["gdn_attn"])
def test_decode_step_reads_no_tensor_values_on_the_host(arch_name, monkeypatch):
    """On a GPU, reading a tensor's value on the host (`.item()`, `bool(t)`, `.tolist()`, ...) is a sync; a decode step
    must do none, so it can be captured in a CUDA graph. Checked on the CPU paths by making those calls raise."""
    model = tiny_model(arch_name)
    cache = model.allocate_cache(2)
    with torch.no_grad():
        model(torch.randint(0, 100, (2, 12)), cache=cache)

        def refuse(*_args, **_kwargs):
            raise AssertionError("host read of a tensor value inside a decode step")

        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        for _ in range(3):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("arch_name", CONSTANT_MEMORY)
def test_decode_step_compiles_whole_and_once(arch_name):
    """gpt-fast-style `torch.compile` of a decode step: dynamo traces it without a graph break (`fullgraph`), the
    host-side token counters turn symbolic after the second step so later steps reuse that graph, and the compiled
    steps give the eager logits. CPU paths only (on CUDA the Triton and fla kernels are in the trace too, which
    `benchmarks/e2e.py --compile` exercises); the eager backend keeps the test cheap."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(arch_name)
    prompt = torch.randint(0, 100, (2, 12))
    eager_cache, compiled_cache = model.allocate_cache(2), model.allocate_cache(2)
    step = torch.compile(lambda ids, cache: model(ids, cache=cache).logits, backend="eager", fullgraph=True)
    with torch.no_grad():
        model(prompt, cache=eager_cache)
        model(prompt, cache=compiled_cache)
        for _ in range(6):
            ids = torch.randint(0, 100, (2, 1))
            torch.testing.assert_close(step(ids, compiled_cache), model(ids, cache=eager_cache).logits, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] <= 2
    assert compiled_cache.seen == eager_cache.seen == 18
