"""Every architecture builds, runs forward/backward, learns a fixed batch, saves and loads."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hlsa import HybridConfig, HybridForCausalLM

from .conftest import CONFIGS_DIR, tiny_config, tiny_model

# Analytic parameter counts of the 0.4B configs.
PARAMS_04B = {
    "gdn": 366.96e6,
    "gdn_swa": 354.03e6,
    "gdn_attn": 354.03e6,
    "gdn_lte": 360.25e6,
    "gdn_nsa": 358.35e6,
    "transformer": 341.10e6,
    "nsa": 349.75e6,
}


@pytest.mark.parametrize("arch", sorted(PARAMS_04B))
def test_param_counts_04b(arch):
    cfg = HybridConfig.from_json_file(CONFIGS_DIR / f"{arch}_0.4B.json")
    with torch.device("meta"):
        model = HybridForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PARAMS_04B[arch]) / PARAMS_04B[arch] < 0.005, n


def test_forward_backward_and_learns(arch):
    model = tiny_model(arch).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 37))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(out.loss.item())
    assert out.logits.shape == (2, 37, model.config.vocab_size)
    assert losses[-1] < losses[0] - 0.1, losses
    if "lte" in model.config.mixers:
        assert out.routing is not None and len(out.routing) == len(model.config.lte_layers)
        score, selected = out.routing[0]
        assert score.shape == selected.shape == (2, 37, model.config.lte["num_kv_heads"])
        assert score.requires_grad
    else:
        assert out.routing is None


def test_router_receives_gradient():
    model = tiny_model("gdn_lte").train()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "router" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_save_load_auto_roundtrip(tmp_path, arch):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "hlsa"
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 19))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_tied_and_untied_embeddings():
    tied = tiny_model("gdn")
    assert tied.lm_head.weight is tied.model.embeddings.weight
    untied = tiny_model("gdn", tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embeddings.weight


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m(torch.zeros(2, 0, dtype=torch.long)), "non-empty int64"),
        (lambda m: m(torch.zeros(2, 3)), "non-empty int64"),
        (
            lambda m: m(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])),
            "right padding is not supported",
        ),
        (lambda m: m(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4)), "must match input_ids"),
        (lambda m: m(torch.ones(1, 3, dtype=torch.long), cache=object()), "cache must be a HybridCache"),
    ],
)
def test_bad_input_messages(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_model("gdn_lte"))


def test_init_follows_authors():
    """The authors' initialisation: N(0, initializer_range) for projections and embeddings; o_proj/down_proj
    kaiming-uniform(a=sqrt 5) divided by sqrt(2 * layers); router convs kaiming-normal with a +0.5 output bias; norms
    at one."""
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config("gdn_lte", initializer_range=0.006, tie_word_embeddings=False))
    layers = model.config.num_hidden_layers
    lte, gdn = model.model.layers[1], model.model.layers[0]

    def std_close(t, expected):
        assert abs(t.std().item() - expected) < 0.15 * expected, (t.std().item(), expected)

    for w in (lte.attn.q_proj.weight, gdn.attn.k_proj.weight, lte.mlp.up_proj.weight, model.model.embeddings.weight):
        std_close(w, 0.006)
    for w in (lte.attn.o_proj.weight, gdn.attn.o_proj.weight, gdn.mlp.down_proj.weight):
        std_close(w, 1 / math.sqrt(3 * w.shape[1]) / math.sqrt(2 * layers))
    conv = lte.attn.router.conv_stack.convs[0]
    std_close(conv.weight, math.sqrt(2 / (conv.weight.shape[1] * conv.weight.shape[2])))
    assert torch.all(lte.attn.router.conv_stack.proj.bias == 0.5)
    assert torch.all(lte.attn_norm.weight == 1) and torch.all(gdn.attn.o_norm.weight == 1)
    assert torch.all(model.model.l1_lambda == 0) and model.model.l1_lambda.shape == (2, 2)
